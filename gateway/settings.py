"""Configuration files of the gateway and the silo agents (YAML, validated with pydantic).

Relative paths in a config file are relative to the file's folder. Precedence: defaults < file <
command-line flags (the CLI overrides fields after loading). Dangerous modes (reflection) are
explicit opt-ins that default to off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from gateway.crypto.dev_ca import TlsFiles
from gateway.errors import ConfigurationError

Address = Annotated[str, Field(pattern=r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")]
# How often the policy folder is polled for a new bundle; 0 turns hot reload off.
ReloadSeconds = Annotated[float, Field(ge=0, le=3600)]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Config):
    """PEM files: the CA that signs every peer, this process's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def files(self) -> TlsFiles:
        return TlsFiles(ca=self.ca, cert=self.cert, key=self.key)


class SiloEndpoint(_Config):
    """Where a silo listens, and the DNS name its certificate must carry (by default
    ``<silo>.silo.silogate.local``; the gateway verifies it instead of the address)."""

    address: Address
    server_name: str | None = None


class GatewayConfig(_Config):
    listen: Address = "127.0.0.1:50051"
    tls: TlsConfig
    policy: Path
    ledger: Path
    audit: Path
    silos: dict[str, SiloEndpoint]
    reflection: bool = False
    silo_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    policy_verify_key: Path | None = None
    policy_reload_seconds: ReloadSeconds = 2.0
    # Refreshing budget periods (day, month, quarter, year) are calendar windows of this zone.
    time_zone: str = "UTC"


class SiloConfig(_Config):
    silo: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_\-]*$")]
    listen: Address = "127.0.0.1:0"
    tls: TlsConfig
    policy: Path
    database: Path
    release_log: Path
    gateway_identity: str
    reflection: bool = False
    policy_verify_key: Path | None = None
    policy_reload_seconds: ReloadSeconds = 2.0


C = TypeVar("C", bound=BaseModel)
_PATH_KEYS = {
    "ca",
    "cert",
    "key",
    "policy",
    "policy_verify_key",
    "ledger",
    "audit",
    "database",
    "release_log",
}


def _resolve_paths(node: object, base: Path) -> object:
    if isinstance(node, dict):
        return {
            k: (
                str(base / v) if k in _PATH_KEYS and isinstance(v, str) else _resolve_paths(v, base)
            )
            for k, v in node.items()
        }
    return node


def load_config(path: Path, model: type[C]) -> C:
    """Read and validate a config file; every problem is one clear ConfigurationError."""
    try:
        raw = YAML(typ="safe").load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigurationError(f"cannot read config file {path}: {err.strerror}") from err
    except YAMLError as err:
        raise ConfigurationError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigurationError(f"config file {path} must be a mapping")
    try:
        return model.model_validate(_resolve_paths(raw, Path(path).resolve().parent))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise ConfigurationError(f"config file {path}: {problems}") from err


class ClientConfig(_Config):
    """What a department system needs to call the gateway: its address and certificate files."""

    address: Address
    tls: TlsConfig
