"""Reconciliation of the gateway's audit log with the silos' release logs.

Each silo keeps its own log of what it released (``kind: release``, with its signed receipt, the
receipt's digest and the cost it accepted), and the gateway's record of a released query holds the
signed receipt of each silo (:func:`gateway.silo.receipt.receipt_to_record`). A release and a
receipt are the same when they have the same receipt digest and request id.
``silogate audit reconcile DIR SILO_LOG...`` checks both directions:

- every release a silo logged appears in the gateway log as a query record with a receipt from
  that silo carrying the same digest, for the same consumer, purpose, policy version
  and measures, at the same noise scales and the same cost;
- every receipt in the gateway log from a silo whose log was given appears in that silo's log;
- with the silos' public receipt keys (``--silo-key NAME=PUB``), every receipt in the silo's log
  and every receipt of that silo in the gateway's log carries the silo's valid signature (a
  receipt the silo did not sign is ``RECEIPT_INVALID``).

When one silo of a query fails, the gateway records the query as ``failed`` with the receipts of
the silos that did answer (their share stays charged): those releases are matched like any other.
A silo's release that the gateway has no receipt for (recorded ``failed`` without it, e.g. after
a deadline passed in flight, or anything other than released) is reported: the silo handed noisy
values to the gateway, and an auditor should see that it happened.

Costs are compared exactly (:class:`fractions.Fraction`). The gateway records a query's total rho;
a silo records one rho per measure it released. When the other silos' share of a query can be
priced from the spend alone (an epsilon or rho spend), each silo's share is checked on its own;
otherwise the silos' shares must add up to the gateway's total, which is checked when every silo
named in the record's receipts was given.

This module reads logs only through :func:`gateway.audit.store.iter_records` and never writes to
them. It does not check the logs' hashes or checkpoint signatures: ``silogate audit verify`` does,
for each log.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from gateway.audit.search import (
    parse_rho,
    parse_time,
    printable,
    query_measures,
    spend_rho,
    text_field,
)
from gateway.audit.store import iter_records
from gateway.silo.receipt import load_receipt_public_key, receipt_record_problem

if TYPE_CHECKING:
    from Crypto.PublicKey import ECC

# The fields a silo's release shares with the gateway's record of the query.
_SHARED_FIELDS = ("consumer", "purpose", "policy_version")
_SILO_DIR_PREFIX = "silo-"


@dataclass(frozen=True)
class Mismatch:
    """One disagreement between a silo's log and the gateway's.

    ``problem`` is machine-readable (UPPER_SNAKE); ``detail`` says what differs, with both values.
    ``silo_seq`` and ``gateway_seq`` are the records involved (None when there is none).
    """

    silo: str
    request_id: str
    problem: str
    detail: str
    silo_seq: int | None = None
    gateway_seq: int | None = None

    def describe(self) -> str:
        where = ", ".join(
            part
            for part in (
                f"silo record {self.silo_seq}" if self.silo_seq is not None else "",
                f"gateway record {self.gateway_seq}" if self.gateway_seq is not None else "",
            )
            if part
        )
        return printable(
            f"{self.problem}: silo '{self.silo}', request '{self.request_id}'"
            f"{f' ({where})' if where else ''}: {self.detail}"
        )


# Builds a Mismatch for the release being compared from (problem, detail).
_MismatchMaker = Callable[[str, str], "Mismatch"]


@dataclass
class Reconciliation:
    """What was compared and every mismatch found, in a stable order."""

    mismatches: list[Mismatch] = field(default_factory=list)
    silo_releases: Counter[str] = field(default_factory=Counter)  # releases checked, per silo
    receipts_checked: Counter[str] = field(default_factory=Counter)  # per silo
    receipts_unchecked: Counter[str] = field(default_factory=Counter)  # silos not given, per silo
    signatures_checked: Counter[str] = field(default_factory=Counter)  # receipts verified, per silo

    @property
    def ok(self) -> bool:
        return not self.mismatches


@dataclass(frozen=True)
class SiloLog:
    name: str
    directory: Path


def parse_silo_log_argument(text: str) -> SiloLog:
    """``NAME=DIR``, or ``DIR`` whose folder name is the silo's (``silo-civil`` or ``civil``)."""
    name, separator, rest = text.partition("=")
    if separator and name and not Path(text).exists():
        return SiloLog(name, Path(rest))
    directory = Path(text)
    folder = directory.resolve().name
    return SiloLog(folder.removeprefix(_SILO_DIR_PREFIX) or folder, directory)


# -- the gateway side ------------------------------------------------------------------------


@dataclass
class _GatewayIndex:
    released: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    other: dict[str, dict[str, Any]] = field(default_factory=dict)  # the last of any other kind


def _index_gateway(records: Iterable[Mapping[str, Any]]) -> _GatewayIndex:
    index = _GatewayIndex()
    for record in records:
        if text_field(record, "kind") != "query":
            continue
        request_id = text_field(record, "request_id")
        # Released values are not needed here; dropping them keeps a long log in little memory.
        slim = {k: v for k, v in record.items() if k != "values"}
        decision = text_field(record, "decision")
        if decision == "released":
            index.released[request_id].append(slim)
        elif decision == "failed":
            index.failed[request_id] = slim
        else:
            index.other[request_id] = slim
    return index


def _receipts(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    receipts = record.get("receipts")
    if not isinstance(receipts, list):
        return []
    return [r for r in receipts if isinstance(r, dict)]


def _seq(record: Mapping[str, Any]) -> int | None:
    seq = record.get("seq")
    return seq if isinstance(seq, int) else None


def _released_at(receipt: Mapping[str, Any]) -> object:
    # "at" in logs written before receipts were signed.
    return receipt.get("released_at", receipt.get("at"))


def _release_digest(release: Mapping[str, Any]) -> object:
    """The receipt digest a silo's release record names (``digest``; else its receipt's).
    That the two agree is checked by ``silogate audit verify`` on the silo's log."""
    if "digest" in release:
        return release.get("digest")
    receipt = release.get("receipt")
    return receipt.get("digest") if isinstance(receipt, dict) else None


# -- comparing one release with its gateway record ------------------------------------------


def _compare(
    silo: str, release: Mapping[str, Any], gateway: Mapping[str, Any]
) -> tuple[list[Mismatch], bool]:
    """Mismatches between a silo's release and the gateway's released record of it, and whether
    this silo's cost could be checked on its own."""
    request_id = text_field(release, "request_id")

    def mismatch(problem: str, detail: str) -> Mismatch:
        return Mismatch(silo, request_id, problem, detail, _seq(release), _seq(gateway))

    found: list[Mismatch] = []
    receipts = [r for r in _receipts(gateway) if r.get("silo") == silo]
    digest = _release_digest(release)
    if not receipts:
        found.append(
            mismatch(
                "RECEIPT_MISSING",
                f"the gateway's released record has no receipt from silo '{silo}' "
                f"(it has receipts from {_silo_names(gateway) or 'no silo'})",
            )
        )
    elif all(r.get("digest") != digest for r in receipts):
        found.append(
            mismatch(
                "DIGEST_DIFFERS",
                f"receipt digest {digest!s} in the silo's log, "
                f"{receipts[0].get('digest')!s} in the gateway's receipt",
            )
        )
    elif any(
        r.get("digest") == digest and r.get("request_id", request_id) != request_id
        for r in receipts
    ):
        found.append(
            mismatch(
                "REQUEST_ID_DIFFERS",
                "the gateway's receipt with this digest names another request id",
            )
        )
    for name in _SHARED_FIELDS:
        if release.get(name) != gateway.get(name):
            found.append(
                mismatch(
                    f"{name.upper()}_DIFFERS",
                    f"{name} {release.get(name)!r} in the silo's log, "
                    f"{gateway.get(name)!r} in the gateway's",
                )
            )
    gateway_measures = {str(m.get("id")): m for m in query_measures(gateway)}
    silo_measures = {str(m.get("id")): m for m in query_measures(release)}
    for measure_id, measure in sorted(silo_measures.items()):
        if measure_id not in gateway_measures:
            found.append(
                mismatch(
                    "MEASURE_DIFFERS",
                    f"measure '{measure_id}' was released by the silo but is not in the "
                    "gateway's query",
                )
            )
        elif measure != gateway_measures[measure_id]:
            found.append(
                mismatch(
                    "MEASURE_DIFFERS",
                    f"measure '{measure_id}' is {_compact(measure)} in the silo's log, "
                    f"{_compact(gateway_measures[measure_id])} in the gateway's",
                )
            )
    silo_query, gateway_query = release.get("query"), gateway.get("query")
    silo_groups = silo_query.get("group_by") if isinstance(silo_query, dict) else None
    gateway_groups = gateway_query.get("group_by") if isinstance(gateway_query, dict) else None
    if silo_groups != gateway_groups:
        found.append(
            mismatch(
                "GROUP_BY_DIFFERS",
                f"group-by {silo_groups!r} in the silo's log, {gateway_groups!r} in the gateway's",
            )
        )
    found.extend(_compare_scales(release, gateway, silo_measures, mismatch))
    cost_mismatch, checked = _compare_cost(release, gateway, set(silo_measures), mismatch)
    found.extend(cost_mismatch)
    return found, checked


def _gateway_component_scales(gateway: Mapping[str, Any], measure_id: str) -> object:
    """The scales the gateway planned for a measure's components, in order."""
    components = gateway.get("components")
    if isinstance(components, dict) and isinstance(components.get(measure_id), list):
        return [c.get("scale") if isinstance(c, dict) else None for c in components[measure_id]]
    scales = gateway.get("scales")
    return [scales.get(measure_id)] if isinstance(scales, dict) else None


def _compare_scales(
    release: Mapping[str, Any],
    gateway: Mapping[str, Any],
    silo_measures: Mapping[str, Any],
    mismatch: _MismatchMaker,
) -> list[Mismatch]:
    scales = gateway.get("scales")
    gateway_scales = scales if isinstance(scales, dict) else {}
    silo_scales = release.get("scales")
    if isinstance(silo_scales, dict):
        # Per measure id, one scale per noise component (the silo's release record).
        found = []
        for measure_id, actual in sorted(silo_scales.items()):
            expected = _gateway_component_scales(gateway, measure_id)
            if actual != expected:
                found.append(
                    mismatch(
                        "SCALE_DIFFERS",
                        f"noise scales {actual!r} of measure '{measure_id}' in the silo's log, "
                        f"{expected!r} in the gateway's",
                    )
                )
        return found
    # The silo lists scales in the order the gateway planned the measures, not by id: compare
    # them as sorted lists (exact floats, as both sides wrote the same number).
    expected = sorted(
        (gateway_scales.get(i) for i in silo_measures),
        key=lambda s: s if isinstance(s, int | float) else float("inf"),
    )
    actual = (
        sorted(silo_scales, key=lambda s: s if isinstance(s, int | float) else float("inf"))
        if isinstance(silo_scales, list)
        else silo_scales
    )
    if actual != expected:
        return [
            mismatch(
                "SCALE_DIFFERS",
                f"noise scales {actual!r} in the silo's log, {expected!r} in the gateway's "
                "for the same measures",
            )
        ]
    return []


def _compare_cost(
    release: Mapping[str, Any],
    gateway: Mapping[str, Any],
    silo_ids: set[str],
    mismatch: _MismatchMaker,
) -> tuple[list[Mismatch], bool]:
    silo_rho = parse_rho(release.get("rho"))
    total = parse_rho(gateway.get("rho"))
    if silo_rho is None or total is None:
        return [
            mismatch(
                "COST_UNREADABLE",
                f"rho {release.get('rho')!r} in the silo's log, {gateway.get('rho')!r} in the "
                "gateway's: not exact rational numbers",
            )
        ], True
    others = [m for m in query_measures(gateway) if str(m.get("id")) not in silo_ids]
    prices = [spend_rho(m.get("spend")) for m in others]
    if any(p is None for p in prices):
        return [], False  # the share of the other silos is unknown: checked on the total
    expected = total - sum((p for p in prices if p is not None), Fraction(0))
    if silo_rho != expected:
        return [
            mismatch(
                "COST_DIFFERS",
                f"rho {silo_rho} charged in the silo's log; the gateway's record (total rho "
                f"{total}) leaves {expected} for this silo's measures",
            )
        ], True
    return [], True


def _compact(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _silo_names(record: Mapping[str, Any]) -> str:
    return ", ".join(sorted({str(r.get("silo")) for r in _receipts(record)}))


# -- both directions -------------------------------------------------------------------------


def reconcile(
    gateway_records: Iterable[Mapping[str, Any]],
    silo_logs: Mapping[str, Iterable[Mapping[str, Any]]],
    *,
    until: dt.datetime | None = None,
    silo_keys: Mapping[str, Sequence[ECC.EccKey]] | None = None,
) -> Reconciliation:
    """Compare a gateway log with the release logs of some silos (name to records).

    With ``until``, only releases made before it are required to match (by the silo's clock, on
    both sides: a silo's record time and a receipt's ``released_at``), so a log still being
    written can be reconciled up to a moment when nothing was in flight. Lookups always search
    everything. With ``silo_keys`` (a silo's public receipt keys), the receipts of those silos
    are verified on both sides.
    """
    keys = silo_keys or {}
    index = _index_gateway(gateway_records)
    result = Reconciliation()
    seen: set[tuple[str, str]] = set()
    # Per request: each silo's rho, and whether some silo's share could not be checked alone.
    shares: dict[str, dict[str, Fraction]] = defaultdict(dict)
    needs_total: set[str] = set()
    for request_id, records in sorted(index.released.items()):
        if len(records) > 1:
            result.mismatches.append(
                Mismatch(
                    "(gateway)",
                    request_id,
                    "DUPLICATE_RELEASE",
                    f"the gateway logged {len(records)} released records for one request id "
                    f"(records {', '.join(str(_seq(r)) for r in records)})",
                    gateway_seq=_seq(records[1]),
                )
            )
    for silo, silo_records in silo_logs.items():
        releases: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for record in silo_records:
            if text_field(record, "kind") == "release":
                releases[text_field(record, "request_id")].append(record)
        for request_id, logged in releases.items():
            seen.add((silo, request_id))
            due = [r for r in logged if _before(r.get("time"), until)]
            if not due:
                continue
            result.silo_releases[silo] += len(due)
            if len(logged) > 1:
                result.mismatches.append(
                    Mismatch(
                        silo,
                        request_id,
                        "DUPLICATE_RELEASE",
                        f"the silo logged {len(logged)} releases for one request id (records "
                        f"{', '.join(str(_seq(r)) for r in logged)})",
                        silo_seq=_seq(logged[1]),
                    )
                )
            release = logged[0]
            if silo in keys:
                result.mismatches.extend(
                    _signature_mismatches(silo, request_id, logged, keys[silo], result, "silo")
                )
            gateway = _answered(index, silo, request_id)
            if gateway is None:
                result.mismatches.append(_unreleased(silo, request_id, release, index))
                continue
            found, alone = _compare(silo, release, gateway)
            result.mismatches.extend(found)
            rho = parse_rho(release.get("rho"))
            if rho is not None:
                shares[request_id][silo] = rho
            if not alone and text_field(gateway, "decision") == "released":
                needs_total.add(request_id)
    answered = [
        *((request_id, records[0]) for request_id, records in sorted(index.released.items())),
        *sorted(index.failed.items()),
    ]
    for request_id, record in answered:
        for receipt in _receipts(record):
            silo = str(receipt.get("silo"))
            if silo in keys:
                result.mismatches.extend(
                    _signature_mismatches(
                        silo, request_id, [record], keys[silo], result, "gateway", receipt
                    )
                )
            if silo not in silo_logs:
                result.receipts_unchecked[silo] += 1
                continue
            if not _before(_released_at(receipt), until):
                continue
            result.receipts_checked[silo] += 1
            if (silo, request_id) not in seen:
                result.mismatches.append(
                    Mismatch(
                        silo,
                        request_id,
                        "RELEASE_MISSING",
                        f"the gateway holds a receipt from silo '{silo}' (digest "
                        f"{receipt.get('digest')!s}, at {_released_at(receipt)!s}) but the silo's "
                        "log has no release for this request",
                        gateway_seq=_seq(record),
                    )
                )
    for request_id in sorted(needs_total):
        result.mismatches.extend(_total_cost(request_id, index.released[request_id][0], shares))
    result.mismatches.sort(key=lambda m: (m.silo, m.request_id, m.problem))
    return result


def _signature_mismatches(
    silo: str,
    request_id: str,
    records: Sequence[Mapping[str, Any]],
    keys: Sequence[ECC.EccKey],
    result: Reconciliation,
    side: Literal["silo", "gateway"],
    receipt: Mapping[str, Any] | None = None,
) -> list[Mismatch]:
    """A receipt that is not the silo's valid signature over this request: from the silo's log
    (``receipt`` of each record) or one receipt of the gateway's record."""
    found = []
    for record in records:
        current = receipt if receipt is not None else record.get("receipt")
        problem = receipt_record_problem(current, keys)
        if problem is None and isinstance(current, dict):
            if current.get("silo") != silo:
                problem = f"the receipt names silo {str(current.get('silo'))[:64]!r}"
            elif current.get("request_id") != request_id:
                problem = "the receipt names another request id"
        if problem is None:
            result.signatures_checked[silo] += 1
            continue
        seqs = {"silo_seq": _seq(record)} if side == "silo" else {"gateway_seq": _seq(record)}
        found.append(
            Mismatch(
                silo,
                request_id,
                "RECEIPT_INVALID",
                f"the {'silo' if side == 'silo' else 'gateway'}'s log holds a receipt the silo's "
                f"key does not verify: {problem}",
                **seqs,
            )
        )
    return found


def _answered(index: _GatewayIndex, silo: str, request_id: str) -> dict[str, Any] | None:
    """The gateway's record of the silo's answer: the released record, or a failed one that
    kept the silo's receipt (the silo answered, another silo did not)."""
    released = index.released.get(request_id)
    if released:
        return released[0]
    failed = index.failed.get(request_id)
    if failed is not None and any(r.get("silo") == silo for r in _receipts(failed)):
        return failed
    return None


def _unreleased(
    silo: str, request_id: str, release: Mapping[str, Any], index: _GatewayIndex
) -> Mismatch:
    other = index.failed.get(request_id) or index.other.get(request_id)
    if other is None:
        return Mismatch(
            silo,
            request_id,
            "NOT_IN_GATEWAY_LOG",
            "the silo released values for this request but the gateway log has no record of it",
            silo_seq=_seq(release),
        )
    decision = text_field(other, "decision")
    reason = text_field(other, "reason")
    return Mismatch(
        silo,
        request_id,
        "NOT_RELEASED_BY_GATEWAY",
        f"the silo released values but the gateway recorded '{decision}'"
        f"{f' ({reason})' if reason else ''}, with no receipt from this silo",
        silo_seq=_seq(release),
        gateway_seq=_seq(other),
    )


def _total_cost(
    request_id: str, gateway: Mapping[str, Any], shares: Mapping[str, Mapping[str, Fraction]]
) -> list[Mismatch]:
    named = {str(r.get("silo")) for r in _receipts(gateway)}
    given = shares.get(request_id, {})
    total = parse_rho(gateway.get("rho"))
    if total is None or not named <= set(given):
        return []  # a silo's share is missing (its log was not given): the total cannot be told
    spent = sum(given.values(), Fraction(0))
    if spent == total:
        return []
    parts = ", ".join(f"{silo} {rho}" for silo, rho in sorted(given.items()))
    return [
        Mismatch(
            "(all)",
            request_id,
            "COST_DIFFERS",
            f"the silos charged rho {spent} in all ({parts}); the gateway's record says {total}",
            gateway_seq=_seq(gateway),
        )
    ]


def _before(value: object, until: dt.datetime | None) -> bool:
    if until is None:
        return True
    try:
        return isinstance(value, str) and parse_time(value) < until
    except ValueError:
        return True  # an unreadable time cannot excuse a record from the check


# -- the command ---------------------------------------------------------------------------


def print_reconciliation(
    directory: Path,
    silo_logs: Sequence[SiloLog],
    *,
    until: dt.datetime | None = None,
    output: Literal["text", "jsonl"] = "text",
    out: IO[str] | None = None,
    silo_keys: Mapping[str, Sequence[Path]] | None = None,
) -> int:
    """``silogate audit reconcile``: every mismatch, then a summary; exit 0 when none."""
    stream = out or sys.stdout
    names = [s.name for s in silo_logs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"silo {duplicates[0]!r} is given twice; name each log once (NAME=DIR)")
    for folder in (directory, *(s.directory for s in silo_logs)):
        if not Path(folder).is_dir():
            raise ValueError(f"{folder} is not a directory")
    keys = {
        silo: [load_receipt_public_key(path) for path in paths]
        for silo, paths in (silo_keys or {}).items()
    }
    result = reconcile(
        iter_records(directory),
        {s.name: iter_records(s.directory) for s in silo_logs},
        until=until,
        silo_keys=keys,
    )
    if output == "jsonl":
        for found in result.mismatches:
            stream.write(json.dumps(asdict(found), sort_keys=True) + "\n")
    else:
        for found in result.mismatches:
            stream.write(found.describe() + "\n")
        for silo in names:
            stream.write(
                f"{printable(silo)}: {result.silo_releases[silo]} release(s) in its log, "
                f"{result.receipts_checked[silo]} receipt(s) in the gateway log\n"
            )
        for silo, count in sorted(result.receipts_unchecked.items()):
            stream.write(
                f"{printable(silo)}: {count} receipt(s) not checked (its log was not given)\n"
            )
        for silo in sorted(keys):
            stream.write(
                f"{printable(silo)}: {result.signatures_checked[silo]} receipt signature(s) "
                "verified\n"
            )
        unsigned = sorted({*names, *result.receipts_unchecked} - set(keys))
        if unsigned:
            stream.write(
                f"receipt signatures not checked for {', '.join(map(printable, unsigned))} "
                "(no --silo-key)\n"
            )
        stream.write(
            "reconciled: every release matches\n"
            if result.ok
            else f"{len(result.mismatches)} mismatch(es)\n"
        )
    return 0 if result.ok else 1
