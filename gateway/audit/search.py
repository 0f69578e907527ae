"""Finding audit records: filters over a log's record stream, and their table, JSONL and CSV forms.

``silogate audit search DIR`` reads records only through :func:`gateway.audit.store.iter_records`,
so segment files, archiving and corruption checks stay in one place; it never writes to a log.
The field readers here (:func:`record_datasets`, :func:`record_time`, :func:`measure_costs`) are
shared with the report and the reconciliation: records are read back from files, so every reader
tolerates a missing or oddly typed field instead of trusting the shape the gateway meant to write.

Strings in records come from callers (request ids, purposes, error messages that quote them). The
table shows them as plain text: never as rich markup, and with control and bidirectional
formatting characters escaped, so a crafted request id cannot restyle or rewrite the terminal.
JSON Lines and CSV give the values unchanged, for machines.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gateway.audit.store import iter_records

OutputFormat = Literal["table", "jsonl", "csv"]

# The CSV header. Append new columns at the end only: scripts read CSV files by position as
# often as by name.
COLUMNS = (
    "seq",
    "time",
    "kind",
    "decision",
    "reason",
    "consumer",
    "purpose",
    "request_id",
    "datasets",
    "rules",
    "rho",
    "policy_version",
    "digest",
    "charged_rho",
)
_TABLE_COLUMNS = (
    "seq",
    "time",
    "kind",
    "decision",
    "reason",
    "consumer",
    "purpose",
    "request_id",
    "datasets",
    "rho",
    "policy_version",
)
_SHORT_VERSION = 12  # enough to tell versions apart in a table; CSV and JSONL keep the full hash


# -- reading fields of a record --------------------------------------------------------------


def text_field(record: Mapping[str, Any], name: str) -> str:
    """A string field, or "" when it is missing or not a string."""
    value = record.get(name)
    return value if isinstance(value, str) else ""


def record_time(record: Mapping[str, Any]) -> dt.datetime | None:
    """The record's time (timezone-aware), or None when it is missing or unreadable."""
    try:
        return parse_time(text_field(record, "time"))
    except ValueError:
        return None


def query_measures(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The measures of the record's canonical query (only well-formed ones)."""
    query = record.get("query")
    measures = query.get("measures") if isinstance(query, dict) else None
    if not isinstance(measures, list):
        return []
    return [m for m in measures if isinstance(m, dict)]


def record_datasets(record: Mapping[str, Any]) -> tuple[str, ...]:
    """The datasets the record's query touches, sorted and without repeats."""
    names = {m.get("dataset") for m in query_measures(record)}
    return tuple(sorted(n for n in names if isinstance(n, str)))


def parse_rho(value: object) -> Fraction | None:
    """An exact rho from its text ("1/8"); a list of texts (a silo record) is summed."""
    if isinstance(value, list):
        parts = [parse_rho(v) for v in value]
        if not parts or any(p is None for p in parts):
            return None
        return sum((p for p in parts if p is not None), Fraction(0))
    if not isinstance(value, str):
        return None
    try:
        rho = Fraction(value)
    except (ValueError, ZeroDivisionError):
        return None
    return rho if rho >= 0 else None


def spend_rho(spend: object) -> Fraction | None:
    """What one measure's spend costs in rho when the spend alone decides it.

    An epsilon spend costs epsilon^2 / 2 and a rho spend itself (as the gateway charges them,
    :func:`gateway.privacy.noise.plan_noise`). A target-error spend depends on the dataset's
    bounds, which the record does not carry: None.
    """
    if not isinstance(spend, dict):
        return None
    epsilon = parse_rho(spend.get("epsilon"))  # same text form and the same checks as rho
    if epsilon is not None:
        return epsilon * epsilon / 2
    return parse_rho(spend.get("rho"))


def _recorded_rho(record: Mapping[str, Any], measure: Mapping[str, Any]) -> Fraction | None:
    """A measure's rho from the record's planned components (recorded since means and
    histograms: a mean's two halves cost less than its whole spend would alone)."""
    components = record.get("components")
    parts = components.get(measure.get("id")) if isinstance(components, dict) else None
    if not isinstance(parts, list) or not parts:
        if measure.get("kind") == "mean":
            return None  # split spend: epsilon e costs 2 (e/2)^2 / 2, never e^2 / 2
        return spend_rho(measure.get("spend"))
    rhos = [parse_rho(p.get("rho")) if isinstance(p, dict) else None for p in parts]
    if any(r is None for r in rhos):
        return None
    return sum((r for r in rhos if r is not None), Fraction(0))


def measure_costs(
    record: Mapping[str, Any], known: Callable[[Mapping[str, Any]], Fraction | None] | None = None
) -> dict[str, Fraction] | None:
    """The rho each measure of a query record cost, by measure id; None when it cannot be told.

    The gateway records the query's total rho, not each measure's. Epsilon and rho spends give
    their measure's cost exactly; ``known`` may price other measures (the report does so from a
    policy bundle). What is left of the total goes to the measures still unpriced, shared
    equally: exact when there is one of them, which is the usual case. When the prices disagree
    with the recorded total the record wins and None is returned.
    """
    total = parse_rho(record.get("rho"))
    measures = [m for m in query_measures(record) if isinstance(m.get("id"), str)]
    if total is None or not measures:
        return None
    costs: dict[str, Fraction] = {}
    unpriced: list[str] = []
    for measure in measures:
        cost = _recorded_rho(record, measure)
        if cost is None and known is not None:
            cost = known(measure)
        if cost is None:
            unpriced.append(measure["id"])
        else:
            costs[measure["id"]] = cost
    left = total - sum(costs.values(), Fraction(0))
    if left < 0 or (not unpriced and left != 0):
        return None
    for measure_id in unpriced:
        costs[measure_id] = left / len(unpriced)
    return costs


def parse_time(text: str) -> dt.datetime:
    """An ISO 8601 date or time; one without a zone is UTC (the log writes UTC)."""
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"'{text}' is not an ISO 8601 time (e.g. 2026-11-25 or 2026-11-25T13:00:00Z)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


# -- filtering -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordFilter:
    """Which records to keep. Each field lists accepted values (any of them matches, empty
    accepts everything); all fields must match. ``since`` is inclusive, ``until`` exclusive."""

    consumers: frozenset[str] = frozenset()
    datasets: frozenset[str] = frozenset()
    purposes: frozenset[str] = frozenset()
    decisions: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    policy_versions: tuple[str, ...] = ()  # prefixes of the version hash
    request_ids: frozenset[str] = frozenset()
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(
                f"--since {self.since.isoformat()} is not before --until {self.until.isoformat()}"
            )

    def matches(self, record: Mapping[str, Any]) -> bool:
        if self.kinds and text_field(record, "kind") not in self.kinds:
            return False
        if self.consumers and text_field(record, "consumer") not in self.consumers:
            return False
        if self.purposes and text_field(record, "purpose") not in self.purposes:
            return False
        if self.decisions and text_field(record, "decision") not in self.decisions:
            return False
        if self.request_ids and text_field(record, "request_id") not in self.request_ids:
            return False
        if self.datasets and not self.datasets.intersection(record_datasets(record)):
            return False
        if self.policy_versions:
            version = text_field(record, "policy_version")
            if not version or not any(version.startswith(p) for p in self.policy_versions):
                return False
        if self.since is not None or self.until is not None:
            # A record without a readable time cannot be placed in a window, so it is left out.
            time = record_time(record)
            if time is None:
                return False
            if self.since is not None and time < self.since:
                return False
            if self.until is not None and time >= self.until:
                return False
        return True


def search_records(
    directory: Path, record_filter: RecordFilter, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """The matching records of the log in ``directory``, in sequence order, at most ``limit``."""
    found = 0
    for record in iter_records(directory):
        if limit is not None and found >= limit:
            return
        if record_filter.matches(record):
            found += 1
            yield record


# -- rendering -------------------------------------------------------------------------------


def row_values(record: Mapping[str, Any]) -> dict[str, str]:
    """One record as the flat text cells of :data:`COLUMNS`."""
    rules = record.get("rules")
    rho = record.get("rho")
    seq = record.get("seq")
    return {
        "seq": str(seq) if isinstance(seq, int) else "",
        "time": text_field(record, "time"),
        "kind": text_field(record, "kind"),
        "decision": text_field(record, "decision"),
        "reason": text_field(record, "reason"),
        "consumer": text_field(record, "consumer"),
        "purpose": text_field(record, "purpose"),
        "request_id": text_field(record, "request_id"),
        "datasets": ";".join(record_datasets(record)),
        "rules": ";".join(r for r in rules if isinstance(r, str))
        if isinstance(rules, list)
        else "",
        # A silo's release record lists one rho per measure; the gateway's holds the total.
        "rho": ";".join(r for r in rho if isinstance(r, str))
        if isinstance(rho, list)
        else (rho if isinstance(rho, str) else ""),
        "policy_version": text_field(record, "policy_version"),
        "digest": text_field(record, "digest"),
        "charged_rho": text_field(record, "charged_rho"),
    }


def printable(text: str) -> str:
    """``text`` with control and format characters (ANSI escapes, bidi overrides) escaped."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in {"Cc", "Cf", "Zl", "Zp"}
        else ch
        for ch in text
    )


def write_jsonl(records: Iterable[Mapping[str, Any]], out: IO[str]) -> int:
    """Each record whole, one per line (sorted keys, ASCII only). Returns how many."""
    count = 0
    for record in records:
        out.write(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")
        count += 1
    return count


def write_csv(records: Iterable[Mapping[str, Any]], out: IO[str]) -> int:
    """A header of :data:`COLUMNS`, then one row per record (RFC 4180 quoting). Returns how many."""
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    count = 0
    for record in records:
        writer.writerow(row_values(record))
        count += 1
    return count


def search_table(records: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(caption=f"{len(records)} record(s); times in UTC")
    for name in _TABLE_COLUMNS:
        # Fold, never truncate: an auditor must see a whole request id or time, not its prefix.
        table.add_column(
            name,
            justify="right" if name in {"seq", "rho"} else "left",
            overflow="fold",
            no_wrap=name in {"seq", "time"},
        )
    for record in records:
        cells = row_values(record)
        cells["policy_version"] = cells["policy_version"][:_SHORT_VERSION]
        time = record_time(record)
        if time is not None:  # UTC to the millisecond, as written, without the zone's 6 characters
            cells["time"] = time.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        # Text objects, not str: rich would otherwise read "[...]" in a purpose as markup.
        texts = {name: Text(printable(cells[name])) for name in _TABLE_COLUMNS}
        # One dataset per line; the line breaks are ours, the names are escaped like any cell.
        texts["datasets"] = Text("\n".join(printable(d) for d in cells["datasets"].split(";")))
        table.add_row(*(texts[name] for name in _TABLE_COLUMNS))
    return table


# -- the command ---------------------------------------------------------------------------


def print_search(
    directory: Path,
    record_filter: RecordFilter,
    output: OutputFormat,
    *,
    limit: int | None = None,
    out: IO[str] | None = None,
) -> int:
    """``silogate audit search``: print the matches; finding none is an answer too (exit 0)."""
    if not Path(directory).is_dir():
        raise ValueError(f"{directory} is not a directory")
    stream = out or sys.stdout
    records = search_records(directory, record_filter, limit)
    if output == "jsonl":
        write_jsonl(records, stream)
    elif output == "csv":
        write_csv(records, stream)
    else:
        matched = list(records)
        # Pipes and CI logs get a fixed width, wide enough for every column unfolded.
        console = Console(file=stream, width=None if stream.isatty() else 200)
        if matched:
            console.print(search_table(matched))
        else:
            console.print("no records match", markup=False)
    return 0
