"""Runs the whole system on loopback: four silo agents and the gateway, as separate processes.

Used by ``silogate demo`` (start, run the scenario, stop), ``silogate up`` (start and wait) and the
end-to-end tests. Every process binds port 0 (or the port asked for) and reports the bound port
through a file, so nothing collides with whatever else runs on the machine.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from ruamel.yaml import YAML

from gateway.crypto.dev_ca import GATEWAY_IDENTITY, DevPki, init_dev_pki
from gateway.demo.synthetic import generate_departments
from gateway.errors import ConfigurationError
from gateway.policy.signing import generate_signing_key

DEMO_SILOS = ("org", "civil", "health", "events")
DEMO_CONSUMERS = ("civil-affairs", "org-department", "grid-centre", "health-commission")
_START_TIMEOUT = 60.0


def default_policy_dir() -> Path:
    """The demo bundle: ``policies/`` of the source tree (it is not shipped in the wheel)."""
    for candidate in (Path(__file__).resolve().parents[2] / "policies", Path.cwd() / "policies"):
        if candidate.is_dir():
            return candidate
    raise ConfigurationError(
        "the demo policy bundle 'policies/' was not found; run from the source tree",
        reason="CONFIG_INVALID",
    )


def _write_yaml(path: Path, content: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        YAML(typ="safe", pure=True).dump(content, handle)
    return path


def _tls(pki: DevPki, role: str, name: str = "") -> dict[str, str]:
    files = pki.gateway if role == "gateway" else getattr(pki, role)(name)
    return {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)}


# Raised whenever the generated tables change shape, so that older generated data is rebuilt.
DATA_LAYOUT = 2


def prepare_data(workdir: Path, people: int, seed: int, *, progress: bool = False) -> Path:
    """Generate the silo databases unless the same (people, seed, layout) is already there."""
    data = workdir / "data"
    marker = data / "generated.json"
    wanted = {"people": people, "seed": seed, "layout": DATA_LAYOUT}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return data
    generate_departments(data, people, seed, progress=progress)
    marker.write_text(json.dumps(wanted))
    return data


@dataclass
class Stack:
    """A running system: processes by name, the gateway address, certificates and client files."""

    workdir: Path
    pki: DevPki
    gateway_address: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def client_config(self, consumer: str) -> Path:
        return _write_yaml(
            self.workdir / "clients" / f"{consumer}.yaml",
            {"address": self.gateway_address, "tls": _tls(self.pki, "consumer", consumer)},
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process (graceful shutdown), then SIGKILL what is left."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _start(stack: Stack, name: str, role: str, config: Path, listen: str | None = None) -> int:
    port_file = stack.workdir / "run" / f"{name}.port"
    port_file.parent.mkdir(parents=True, exist_ok=True)
    port_file.unlink(missing_ok=True)
    log_path = stack.workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "gateway.cli", "serve", role, "--config", str(config)]
    command += ["--port-file", str(port_file)] + (["--listen", listen] if listen else [])
    with log_path.open("ab") as log:
        stack.processes[name] = subprocess.Popen(command, stdout=log, stderr=log)
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if port_file.is_file():
            return int(port_file.read_text())
        if stack.processes[name].poll() is not None:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            raise ConfigurationError(
                f"{name} failed to start: {lines[-1] if lines else 'no output'} (log: {log_path})",
                reason="START_FAILED",
            )
        time.sleep(0.05)
    raise ConfigurationError(
        f"{name} did not start within {_START_TIMEOUT:.0f} s", reason="START_FAILED"
    )


def start_stack(
    workdir: Path,
    *,
    people: int,
    seed: int,
    gateway_port: int = 0,
    policy: Path | None = None,
    gateway_settings: Mapping[str, object] | None = None,
    on_step: Callable[[str], None] = lambda _: None,
) -> Stack:
    """Data, certificates, configs, then the four silos and the gateway. Stops all on failure.

    ``gateway_settings`` adds to (or overrides) the gateway's config file, e.g. ``limits`` or
    ``metrics_listen``."""
    workdir = workdir.resolve()
    policy = (policy or default_policy_dir()).resolve()
    on_step(f"synthetic departments: {people:,} people (seed {seed})")
    data = prepare_data(workdir, people, seed, progress=True)
    on_step("development CA and certificates")
    pki = init_dev_pki(
        workdir / "certs", silos=DEMO_SILOS, consumers=DEMO_CONSUMERS, overwrite=True
    )
    state = workdir / "state"
    shutil.rmtree(state, ignore_errors=True)  # a fresh ledger and audit log for every run
    # Checkpoint keys for the logs (one for the gateway, one shared by the demo's silos);
    # auditors verify with the .pub files: silogate audit verify DIR --key ...pub
    audit_keys = workdir / "keys"
    for owner in ("gateway-audit", "silo-audit"):
        generate_signing_key(
            audit_keys / f"{owner}.pem", audit_keys / f"{owner}.pub", overwrite=True
        )
    stack = Stack(workdir, pki)
    try:
        addresses = {}
        for silo in DEMO_SILOS:
            config = _write_yaml(
                workdir / "config" / f"silo-{silo}.yaml",
                {
                    "silo": silo,
                    "listen": "127.0.0.1:0",
                    "tls": _tls(pki, "silo", silo),
                    "policy": str(policy),
                    "database": str(data / f"{silo}.duckdb"),
                    "release_log": str(state / f"silo-{silo}"),
                    "gateway_identity": GATEWAY_IDENTITY,
                    # Signs the silo's release receipts; the gateway checks them with the .pub.
                    "receipt_key": str(pki.receipt_keys(silo).private),
                    "audit_log": {"signing_key": str(audit_keys / "silo-audit.pem")},
                },
            )
            on_step(f"silo agent '{silo}'")
            addresses[silo] = f"127.0.0.1:{_start(stack, f'silo-{silo}', 'silo', config)}"
        gateway_config = _write_yaml(
            workdir / "config" / "gateway.yaml",
            {
                "listen": f"127.0.0.1:{gateway_port}",
                "tls": _tls(pki, "gateway"),
                "policy": str(policy),
                "ledger": str(state / "gateway" / "ledger.sqlite"),
                "audit": str(state / "gateway" / "audit"),
                "silos": {
                    silo: {"address": address, "receipt_key": str(pki.receipt_keys(silo).public)}
                    for silo, address in addresses.items()
                },
                "audit_log": {"signing_key": str(audit_keys / "gateway-audit.pem")},
                **(gateway_settings or {}),
            },
        )
        on_step("gateway")
        stack.gateway_address = f"127.0.0.1:{_start(stack, 'gateway', 'gateway', gateway_config)}"
    except BaseException:
        stack.stop()
        raise
    return stack


def run_up(directory: Path, *, people: int, seed: int, port: int) -> int:
    """``silogate up``: start everything and keep it running until interrupted."""
    console = Console()
    stack = start_stack(
        directory,
        people=people,
        seed=seed,
        gateway_port=port,
        on_step=lambda step: console.print(f"[dim]starting[/] {step}"),
    )
    try:
        for consumer in DEMO_CONSUMERS:
            console.print(f"client config for {consumer}: {stack.client_config(consumer)}")
        console.print(f"[bold green]gateway listening on {stack.gateway_address}[/] (Ctrl-C stops)")
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        signal.sigwait(stop_signals)
    finally:
        console.print("stopping")
        stack.stop()
    return 0
