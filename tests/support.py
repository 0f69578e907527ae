"""Helpers shared by the tests (importable because pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ruamel.yaml import YAML

from gateway.crypto.dev_ca import GATEWAY_IDENTITY, DevPki
from gateway.settings import GatewayConfig, SiloConfig, SiloEndpoint, TlsConfig
from gateway.silo.app import SiloProcess, start_silo

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


def gateway_config(
    system_root: Path,
    pki: DevPki,
    silo_addresses: dict[str, str],
    *,
    policy: Path = POLICY,
    **options: Any,
) -> GatewayConfig:
    """A gateway on port 0. Hot reload is off unless asked for (``policy_reload_seconds``): the
    shared ``policies/`` folder is edited while tests run, and a reload mid-test would flake."""
    return GatewayConfig(
        listen="127.0.0.1:0",
        tls=tls_config(pki.gateway),
        policy=policy,
        ledger=system_root / "state" / "ledger.sqlite",
        audit=system_root / "state" / "audit",
        silos={
            name: SiloEndpoint(address=address, receipt_key=pki.receipt_keys(name).public)
            for name, address in silo_addresses.items()
        },
        **{"policy_reload_seconds": 0.0, **options},
    )


def silo_config(
    system_root: Path,
    pki: DevPki,
    silo: str,
    database: Path,
    *,
    policy: Path = POLICY,
    **options: Any,
) -> SiloConfig:
    """A silo agent on port 0; hot reload off unless asked for, as for :func:`gateway_config`."""
    return SiloConfig(
        silo=silo,
        tls=tls_config(pki.silo(silo)),
        policy=policy,
        database=database,
        release_log=system_root / "state" / f"silo-{silo}",
        gateway_identity=GATEWAY_IDENTITY,
        receipt_key=pki.receipt_keys(silo).private,
        **{"policy_reload_seconds": 0.0, **options},
    )


def silo_endpoints(pki: DevPki, addresses: dict[str, str]) -> dict[str, dict[str, str]]:
    """The ``silos`` section of a gateway config file (YAML/JSON form) for silos at
    ``addresses``, with each silo's public receipt key."""
    return {
        name: {"address": address, "receipt_key": str(pki.receipt_keys(name).public)}
        for name, address in addresses.items()
    }


def start_silos(
    loop: BackgroundLoop,
    pki: DevPki,
    data_dir: Path,
    system_root: Path,
    names: Sequence[str],
    *,
    policy: Path = POLICY,
) -> dict[str, SiloProcess]:
    """In-process silo agents on port 0 over the session's DuckDB files, one per name."""
    return {
        name: loop.run(
            start_silo(
                silo_config(system_root, pki, name, data_dir / f"{name}.duckdb", policy=policy)
            )
        )
        for name in names
    }


def wait_until(condition: Callable[[], T], timeout: float = 15.0, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy (returned), failing after ``timeout``.

    For effects that happen in the background (a policy reload): a fixed sleep is either too
    short on a loaded machine or wastes time on an idle one."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = condition()
        if outcome:
            return outcome
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {outcome!r})")
        time.sleep(interval)


def _save(path: Path, yaml: YAML, document: Any) -> None:
    """Write ``document`` to ``path`` as editors save: a new file renamed into place. A watcher
    never sees it empty or half-written: an unsigned bundle with an empty ``rules.yaml`` is
    valid, and a loaded CI machine once paused an in-place writer between truncating and
    writing for longer than the tests' reload interval, so the silo activated that bundle."""
    temporary = path.with_name(f".{path.name}.saving")  # hidden: not part of the bundle
    with temporary.open("w", encoding="utf-8") as handle:
        yaml.dump(document, handle)
    temporary.replace(path)


def edit_rule(bundle: Path, rule: str, **values: str) -> None:
    """Change fields of one rule in ``bundle/rules.yaml``, keeping the rest as written."""
    yaml = YAML()
    path = bundle / "rules.yaml"
    document = yaml.load(path.read_text(encoding="utf-8"))
    document["rules"][rule].update(values)
    _save(path, yaml, document)


def set_silo_budget(bundle: Path, dataset: str, budget: dict[str, str]) -> None:
    """Give ``dataset`` in ``bundle/datasets.yaml`` the silo cap ``budget``, keeping the rest."""
    yaml = YAML()
    path = bundle / "datasets.yaml"
    document = yaml.load(path.read_text(encoding="utf-8"))
    document["datasets"][dataset]["silo_budget"] = budget
    _save(path, yaml, document)
