"""The ``silogate audit`` command group: one registration function, one handler per subcommand.

:func:`register_audit_commands` adds the group to ``silogate``'s parser. Each subcommand is
added by its own ``_add_*`` function and runs its own handler, importing what it needs only
when it runs, so ``silogate --help`` stays fast. Handlers print results on stdout and return the
exit code (0 all holds, 1 something failed); damaged input is reported, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress

    from gateway.audit.reconcile import SiloLog

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]


def register_audit_commands(commands: Subcommands) -> None:
    """Add ``silogate audit ...`` to the top-level subcommands of ``silogate``."""
    audit = commands.add_parser("audit", help="verify, prove and explore the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    _add_keygen(audit_commands)
    _add_verify(audit_commands)
    _add_prove(audit_commands)
    _add_check_proof(audit_commands)
    _add_search(audit_commands)
    _add_report(audit_commands)
    _add_reconcile(audit_commands)


# -- keygen -----------------------------------------------------------------------------------


def _add_keygen(commands: Subcommands) -> None:
    keygen = commands.add_parser("keygen", help="create an Ed25519 checkpoint signing key")
    keygen.add_argument("private", type=Path, help="private key file (written mode 0600)")
    keygen.add_argument("public", type=Path, help="public key file, for auditors (--key)")
    keygen.add_argument("--overwrite", action="store_true", help="replace existing key files")
    keygen.set_defaults(handler=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    # The same Ed25519 PEM key pair as policy signing, but its own pair: a log key signs what
    # happened, a policy key what may happen; one leaked key must not forge the other.
    from gateway.policy.signing import generate_signing_key

    key_id = generate_signing_key(args.private, args.public, overwrite=args.overwrite)
    sys.stdout.write(
        f"checkpoint key {key_id}: private key {args.private} (configure it as "
        f"audit_log.signing_key), public key {args.public} (give it to auditors)\n"
    )
    return 0


# -- verify -----------------------------------------------------------------------------------


def _add_verify(commands: Subcommands) -> None:
    verify = commands.add_parser(
        "verify",
        help="check every record, root, checkpoint signature and consistency",
        description="Exit 0 when every record is in sequence and canonical, every checkpoint "
        "is signed by one of the keys and matches the records, and (with --state) the log "
        "only grew since the checkpoint verified last time; otherwise list the first "
        "failures (file, line, sequence number) and exit 1.",
    )
    verify.add_argument("directory", type=Path, help="the audit log directory")
    verify.add_argument(
        "--key",
        type=Path,
        action="append",
        required=True,
        help="the log's public checkpoint key (repeat for keys used before a rotation)",
    )
    verify.add_argument(
        "--state",
        type=Path,
        help="file remembering the last verified checkpoint and its tree; read, then updated "
        "on success. The records it covers are not checked again (the new ones are, and the "
        "latest checkpoint is proved to extend it) unless --full is given",
    )
    verify.add_argument(
        "--full",
        action="store_true",
        help="with --state: check every record again, not only those after the remembered size",
    )
    verify.add_argument(
        "--allow-archived",
        action="store_true",
        help="start from the first segment present (older segments were archived)",
    )
    verify.add_argument(
        "--max-failures", type=int, default=20, help="failures to list (default 20)"
    )
    verify.add_argument(
        "--silo-key",
        type=_silo_key,
        action="append",
        default=[],
        metavar="NAME=PUB",
        help="a silo's public receipt key: its receipts' signatures are verified (repeat per "
        "silo, and for keys used before a rotation); receipts of other silos are reported as "
        "not checked",
    )
    verify.add_argument(
        "--jobs",
        type=_positive_count,
        metavar="N",
        help="worker processes checking records and receipt signatures (default: one per "
        "CPU; 1 checks in this process); findings are the same for any N",
    )
    verify.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="the report as text (default) or as one JSON object (verdict, counts, latest "
        "checkpoint, findings with file, line and sequence number); the exit code is the same",
    )
    verify.set_defaults(handler=_verify)


def _silo_key(text: str) -> tuple[str, Path]:
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=PUB (e.g. civil=keys/civil.pub)")
    return name, Path(path)


def _silo_keys(pairs: list[tuple[str, Path]]) -> dict[str, list[Path]]:
    keys: dict[str, list[Path]] = {}
    for name, path in pairs:
        keys.setdefault(name, []).append(path)
    return keys


def _verify(args: argparse.Namespace) -> int:
    from gateway.audit.verify import verify_log

    with _verify_progress(enabled=sys.stderr.isatty()) as progress:
        task = progress.add_task("verifying records", total=None)
        report = verify_log(
            args.directory,
            keys=args.key,
            state_file=args.state,
            full=args.full,
            allow_archived=args.allow_archived,
            max_failures=args.max_failures,
            silo_keys=_silo_keys(args.silo_key),
            jobs=args.jobs,
            progress=lambda done, total: progress.update(
                task, completed=done, total=total, refresh=True
            ),
        )
    if args.format == "json":
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        sys.stdout.write(report.render())
    return 0 if report.ok else 1


def _verify_progress(*, enabled: bool) -> Progress:
    """A bar on standard error while the records are read (a terminal only: logs and pipes
    get the report alone), gone once the report is written. It is redrawn as the verifier
    reports, not by a thread of its own, so that worker processes can still be forked from
    this single-threaded process (see ``gateway.audit._record_checks``)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        auto_refresh=False,
        transient=True,
        disable=not enabled,
    )


# -- prove / check-proof ----------------------------------------------------------------------


def _add_prove(commands: Subcommands) -> None:
    prove = commands.add_parser(
        "prove",
        help="export a self-contained inclusion proof for a request's records",
        description="Write a JSON bundle with the records of a request id, their inclusion "
        "proofs and the signed checkpoint they are proved against; 'silogate audit "
        "check-proof' verifies it offline with the log's public key.",
    )
    prove.add_argument("directory", type=Path, help="the audit log directory")
    prove.add_argument("--request-id", required=True, help="the request id to prove")
    prove.add_argument("--out", type=Path, help="write the bundle here (default: stdout)")
    prove.set_defaults(handler=_prove)


def _prove(args: argparse.Namespace) -> int:
    from gateway.audit.proofs import export_proof

    bundle = export_proof(args.directory, args.request_id)
    if args.out is None:
        sys.stdout.write(bundle)
    else:
        args.out.write_text(bundle, encoding="utf-8")
        sys.stdout.write(f"proof bundle written to {args.out}\n")
    return 0


def _add_check_proof(commands: Subcommands) -> None:
    check = commands.add_parser(
        "check-proof", help="verify a proof bundle offline with the log's public key"
    )
    check.add_argument("bundle", type=Path, help="a bundle from 'silogate audit prove'")
    check.add_argument(
        "--key", type=Path, action="append", required=True, help="the log's public key"
    )
    check.set_defaults(handler=_check_proof)


def _check_proof(args: argparse.Namespace) -> int:
    from gateway.audit.proofs import check_proof_file

    result = check_proof_file(args.bundle, args.key)
    sys.stdout.write(result.render())
    return 0 if result.ok else 1


# -- search / report / reconcile (the auditor's tools over records) ---------------------------


def _iso_time(text: str) -> dt.datetime:
    from gateway.audit.search import parse_time

    try:
        return parse_time(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive whole number")
    return int(text)


def _add_search(commands: Subcommands) -> None:
    search = commands.add_parser(
        "search",
        help="find records by consumer, dataset, purpose, decision, time or policy version",
        description="Print the records that match every given filter; a filter given several "
        "times matches any of its values. Times are ISO 8601 (without a zone: UTC); --since "
        "is inclusive, --until exclusive.",
    )
    search.add_argument("directory", type=Path, help="the audit log directory")
    search.add_argument("--consumer", action="append", default=[], help="consumer name")
    search.add_argument("--dataset", action="append", default=[], help="a dataset the query uses")
    search.add_argument("--purpose", action="append", default=[], help="declared purpose")
    search.add_argument(
        "--decision",
        action="append",
        default=[],
        choices=(
            "released",
            "cached",
            "denied",
            "rejected",
            "failed",
            "replayed",
            "permit",
            "deny",
        ),
        help="outcome (permit/deny: of an explain)",
    )
    search.add_argument(
        "--kind",
        action="append",
        default=[],
        help="record kind: query, explain, policy_activated, policy_refused, "
        "checkpoint_key_rotated, keys_in_use, budget_period, release and receipt_key_in_use (silo "
        "logs)",
    )
    search.add_argument(
        "--policy-version", action="append", default=[], help="a policy version or its prefix"
    )
    search.add_argument("--request-id", action="append", default=[], help="request id")
    search.add_argument("--since", type=_iso_time, help="from this time (inclusive)")
    search.add_argument("--until", type=_iso_time, help="before this time (exclusive)")
    search.add_argument("--limit", type=_positive_count, help="stop after this many matches")
    search.add_argument(
        "--format",
        choices=("table", "jsonl", "csv"),
        default="table",
        help="table for people; jsonl (whole records) or csv (fixed columns) for programs",
    )
    search.set_defaults(handler=_search)


def _search(args: argparse.Namespace) -> int:
    from gateway.audit.search import RecordFilter, print_search

    record_filter = RecordFilter(
        consumers=frozenset(args.consumer),
        datasets=frozenset(args.dataset),
        purposes=frozenset(args.purpose),
        decisions=frozenset(args.decision),
        kinds=frozenset(args.kind),
        policy_versions=tuple(args.policy_version),
        request_ids=frozenset(args.request_id),
        since=args.since,
        until=args.until,
    )
    return print_search(args.directory, record_filter, args.format, limit=args.limit)


def _add_report(commands: Subcommands) -> None:
    report = commands.add_parser(
        "report",
        help="write a self-contained HTML report (budget over time, denials, datasets, policy)",
    )
    report.add_argument("directory", type=Path, help="the gateway's audit log directory")
    report.add_argument("--html", type=Path, required=True, metavar="OUT", help="file to write")
    report.add_argument(
        "--policy",
        type=Path,
        metavar="BUNDLE",
        help="the policy bundle folder: spending per population needs it",
    )
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from gateway.audit.report import rho_text, write_report

    if not args.directory.is_dir():
        raise ValueError(f"{args.directory} is not a directory")
    summary = write_report(args.directory, args.html, policy=args.policy)
    sys.stdout.write(
        f"report written to {args.html}: {summary.records} records, "
        f"{summary.kinds.get('query', 0)} queries, rho {rho_text(summary.charged_rho)} charged\n"
    )
    return 0


def _silo_log(text: str) -> SiloLog:
    from gateway.audit.reconcile import parse_silo_log_argument

    return parse_silo_log_argument(text)


def _add_reconcile(commands: Subcommands) -> None:
    reconcile = commands.add_parser(
        "reconcile",
        help="check the gateway log against silo release logs, both ways",
        description="Exit 0 when every release in the given silo logs has its receipt in the "
        "gateway log (same request id, receipt digest, consumer, purpose, policy version, "
        "measures, noise scales and cost), every gateway receipt from those silos is in their "
        "logs and (with --silo-key) every receipt of those silos carries the silo's signature; "
        "otherwise list each mismatch (silo, request id, what differs) and exit 1.",
    )
    reconcile.add_argument("directory", type=Path, help="the gateway's audit log directory")
    reconcile.add_argument(
        "silo_logs",
        nargs="+",
        type=_silo_log,
        metavar="SILO_LOG",
        help="a silo's release log directory: NAME=DIR, or DIR named silo-NAME or NAME",
    )
    reconcile.add_argument(
        "--until",
        type=_iso_time,
        help="check only releases made before this time (a log still being written)",
    )
    reconcile.add_argument("--format", choices=("text", "jsonl"), default="text")
    reconcile.add_argument(
        "--silo-key",
        type=_silo_key,
        action="append",
        default=[],
        metavar="NAME=PUB",
        help="a silo's public receipt key: its receipts in both logs must carry its valid "
        "signature (repeat per silo, and for keys used before a rotation)",
    )
    reconcile.set_defaults(handler=_reconcile)


def _reconcile(args: argparse.Namespace) -> int:
    from gateway.audit.reconcile import print_reconciliation

    return print_reconciliation(
        args.directory,
        args.silo_logs,
        until=args.until,
        output=args.format,
        silo_keys=_silo_keys(args.silo_key),
    )
