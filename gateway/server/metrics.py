"""The gateway's Prometheus metrics and the tiny HTTP endpoint that serves them.

Text exposition format 0.0.4, written by hand (no client library): request counts by method,
status code and reason; a latency histogram per method; silo failures; requests in flight; and
the budget spent and reserved per scope window, read from the ledger at scrape time so the figures
are the ledger's own (exact rationals shown as floats, never accumulated here).

The endpoint is plain HTTP without authentication and binds a loopback address only (the config
refuses anything else). It serves ``GET /metrics`` and nothing else, and never exposes a query,
a consumer's purpose or a released value: only counts, latencies and budget totals.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gateway.budget.ledger import PrivacyLedger
from gateway.errors import ConfigurationError

log = logging.getLogger("silogate.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; a silo round trip on loopback takes milliseconds, a slow database seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


class GatewayMetrics:
    """Counters updated on the server's event loop and read by the endpoint's thread."""

    def __init__(self, ledger: PrivacyLedger) -> None:
        self._ledger = ledger
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._latency_counts: dict[str, list[int]] = {}
        self._latency_sums: dict[str, float] = {}
        self._silo_failures: Counter[tuple[str, str]] = Counter()
        self._in_flight = 0

    def observe_request(self, method: str, code: str, reason: str, seconds: float) -> None:
        with self._lock:
            self._requests[(method, code, reason)] += 1
            counts = self._latency_counts.setdefault(method, [0] * (len(LATENCY_BUCKETS) + 1))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            counts[-1] += 1  # +Inf: every observation
            self._latency_sums[method] = self._latency_sums.get(method, 0.0) + seconds

    def observe_silo_failure(self, silo: str, may_have_released: bool) -> None:
        with self._lock:
            self._silo_failures[(silo, str(may_have_released).lower())] += 1

    def enter(self) -> None:
        with self._lock:
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def render(self) -> str:
        """The exposition text of every metric."""
        with self._lock:
            requests = sorted(self._requests.items())
            latency = {m: list(c) for m, c in sorted(self._latency_counts.items())}
            sums = dict(self._latency_sums)
            failures = sorted(self._silo_failures.items())
            in_flight = self._in_flight
        lines: list[str] = []
        lines += _family(
            "silogate_requests_total",
            "counter",
            "Finished requests by method, gRPC status code and reason.",
            ((_labels(method=m, code=c, reason=r), n) for (m, c, r), n in requests),
        )
        lines += [
            "# HELP silogate_request_duration_seconds Request latency by method.",
            "# TYPE silogate_request_duration_seconds histogram",
        ]
        for method, counts in latency.items():
            for bound, count in zip((*LATENCY_BUCKETS, None), counts, strict=True):
                le = "+Inf" if bound is None else _number(bound)
                lines.append(
                    f"silogate_request_duration_seconds_bucket{_labels(method=method, le=le)} "
                    f"{count}"
                )
            lines.append(
                f"silogate_request_duration_seconds_sum{_labels(method=method)} {sums[method]!r}"
            )
            lines.append(
                f"silogate_request_duration_seconds_count{_labels(method=method)} {counts[-1]}"
            )
        lines += _family(
            "silogate_requests_in_flight",
            "gauge",
            "RunQuery calls being handled now.",
            [("", in_flight)],
        )
        lines += _family(
            "silogate_silo_failures_total",
            "counter",
            "Failed silo calls by silo and whether the silo may have released.",
            ((_labels(silo=s, may_have_released=m), n) for (s, m), n in failures),
        )
        budgets = sorted(self._ledger.scope_sums().items())
        lines += _family(
            "silogate_budget_spent_rho",
            "gauge",
            "Privacy budget spent (committed) per scope window, in rho.",
            ((_labels(scope=scope), float(spent)) for scope, (spent, _) in budgets),
        )
        lines += _family(
            "silogate_budget_reserved_rho",
            "gauge",
            "Privacy budget reserved (in flight or outcome unknown) per scope window, in rho.",
            ((_labels(scope=scope), float(reserved)) for scope, (_, reserved) in budgets),
        )
        return "\n".join(lines) + "\n"


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {_number(value)}" for labels, value in samples]
    return lines


class MetricsEndpoint:
    """``GET /metrics`` on a loopback address, served from a daemon thread."""

    def __init__(self, metrics: GatewayMetrics, address: str) -> None:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                try:
                    body = metrics.render().encode()
                except Exception:
                    log.exception("metrics could not be rendered")
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                # Scrapes are not requests of the service: keep them out of the request log.
                return

        server_class = type(
            "MetricsServer",
            (ThreadingHTTPServer,),
            {"address_family": _family_of(host), "daemon_threads": True},
        )
        try:
            self._server: ThreadingHTTPServer = server_class((host, int(port)), Handler)
        except OSError as err:
            raise ConfigurationError(
                f"cannot listen for metrics on {address}: {err.strerror}",
                reason="PORT_IN_USE",
                metadata={"address": address},
            ) from err
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="silogate-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("metrics endpoint listening", extra={"port": self.port})

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a loop never started
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()


def _family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
