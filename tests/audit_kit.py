"""Helpers for the audit log's own tests: keys, small logs, running ``silogate audit``."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from gateway.api.v1 import silo_service_pb2
from gateway.audit import jcs
from gateway.audit.checkpoint import CheckpointSigner, load_signing_key
from gateway.audit.log import AuditLog, AuditLogOptions
from gateway.cli import main
from gateway.policy.signing import generate_signing_key
from gateway.silo.receipt import STATEMENT_FIELDS, ReceiptSigner, receipt_to_record

ORIGIN = "test.silogate/audit"
# A fixed receipt key for the silo "civil" of the small logs (deterministic: same records each run).
CIVIL_RECEIPTS = ReceiptSigner(ECC.construct(curve="Ed25519", seed=bytes(range(32))))


def write_receipt_public_key(path: Path, signer: ReceiptSigner = CIVIL_RECEIPTS) -> Path:
    """The PEM public key of ``signer``, for ``--silo-key civil=PATH``."""
    path.write_text(signer.public_key.export_key(format="PEM") + "\n", encoding="ascii")
    return path


def civil_receipt(number: int, signer: ReceiptSigner = CIVIL_RECEIPTS) -> dict[str, Any]:
    """The recorded receipt of silo "civil" for ``request-<number>`` (signed)."""
    release = silo_service_pb2.MeasureRelease(
        measure_id="people",
        components=[silo_service_pb2.ComponentRelease(name="value", values=[1234 + number, 0])],
    )
    receipt = signer.sign(
        silo="civil",
        request_id=f"request-{number}",
        query_digest=f"{number:064x}",
        datasets=["civil.residents"],
        rho=Fraction(1, 200),
        releases=[release],
        released_at="2026-01-01T00:00:00.000+00:00",
    )
    return receipt_to_record(receipt)


@dataclass(frozen=True)
class LogKey:
    private: Path
    public: Path

    def signer(self, origin: str = ORIGIN) -> CheckpointSigner:
        return CheckpointSigner(load_signing_key(self.private), origin)

    def public_key(self) -> ECC.EccKey:
        return ECC.import_key(self.public.read_text())


def make_key(directory: Path, name: str = "log") -> LogKey:
    key = LogKey(directory / f"{name}.pem", directory / f"{name}.pub")
    generate_signing_key(key.private, key.public)
    return key


def query_record(number: int) -> dict[str, Any]:
    """A record shaped like the gateway's released query records."""
    return {
        "request_id": f"request-{number}",
        "consumer": "civil-affairs",
        "purpose": "elderly-care-planning",
        "policy_version": "ab" * 32,
        "rules": ["elderly-care"],
        "query": {"measures": [{"id": "people", "kind": "count"}], "group_by": ["community"]},
        "decision": "released",
        "rho": "1/200",
        "scales": {"people": 14.142135623730951},
        "values": [[["north"], "people", 1234.5 + number, False], [["south"], "people", 0.0, True]],
        "receipts": [civil_receipt(number)],
    }


def resign_receipt(receipt: dict[str, Any], request_id: str, private_key: Path) -> dict[str, Any]:
    """A recorded receipt for another request id, signed again with the silo's key (for logs
    filled with copies of real records)."""
    statement_fields = {**{k: receipt[k] for k in STATEMENT_FIELDS}, "request_id": request_id}
    statement = jcs.canonicalize(statement_fields)
    key = ECC.import_key(private_key.read_text())
    signature = eddsa.new(key, "rfc8032").sign(statement)
    return {
        **statement_fields,
        "digest": hashlib.sha256(statement).hexdigest(),
        "signature": base64.b64encode(signature).decode(),
    }


def write_log(directory: Path, key: LogKey | None, records: int, **options: Any) -> AuditLog:
    """A closed log of ``records`` query records (returned closed, for its attributes)."""
    log = AuditLog(
        directory,
        signer=key.signer() if key else None,
        options=AuditLogOptions(**options),
    )
    for number in range(records):
        log.append("query", query_record(number))
    log.close()
    return log


def silogate(*args: str | Path) -> tuple[int, str, str]:
    """Run ``silogate`` in process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, out.getvalue(), err.getvalue()


# -- a log written by the real gateway --------------------------------------------------------

ELDERLY = "elderly-care-planning"


@dataclass(frozen=True)
class AuditedSystem:
    """Logs left by a real gateway and four real silos (stopped), with their keys."""

    root: Path
    gateway_log: Path
    silo_logs: dict[str, Path]
    gateway_key: LogKey
    silo_key: LogKey
    received: dict[str, int]  # request id -> audit sequence of answers clients got


_audited: dict[tuple[int, int], AuditedSystem] = {}


def audited_system(
    factory: Any, pki: Any, data_dir: Path, records: int = 1000, queries: int = 12
) -> AuditedSystem:
    """Run real queries through an in-process gateway whose logs are signed, then fill its log
    to ``records`` records through the same ``AuditLog`` while the gateway still runs (copies of
    the records it wrote itself, under new request ids). ``queries`` released queries (the first
    two grouped by community when there are more than four), and as many explains, rejected and
    denied queries as a third of that. Built once per session and size."""
    if (records, queries) not in _audited:
        _audited[records, queries] = _run_audited(
            factory.mktemp("audited"), pki, data_dir, records, queries
        )
    return _audited[records, queries]


def _run_audited(root: Path, pki: Any, data_dir: Path, records: int, queries: int) -> AuditedSystem:
    from support import BackgroundLoop, gateway_config, silo_config

    from gateway.audit.store import iter_records
    from gateway.client import ClientError, SilogateClient, count, where
    from gateway.demo.stack import DEMO_SILOS
    from gateway.server.app import start_gateway
    from gateway.settings import AuditLogSettings
    from gateway.silo.app import start_silo

    gateway_key, silo_key = make_key(root, "gateway"), make_key(root, "silo")
    loop = BackgroundLoop()
    silos = {}
    for name in DEMO_SILOS:
        settings = AuditLogSettings(signing_key=silo_key.private, checkpoint_every_records=20)
        config = silo_config(root, pki, name, data_dir / f"{name}.duckdb", audit_log=settings)
        silos[name] = loop.run(start_silo(config))
    settings = AuditLogSettings(
        signing_key=gateway_key.private,
        checkpoint_every_records=100,
        checkpoint_every_seconds=3600,
        segment_max_bytes=128 << 10,
    )
    gateway_config_ = gateway_config(
        root, pki, {n: f"127.0.0.1:{s.port}" for n, s in silos.items()}, audit_log=settings
    )
    gateway = loop.run(start_gateway(gateway_config_))
    received: dict[str, int] = {}
    refusals: list[str] = []
    others = max(1, queries // 3)
    try:
        tls = pki.consumer("civil-affairs")
        address = f"127.0.0.1:{gateway.port}"
        with SilogateClient.connect(
            address, ca=tls.ca, cert=tls.cert, key=tls.key, timeout=30
        ) as client:
            for number in range(queries):
                request_id = f"released-{number}"
                result = client.query(
                    purpose=ELDERLY,
                    measures=[
                        count(
                            "aged",
                            "civil.residents",
                            where("birth_year", "<=", 1950 + number),
                            epsilon="0.01",
                        )
                    ],
                    group_by=["community"] if number < 2 and queries > 4 else [],
                    request_id=request_id,
                )
                received[request_id] = result.audit_sequence
            for _ in range(others):
                client.explain(
                    purpose=ELDERLY,
                    measures=[count("aged", "civil.residents", epsilon="0.01")],
                )
            for number in range(others):
                try:
                    client.query(
                        purpose=ELDERLY,
                        measures=[count("x", "nowhere.table", epsilon="0.01")],
                        request_id=f"rejected-{number}",
                    )
                except ClientError as err:
                    refusals.append(err.reason)
        tls = pki.consumer("org-department")
        with SilogateClient.connect(
            address, ca=tls.ca, cert=tls.cert, key=tls.key, timeout=30
        ) as client:
            for number in range(others):
                try:
                    client.query(
                        purpose="volunteer-planning",
                        measures=[count("patients", "health.chronic", epsilon="0.5")],
                        request_id=f"denied-{number}",
                    )
                except ClientError as err:
                    refusals.append(err.reason)
        # The scenario must really have produced refusals, not answers.
        assert len(refusals) == 2 * others and "POLICY_DENIED" in refusals, refusals
        audit = gateway.servicer.audit
        templates = [
            r
            for r in iter_records(gateway_config_.audit)
            if r["kind"] in ("query", "explain") and len(json.dumps(r)) < 4000
        ]
        number = 0
        while audit.size < records:
            template = templates[number % len(templates)]
            fields = {k: v for k, v in template.items() if k not in ("seq", "time", "kind")}
            if "request_id" in fields:
                fields["request_id"] = f"{fields['request_id']}-copy-{number}"
                if fields.get("receipts"):
                    fields["receipts"] = [
                        resign_receipt(r, fields["request_id"], pki.receipt_keys(r["silo"]).private)
                        for r in fields["receipts"]
                    ]
            audit.append(template["kind"], fields)
            number += 1
    finally:
        loop.run(gateway.stop(0))
        for silo in silos.values():
            loop.run(silo.stop(0))
        loop.close()
    return AuditedSystem(
        root,
        gateway_config_.audit,
        {name: root / "state" / f"silo-{name}" for name in silos},
        gateway_key,
        silo_key,
        received,
    )
