"""Load: 32 concurrent clients for 20 s, through the gateway and a silo, against a bare relay.

The system runs as real processes (``start_stack``: the gateway and four silo agents, mutual TLS)
on a copy of the demo bundle whose budgets do not run out (at epsilon 0.5 per query the demo's
would after a few hundred queries). Each client has its own channel and sends one RunQuery after
another: a count of residents grouped by district (four groups), with a new measure id each time,
so every query is a real release (an identical query would be answered from the cache at no
cost). Baseline, measured in the same run with the same clients, TLS and message shapes: a bare
two-hop relay, client -> relay -> echo server (``bench/relay.py``). A last, shorter phase repeats
one identical query to show the cached rate.

Targets (issue 6): throughput >= 0.5x the relay's, p99 latency <= 3x the relay's, zero errors.
The load generator is one asyncio process on the same machine: at high rates it is part of what
is measured, for the relay and the gateway alike. On a machine this small the system is bound by
CPU, so the report adds the CPU time per query of each process in both phases (Linux ``/proc``;
omitted elsewhere): the steadiest figures when other work shares the machine. Their sums show what
the throughput target asks: with every core busy, half the relay's rate leaves twice the relay
phase's CPU per query for the gateway, the silo and the load generator together.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from ruamel.yaml import YAML

from gateway.api.v1 import query_pb2, query_service_pb2, query_service_pb2_grpc
from gateway.crypto.channels import channel_credentials
from gateway.demo.stack import default_policy_dir, start_stack

CLIENTS = 32
SECONDS = 20.0
CACHED_SECONDS = 5.0
WARM_UP_SECONDS = 1.0
CONSUMER = "civil-affairs"
LARGE_RHO = "1000000"


@dataclass
class Phase:
    name: str
    latencies: list[float]
    errors: dict[str, int]
    seconds: float

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(int(p * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


def _large(budget: dict[str, object], period: str) -> dict[str, object]:
    """A budget of LARGE_RHO over ``period``, keeping its key_delta (data-dependent keys)."""
    kept = {"key_delta": budget["key_delta"]} if "key_delta" in budget else {}
    return {"rho": LARGE_RHO, "period": period, **kept}


def bench_bundle(root: Path) -> Path:
    """The demo bundle with every budget so large that the benchmark never exhausts it."""
    bundle = root / "policies"
    shutil.copytree(default_policy_dir(), bundle, ignore=shutil.ignore_patterns("tests"))
    yaml = YAML()
    populations = yaml.load((bundle / "populations.yaml").read_text())
    for population in populations["populations"].values():
        population["budget"] = _large(population["budget"], "lifetime")
    yaml.dump(populations, bundle / "populations.yaml")
    rules = yaml.load((bundle / "rules.yaml").read_text())
    for rule in rules["rules"].values():
        if "budget" in rule:
            rule["budget"] = _large(rule["budget"], rule["budget"].get("period", "lifetime"))
    yaml.dump(rules, bundle / "rules.yaml")
    return bundle


def _request(measure_id: str) -> query_service_pb2.RunQueryRequest:
    return query_service_pb2.RunQueryRequest(
        request_id=str(uuid.uuid4()),
        query=query_pb2.Query(
            purpose="elderly-care-planning",
            measures=[
                query_pb2.Measure(
                    id=measure_id,
                    dataset="civil.residents",
                    kind=query_pb2.MEASURE_KIND_COUNT,
                    spend=query_pb2.PrivacySpend(epsilon="0.5"),
                )
            ],
            group_by=["district"],
        ),
    )


async def _load(
    name: str,
    address: str,
    credentials: grpc.ChannelCredentials,
    measure_ids: Callable[[], str],
    seconds: float,
    on_measuring: Callable[[], None] | None = None,
) -> Phase:
    """``on_measuring`` is called once the warm-up is over, as the recorded queries start."""
    channels = [grpc.aio.secure_channel(address, credentials) for _ in range(CLIENTS)]
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def client(channel: grpc.aio.Channel, until: float, record: bool) -> None:
        stub = query_service_pb2_grpc.QueryServiceStub(channel)
        while time.perf_counter() < until:
            started = time.perf_counter()
            try:
                await stub.RunQuery(_request(measure_ids()), timeout=30)
            except grpc.aio.AioRpcError as err:
                if record:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1
                continue
            if record:
                latencies.append(time.perf_counter() - started)

    try:
        await asyncio.gather(*(c.channel_ready() for c in channels))
        warm_up = time.perf_counter() + WARM_UP_SECONDS
        await asyncio.gather(*(client(c, warm_up, record=False) for c in channels))
        if on_measuring is not None:
            on_measuring()
        started = time.perf_counter()
        await asyncio.gather(*(client(c, started + seconds, record=True) for c in channels))
        elapsed = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close()
    return Phase(name, latencies, errors, elapsed)


def _start_relay(
    certs: Path, run: Path, role: str, upstream: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    port_file = run / f"{role}.port"
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.relay", role, "--certs", str(certs)]
        + ["--port-file", str(port_file), "--upstream", upstream],
        cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"bench relay '{role}' did not start")
        time.sleep(0.05)
    return process, int(port_file.read_text())


def _cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU seconds of a process (this one by default), or None without /proc."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_line(what: str, cpu: dict[str, float], queries: int) -> str:
    if not cpu or not queries:
        return ""
    shares = ", ".join(f"{name} {seconds / queries * 1000:.2f}" for name, seconds in cpu.items())
    return f"load     CPU ms per {what} query: {shares}\n"


def _cpu_budget(
    relay_phase: Phase, relay_cpu: dict[str, float], cpu: dict[str, float], queries: int
) -> str:
    """What the throughput target leaves per query: on a machine whose cores are all busy (as
    here, with the load generator on the same cores), half the relay's rate allows twice the
    relay phase's CPU per query, for the gateway, the silo and the load generator together."""
    if not relay_cpu or not cpu or not queries or not relay_phase.latencies:
        return ""
    relay_ms = sum(relay_cpu.values()) / len(relay_phase.latencies) * 1000
    release_ms = sum(cpu.values()) / queries * 1000
    return (
        f"load     CPU ms per query, all measured processes: relay phase {relay_ms:.2f}, "
        f"release phase {release_ms:.2f}; the 0.5x target allows about {2 * relay_ms:.2f}\n"
    )


def _line(phase: Phase) -> str:
    errors = sum(phase.errors.values())
    return (
        f"load     {phase.name:<30} {phase.throughput:8.1f} queries/s  "
        f"p50 {phase.percentile(0.5) * 1000:7.2f} ms  p99 {phase.percentile(0.99) * 1000:7.2f} ms  "
        f"errors {errors}{' ' + str(phase.errors) if errors else ''}\n"
    )


def run(people: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stack = start_stack(
            root / "stack",
            people=people,
            seed=1,
            policy=bench_bundle(root),
            # 32 clients of one consumer: above the default limit of 8 requests in flight.
            gateway_settings={"limits": {"max_in_flight_per_consumer": CLIENTS}},
        )
        run_dir = root / "relay"
        run_dir.mkdir()
        relays: list[subprocess.Popen[bytes]] = []
        try:
            echo, echo_port = _start_relay(stack.pki.directory, run_dir, "echo")
            relays.append(echo)
            relay, relay_port = _start_relay(
                stack.pki.directory, run_dir, "relay", f"127.0.0.1:{echo_port}"
            )
            relays.append(relay)
            credentials = channel_credentials(stack.pki.consumer(CONSUMER))
            fresh = itertools.count()
            relay_pids: dict[str, int | None] = {
                "relay": relay.pid,
                "echo": echo.pid,
                "load generator": None,
            }
            pids: dict[str, int | None] = {
                "gateway": stack.processes["gateway"].pid,
                "silo-civil": stack.processes["silo-civil"].pid,
                "load generator": None,
            }
            relay_cpu: dict[str, float] = {}
            cpu: dict[str, float] = {}
            phases = asyncio.run(
                _phases(
                    stack.gateway_address,
                    f"127.0.0.1:{relay_port}",
                    credentials,
                    lambda: f"q{next(fresh)}",
                    (relay_pids, relay_cpu),
                    (pids, cpu),
                )
            )
        finally:
            for process in relays:
                process.send_signal(signal.SIGTERM)
                process.wait(10)
            stack.stop()
    relay_phase, gateway_phase, cached_phase = phases
    throughput_ratio = gateway_phase.throughput / relay_phase.throughput
    p99_ratio = gateway_phase.percentile(0.99) / relay_phase.percentile(0.99)
    errors = sum(gateway_phase.errors.values()) + sum(relay_phase.errors.values())
    sys.stdout.write(
        f"load     {CLIENTS} clients x {SECONDS:.0f} s, count by district, {people:,} people\n"
        + _line(relay_phase)
        + _line(gateway_phase)
        + _line(cached_phase)
        + _cpu_line("relay", relay_cpu, len(relay_phase.latencies))
        + _cpu_line("release", cpu, len(gateway_phase.latencies))
        + _cpu_budget(relay_phase, relay_cpu, cpu, len(gateway_phase.latencies))
        + f"load     throughput ratio gateway/relay {throughput_ratio:5.2f}x (target >= 0.5x: "
        f"{'met' if throughput_ratio >= 0.5 else 'MISSED'})\n"
        f"load     p99 ratio gateway/relay        {p99_ratio:5.2f}x (target <= 3x: "
        f"{'met' if p99_ratio <= 3 else 'MISSED'})\n"
        f"load     errors {errors} (target 0: {'met' if errors == 0 else 'MISSED'})\n"
    )


async def _phases(
    gateway: str,
    relay: str,
    credentials: grpc.ChannelCredentials,
    fresh_measure: Callable[[], str],
    relay_processes: tuple[dict[str, int | None], dict[str, float]],
    release_processes: tuple[dict[str, int | None], dict[str, float]],
) -> tuple[Phase, Phase, Phase]:
    """The three phases. Each pair of ``*_processes`` is (process ids, CPU seconds): the second
    receives each process's CPU seconds over the recorded part of the relay phase and of the
    gateway phase (the clients' last calls end a little after it: a slight over-count)."""
    relay_phase = await _measured(
        relay_processes,
        "relay (client->relay->echo)",
        relay,
        credentials,
        fresh_measure,
    )
    gateway_phase = await _measured(
        release_processes, "gateway+silo, new releases", gateway, credentials, fresh_measure
    )
    cached_phase = await _load(
        "gateway, cached repeats", gateway, credentials, lambda: "repeated", CACHED_SECONDS
    )
    return relay_phase, gateway_phase, cached_phase


async def _measured(
    processes: tuple[dict[str, int | None], dict[str, float]],
    name: str,
    address: str,
    credentials: grpc.ChannelCredentials,
    fresh_measure: Callable[[], str],
) -> Phase:
    """A phase of SECONDS with the CPU seconds of ``processes`` over its recorded part."""
    pids, cpu = processes
    before: dict[str, float | None] = {}
    phase = await _load(
        name,
        address,
        credentials,
        fresh_measure,
        SECONDS,
        on_measuring=lambda: before.update({n: _cpu_seconds(p) for n, p in pids.items()}),
    )
    for process, pid in pids.items():
        start, end = before[process], _cpu_seconds(pid)
        if start is not None and end is not None:
            cpu[process] = end - start
    return phase


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
