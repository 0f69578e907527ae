"""Shared fixtures: a running system (four silos and the gateway, in-process, real mutual TLS on
port 0, real DuckDB files) for the whole test session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import BackgroundLoop, gateway_config, silo_config

from gateway.client import SilogateClient
from gateway.crypto.dev_ca import DevPki, init_dev_pki
from gateway.demo.stack import DEMO_CONSUMERS, DEMO_SILOS
from gateway.demo.synthetic import generate_departments
from gateway.server.app import GatewayProcess, start_gateway
from gateway.settings import GatewayConfig
from gateway.silo.app import SiloProcess, start_silo

PEOPLE = 20_000
SEED = 7


@dataclass
class System:
    root: Path
    data: Path
    pki: DevPki
    loop: BackgroundLoop
    silos: dict[str, SiloProcess]
    gateway: GatewayProcess
    gateway_config: GatewayConfig

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def client(self, consumer: str, **options: Any) -> SilogateClient:
        tls = self.pki.consumer(consumer)
        return SilogateClient.connect(
            self.address, ca=tls.ca, cert=tls.cert, key=tls.key, timeout=30, **options
        )

    def silo_address(self, silo: str) -> str:
        return f"127.0.0.1:{self.silos[silo].port}"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data")
    generate_departments(data, PEOPLE, SEED)
    return data


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(
        tmp_path_factory.mktemp("certs"),
        silos=DEMO_SILOS,
        consumers=(*DEMO_CONSUMERS, "stranger"),
    )


@pytest.fixture(scope="session")
def system(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, pki: DevPki
) -> Iterator[System]:
    root = tmp_path_factory.mktemp("system")
    loop = BackgroundLoop()
    silos: dict[str, SiloProcess] = {}
    for name in DEMO_SILOS:
        silos[name] = loop.run(
            start_silo(silo_config(root, pki, name, data_dir / f"{name}.duckdb"))
        )
    config = gateway_config(root, pki, {n: f"127.0.0.1:{s.port}" for n, s in silos.items()})
    gateway = loop.run(start_gateway(config))
    yield System(root, data_dir, pki, loop, silos, gateway, config)
    loop.run(gateway.stop(0))
    for silo in silos.values():
        loop.run(silo.stop(0))
    loop.close()
