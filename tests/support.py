"""Helpers shared by the tests (importable because pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from gateway.crypto.dev_ca import DevPki
from gateway.settings import GatewayConfig, SiloEndpoint, TlsConfig

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "policies"
T = TypeVar("T")


class BackgroundLoop:
    """An asyncio loop in a thread, so synchronous tests can talk to in-process aio servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def tls_config(files: Any) -> TlsConfig:
    return TlsConfig(ca=files.ca, cert=files.cert, key=files.key)


def gateway_config(system_root: Path, pki: DevPki, silo_addresses: dict[str, str]) -> GatewayConfig:
    return GatewayConfig(
        listen="127.0.0.1:0",
        tls=tls_config(pki.gateway),
        policy=POLICY,
        ledger=system_root / "state" / "ledger.sqlite",
        audit=system_root / "state" / "audit",
        silos={name: SiloEndpoint(address=address) for name, address in silo_addresses.items()},
    )
