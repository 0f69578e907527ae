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
    """Where a silo listens, the DNS name its certificate must carry (by default
    ``<silo>.silo.silogate.local``; the gateway verifies it instead of the address), and the
    public key its receipts must verify with."""

    address: Address
    server_name: str | None = None
    # The silo's public receipt key (PEM, from `silogate silo keygen` or `certs init`): every
    # release's signed receipt is checked with it before the gateway uses the values.
    receipt_key: Path


# The metrics endpoint is plain HTTP without authentication: loopback only, for a local scraper
# (or a sidecar that adds TLS).
LoopbackAddress = Annotated[
    str, Field(pattern=r"^(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|localhost|\[::1\]):\d{1,5}$")
]


class GatewayLimits(_Config):
    """Caps on what one request may ask for and on how many a consumer may have in flight.

    Every cap refuses before any budget is reserved (docs/gateway-operators.md)."""

    # Larger requests are refused by gRPC itself (RESOURCE_EXHAUSTED) before they are parsed.
    max_request_bytes: Annotated[int, Field(ge=4096, le=64 * 1024 * 1024)] = 1024 * 1024
    max_measures: Annotated[int, Field(ge=1, le=256)] = 16
    max_filters_per_measure: Annotated[int, Field(ge=0, le=256)] = 32
    # The query parser's own hard cap is 1000 values per IN list.
    max_in_values: Annotated[int, Field(ge=1, le=1000)] = 1000
    # Groups of one answer: the product of the group-by key-set sizes.
    max_groups: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    # Values of one answer (groups x measures): keeps an answer well below the 4 MiB that gRPC
    # clients accept by default.
    max_values: Annotated[int, Field(ge=1, le=1_000_000)] = 20_000
    max_in_flight_per_consumer: Annotated[int, Field(ge=1, le=10_000)] = 8
    # The least time a silo round trip needs; a RunQuery whose remaining deadline (after the
    # gateway's own margin) is shorter is refused with DEADLINE_TOO_SHORT before reserving.
    min_silo_seconds: Annotated[float, Field(gt=0, le=60)] = 0.2


class AuditLogSettings(_Config):
    """Checkpoint signing and segment rotation of an audit log (gateway log or silo release log).

    Without ``signing_key`` the records are still chained in the Merkle tree but no checkpoint
    is signed (a warning at start-up): auditors can then prove nothing against a signed root.
    """

    # Ed25519 private key (PEM) from `silogate audit keygen`; auditors get the public half.
    signing_key: Path | None = None
    # The checkpoint origin line (the log's name); by default silogate/gateway or
    # silogate/silo/<name>.
    origin: Annotated[str, Field(pattern=r"^[^\s+]{1,256}$")] | None = None
    checkpoint_every_records: Annotated[int, Field(ge=1, le=10_000_000)] = 1000
    checkpoint_every_seconds: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    segment_max_bytes: Annotated[int, Field(ge=4096, le=1 << 30)] = 64 << 20
    segment_max_seconds: Annotated[float, Field(gt=0, le=366 * 86_400)] = 86_400.0
    # A larger record is refused at append time (the request fails; nothing is released).
    max_record_bytes: Annotated[int, Field(ge=1024, le=64 << 20)] = 1 << 20


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
    limits: GatewayLimits = GatewayLimits()
    # Prometheus text endpoint (GET /metrics); off unless set, e.g. "127.0.0.1:9464".
    metrics_listen: LoopbackAddress | None = None
    audit_log: AuditLogSettings = AuditLogSettings()


class EngineSettings(_Config):
    """Resources of the silo's embedded DuckDB (the release SQL spills to disk beyond them)."""

    memory_limit: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?\s*(KB|MB|GB|KiB|MiB|GiB)$")] = (
        "512MB"
    )
    threads: Annotated[int, Field(ge=1, le=256)] = 2
    # Exact (pre-noise) results kept in memory per compiled release SQL (0: none); see
    # gateway.silo.engine.ExactResultCache. Noise, caps, receipts and logs are per release.
    result_cache_entries: Annotated[int, Field(ge=0, le=100_000)] = 256


class SiloConfig(_Config):
    silo: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_\-]*$")]
    listen: Address = "127.0.0.1:0"
    tls: TlsConfig
    policy: Path
    database: Path
    release_log: Path
    gateway_identity: str
    # The silo's Ed25519 private key (PEM) that signs its release receipts; the gateway and
    # auditors hold the public half.
    receipt_key: Path
    reflection: bool = False
    policy_verify_key: Path | None = None
    policy_reload_seconds: ReloadSeconds = 2.0
    audit_log: AuditLogSettings = AuditLogSettings()
    # The silo's own ledger of its per-dataset caps (`silo_budget` in policy); by default beside
    # the release log, as `<release_log>.caps.sqlite`.
    caps_ledger: Path | None = None
    # Time zone of the caps' calendar periods (day, month, ...).
    time_zone: str = "UTC"
    engine: EngineSettings = EngineSettings()

    @property
    def caps_ledger_path(self) -> Path:
        if self.caps_ledger is not None:
            return self.caps_ledger
        return self.release_log.with_name(self.release_log.name + ".caps.sqlite")


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
    "receipt_key",
    "caps_ledger",
    "signing_key",
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
