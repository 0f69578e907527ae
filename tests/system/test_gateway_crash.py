"""Crash: the gateway process is killed with SIGKILL at random moments under load, 100 times.

After every kill the ledger must open cleanly and its running sums must agree with its charges;
at the end, every answer a consumer received is charged (committed), no request id is charged
twice, and no scope exceeds its limit. Silos run in-process; the gateway is a real process.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from small_budgets import COST, bundle_with_small_budgets
from support import BackgroundLoop, silo_endpoints, start_silos, tls_config

from gateway.budget.ledger import PrivacyLedger
from gateway.client import ClientError, SilogateClient, count

KILLS = int(os.environ.get("SILOGATE_CRASH_KILLS", "100"))
LIMIT = 100_000  # queries the population budget admits


def _start_gateway(config: Path, port_file: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file.unlink(missing_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "gateway", "--config", str(config)]
            + ["--port-file", str(port_file)],
            stdout=out,
            stderr=out,
        )
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.02)
    return process, int(port_file.read_text())


@pytest.mark.slow
def test_sigkill_under_load_never_undercharges(data_dir: Path, pki, tmp_path: Path) -> None:
    # Enough budget that releases go on through all the kills, small enough to be exact.
    bundle = bundle_with_small_budgets(tmp_path, admitted=LIMIT)
    loop = BackgroundLoop()
    silos = start_silos(loop, pki, data_dir, tmp_path, ("civil", "events"), policy=bundle)
    ledger_path = tmp_path / "state" / "ledger.sqlite"
    config = tmp_path / "gateway.yaml"
    gateway_tls = tls_config(pki.gateway)
    with config.open("w") as handle:
        YAML(typ="safe", pure=True).dump(
            {
                "listen": "127.0.0.1:0",
                "tls": {k: str(v) for k, v in gateway_tls.model_dump().items()},
                "policy": str(bundle),
                "ledger": str(ledger_path),
                "audit": str(tmp_path / "state" / "audit"),
                "silos": silo_endpoints(pki, {n: f"127.0.0.1:{s.port}" for n, s in silos.items()}),
            },
            handle,
        )
    rng = random.Random(20261125)
    received: dict[str, str] = {}  # request id -> rho of an answer that reached the consumer
    lock = threading.Lock()
    tls = pki.consumer("grid-centre")
    try:
        for round_number in range(KILLS):
            process, port = _start_gateway(
                config, tmp_path / "gateway.port", tmp_path / "gateway.log"
            )
            stop = threading.Event()

            def load(
                worker: int,
                port: int = port,
                round_number: int = round_number,
                stop: threading.Event = stop,
            ) -> None:
                with SilogateClient.connect(
                    f"127.0.0.1:{port}", ca=tls.ca, cert=tls.cert, key=tls.key, retries=0, timeout=5
                ) as client:
                    sequence = 0
                    while not stop.is_set():
                        request_id = f"crash-{round_number}-{worker}-{sequence}"
                        sequence += 1
                        try:
                            result = client.query(
                                purpose="casework-monitoring",
                                measures=[
                                    count(
                                        f"n_{round_number}_{worker}_{sequence}",
                                        "events.cases",
                                        epsilon="0.1",
                                    )
                                ],
                                request_id=request_id,
                            )
                        except ClientError:
                            continue  # refused, exhausted or killed mid-call: fine
                        with lock:
                            received[request_id] = result.rho

            with ThreadPoolExecutor(max_workers=4) as pool:
                workers = [pool.submit(load, w) for w in range(4)]
                time.sleep(rng.uniform(0.0, 0.25))
                process.send_signal(signal.SIGKILL)
                process.wait(10)
                stop.set()
                for worker in workers:
                    worker.result(30)
            # The ledger must open cleanly after every kill, with consistent running sums.
            reopened = PrivacyLedger(ledger_path)
            reopened.verify()
            reopened.close()
    finally:
        for silo in silos.values():
            loop.run(silo.stop(0))
        loop.close()

    import sqlite3

    with sqlite3.connect(ledger_path) as db:
        states = dict(
            db.execute(
                "SELECT request_id, state FROM reservations WHERE consumer = 'grid-centre'"
            ).fetchall()
        )
        charged = db.execute(
            "SELECT c.scope, c.rho FROM charges c JOIN reservations r USING (consumer, request_id) "
            "WHERE r.state != 'cancelled'"
        ).fetchall()
    assert received, "no query was answered at all"
    # Evidence that kills hit reservations in flight (they stay charged, never cancelled).
    in_flight = sum(state == "reserved" for state in states.values())
    print(f"answers received {len(received)}, reservations left in flight {in_flight}")
    assert all(states.get(request_id) == "committed" for request_id in received)
    assert all(Fraction(rho) == COST for rho in received.values())
    population = sum(
        (Fraction(rho) for scope, rho in charged if scope.startswith("population:")), Fraction(0)
    )
    assert population <= LIMIT * COST  # never beyond the population's limit
    assert len(received) * COST <= population  # every delivered answer is charged
