"""The auditor's HTML report: one self-contained file summarising an audit log.

``silogate audit report DIR --html OUT`` reads the log once, through
:func:`gateway.audit.store.iter_records`, and writes one HTML file with inline CSS and inline SVG
charts drawn here: privacy budget (rho) spent over time per consumer and per population
(cumulative), outcomes per decision, denials by reason, the most used datasets, and the policy
versions in force over time. The file loads nothing (no scripts, fonts, images or style sheets from
anywhere) and holds no JavaScript at all, so it reads the same offline, archived, or printed.

Every string taken from a record passes through :func:`html.escape` on its way into the page, in
text and in attributes: request ids, purposes and messages are chosen by callers, and a report
must never run what a caller wrote. Record strings never reach a style, a class or an element name.

The report reads the log as it is; it does not check hashes or signatures (``silogate audit
verify`` does). Sums of rho are exact (:class:`fractions.Fraction`); floats are used only to place
points on a chart.
"""

from __future__ import annotations

import datetime as dt
import functools
import html
import math
import os
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from gateway.audit.search import (
    measure_costs,
    parse_rho,
    printable,
    query_measures,
    record_datasets,
    record_time,
    text_field,
)
from gateway.audit.store import iter_records
from gateway.errors import SilogateError
from gateway.policy.loader import load_bundle
from gateway.privacy.noise import plan_noise
from gateway.privacy.sensitivity import components
from gateway.query.form import MEASURE_KIND_NUMBERS, MeasureForm, Spend

# Colour-blind-safe palette (Okabe and Ito), assigned by rank, never by a name from a record.
PALETTE = (
    "#0072b2",
    "#e69f00",
    "#009e73",
    "#d55e00",
    "#cc79a7",
    "#56b4e9",
    "#8c6d1f",
    "#000000",
)
OTHERS = "all others"
REFUSALS = ("denied", "rejected", "failed")
_LATEST_REFUSALS = 25
_TOP_DATASETS = 12
_TOP_REASONS = 12
_MAX_MARKERS = 60  # data points drawn per series; the line itself keeps every step
_MAX_LABEL = 34  # characters of a chart label; the full text is in the element's <title>

# Chart geometry (SVG user units; the SVG scales to the page width).
_WIDTH = 760
_LINE_HEIGHT = 300
_PLOT_LEFT, _PLOT_RIGHT, _PLOT_TOP, _PLOT_BOTTOM = 64, 16, 16, 40
_BAR_ROW = 26
_BAR_LABEL = 250
_HALF_WIDTH, _HALF_LABEL = 520, 190  # bar charts shown two to a row


def esc(value: object) -> str:
    """Text for HTML or SVG, in element content or a quoted attribute."""
    return html.escape(printable(str(value)), quote=True)


def epsilon_text(rho: Fraction) -> str:
    """The pure-DP epsilon that costs ``rho`` (rho = epsilon^2 / 2), for people used to epsilon."""
    return f"{math.sqrt(2 * float(rho)):.4g}" if rho > 0 else "0"


def rho_text(rho: Fraction) -> str:
    """Exact when short ("1/8"), else rounded and marked so ("≈0.3127", "≈1,283")."""
    exact = str(rho)
    if len(exact) <= 8:
        return exact
    value = float(rho)
    return f"≈{value:,.0f}" if value >= 1000 else f"≈{value:.4g}"


# -- reading the log -------------------------------------------------------------------------


@dataclass
class SpendSeries:
    """Cumulative rho of one consumer or population, one point per charged release."""

    total: Fraction = Fraction(0)
    points: list[tuple[float, float]] = field(default_factory=list)  # (unix time, cumulative)

    def charge(self, at: dt.datetime, rho: Fraction) -> None:
        self.total += rho
        self.points.append((at.timestamp(), float(self.total)))


@dataclass
class ConsumerSummary:
    queries: int = 0
    released: int = 0
    refused: int = 0
    last: str = ""


@dataclass
class DatasetSummary:
    queries: int = 0
    released: int = 0
    refused: int = 0
    rho: Fraction = Fraction(0)


@dataclass(frozen=True)
class PolicyPeriod:
    version: str
    start: dt.datetime
    seq: int


@dataclass
class AuditSummary:
    """Everything the report shows, gathered in one pass over the log."""

    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_time: dt.datetime | None = None
    last_time: dt.datetime | None = None
    kinds: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    explains: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    consumers: dict[str, ConsumerSummary] = field(
        default_factory=lambda: defaultdict(ConsumerSummary)
    )
    consumer_spend: dict[str, SpendSeries] = field(default_factory=lambda: defaultdict(SpendSeries))
    population_spend: dict[str, SpendSeries] = field(
        default_factory=lambda: defaultdict(SpendSeries)
    )
    datasets: dict[str, DatasetSummary] = field(default_factory=lambda: defaultdict(DatasetSummary))
    unattributed_rho: Fraction = Fraction(0)  # charged rho no population could be named for
    failed_rho: Fraction = Fraction(0)  # kept charged by failed queries (silos that answered)
    versions_used: Counter[str] = field(default_factory=Counter)
    activations: list[PolicyPeriod] = field(default_factory=list)
    policy_refusals: list[dict[str, Any]] = field(default_factory=list)
    latest_refusals: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=_LATEST_REFUSALS)
    )
    populations_known: bool = False

    @property
    def charged_rho(self) -> Fraction:
        """Everything charged: released queries, and the kept shares of failed ones."""
        return sum((s.total for s in self.consumer_spend.values()), Fraction(0))


class PopulationMap:
    """Facts from a policy bundle that records do not carry: each dataset's population and silo,
    and what a target-error measure cost. The record names datasets; the bundle the auditor
    gives names their populations."""

    def __init__(
        self,
        populations: Mapping[str, str],
        silos: Mapping[str, str],
        price: Callable[[Mapping[str, Any]], Fraction | None],
    ):
        self.populations = dict(populations)
        self.silos = dict(silos)
        self.price = price

    @classmethod
    def from_bundle(cls, root: Path) -> PopulationMap:
        bundle = load_bundle(root)

        # Planning asks OpenDP, which is slow next to reading a record; a log repeats a few
        # (dataset, kind, target) triples many times.
        @functools.lru_cache(maxsize=4096)
        def plan(dataset_name: str, kind: str, column: str, target: Fraction) -> Fraction | None:
            # The gateway's own planning, so a target-error measure of a record written before
            # the gateway recorded its components is priced as it was charged (assuming the
            # dataset's bounds have not changed since; COUNT_PERSONS priced without a group-by).
            dataset = bundle.datasets.get(dataset_name)
            if dataset is None or target == 0 or kind not in MEASURE_KIND_NUMBERS:
                return None
            measure = MeasureForm("m", dataset_name, kind, column, (), Spend(target_error=target))
            try:
                return sum(
                    (
                        plan_noise(part.sensitivity, measure.spend).rho
                        for part in components(dataset, measure, ())
                    ),
                    Fraction(0),
                )
            except (SilogateError, ArithmeticError, ValueError):
                return None  # an unpriceable measure gets its share of the recorded total

        def price(measure: Mapping[str, Any]) -> Fraction | None:
            spend = measure.get("spend")
            target = parse_rho(spend.get("target_error")) if isinstance(spend, dict) else None
            if target is None:
                return None
            return plan(
                str(measure.get("dataset")),
                str(measure.get("kind")),
                str(measure.get("column") or ""),
                target,
            )

        return cls(
            {name: d.population for name, d in bundle.datasets.items()},
            {name: d.silo for name, d in bundle.datasets.items()},
            price,
        )


def summarise(
    records: Iterable[Mapping[str, Any]], populations: PopulationMap | None = None
) -> AuditSummary:
    """Gather the report's figures from records in sequence order."""
    summary = AuditSummary(populations_known=populations is not None)
    for record in records:
        summary.records += 1
        seq = record.get("seq")
        if isinstance(seq, int):
            summary.first_seq = seq if summary.first_seq is None else summary.first_seq
            summary.last_seq = seq
        time = record_time(record)
        if time is not None:
            summary.first_time = min(summary.first_time or time, time)
            summary.last_time = max(summary.last_time or time, time)
        kind = text_field(record, "kind") or "(no kind)"
        summary.kinds[kind] += 1
        if kind == "query":
            _add_query(summary, record, time, populations)
        elif kind == "explain":
            summary.explains[text_field(record, "decision") or "(none)"] += 1
        elif kind == "policy_activated" and time is not None and isinstance(seq, int):
            summary.activations.append(
                PolicyPeriod(text_field(record, "policy_version"), time, seq)
            )
        elif kind == "policy_refused":
            summary.policy_refusals.append(dict(record))
    return summary


def _add_query(
    summary: AuditSummary,
    record: Mapping[str, Any],
    time: dt.datetime | None,
    populations: PopulationMap | None,
) -> None:
    decision = text_field(record, "decision") or "(none)"
    consumer = text_field(record, "consumer") or "(unidentified)"
    summary.decisions[decision] += 1
    version = text_field(record, "policy_version")
    if version:
        summary.versions_used[version] += 1
    who = summary.consumers[consumer]
    who.queries += 1
    who.last = text_field(record, "time") or who.last
    datasets = record_datasets(record)
    for name in datasets:
        summary.datasets[name].queries += 1
    if decision in REFUSALS:
        who.refused += 1
        summary.reasons[text_field(record, "reason") or "(no reason)"] += 1
        summary.latest_refusals.append(dict(record))
        for name in datasets:
            summary.datasets[name].refused += 1
    if decision == "released":
        who.released += 1
        for name in datasets:
            summary.datasets[name].released += 1
        charged = parse_rho(record.get("rho"))
    elif decision == "failed":
        # The silos that released (or may have) before another failed keep their share charged;
        # the gateway records how much.
        charged = parse_rho(record.get("charged_rho"))
    else:
        return  # a cached answer or a replay costs nothing; a refusal comes before any charge
    if not charged or time is None:
        return
    summary.consumer_spend[consumer].charge(time, charged)
    if decision == "failed":
        summary.failed_rho += charged
    costs = _charged_measures(record, charged, populations)
    by_population: dict[str, Fraction] = defaultdict(Fraction)
    attributed = Fraction(0)
    for measure in query_measures(record):
        cost = costs.get(str(measure.get("id"))) if costs else None
        if cost is None:
            continue
        dataset = str(measure.get("dataset"))
        summary.datasets[dataset].rho += cost
        population = populations.populations.get(dataset) if populations else None
        if population is not None:
            by_population[population] += cost
            attributed += cost
    summary.unattributed_rho += charged - attributed
    for population, cost in sorted(by_population.items()):
        summary.population_spend[population].charge(time, cost)


def _charged_measures(
    record: Mapping[str, Any], charged: Fraction, populations: PopulationMap | None
) -> dict[str, Fraction] | None:
    """The measures ``charged`` paid for, with their costs; None when that cannot be told."""
    costs = measure_costs(record, populations.price if populations else None)
    if costs is None or sum(costs.values(), Fraction(0)) == charged:
        return costs
    if populations is None:
        return None
    # A failed query keeps the shares of the silos that answered (its receipts) charged.
    answered = {r.get("silo") for r in record.get("receipts") or [] if isinstance(r, dict)}
    kept = {
        str(m.get("id")): costs[str(m.get("id"))]
        for m in query_measures(record)
        if populations.silos.get(str(m.get("dataset"))) in answered and str(m.get("id")) in costs
    }
    return kept if sum(kept.values(), Fraction(0)) == charged else None


# -- SVG charts ------------------------------------------------------------------------------


def _nice_step(span: float, ticks: int = 4) -> float:
    raw = span / ticks if span > 0 else 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def _number(value: float) -> str:
    return f"{value:.6g}"


def _time_label(moment: float, span: float) -> str:
    at = dt.datetime.fromtimestamp(moment, dt.UTC)
    if span <= 120:
        return at.strftime("%H:%M:%S")
    if span <= 2 * 86400:
        return at.strftime("%m-%d %H:%M")
    return at.strftime("%Y-%m-%d")


def _short(label: str) -> str:
    return label if len(label) <= _MAX_LABEL else label[: _MAX_LABEL - 1] + "…"


def _markers(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= _MAX_MARKERS:
        return list(points)
    stride = len(points) / _MAX_MARKERS
    chosen = [points[int(i * stride)] for i in range(_MAX_MARKERS - 1)]
    return [*chosen, points[-1]]


def _ranked_series(series: Mapping[str, SpendSeries]) -> list[tuple[str, SpendSeries]]:
    """The largest spenders by name; beyond the palette, the rest are summed into one line."""
    ranked = sorted(series.items(), key=lambda item: (-item[1].total, item[0]))
    if len(ranked) <= len(PALETTE):
        return ranked
    kept, rest = ranked[: len(PALETTE) - 1], ranked[len(PALETTE) - 1 :]
    others = SpendSeries()
    for _, one in rest:
        others.total += one.total
    merged = sorted(((t, inc) for _, one in rest for t, inc in _increments(one.points)))
    cumulative = 0.0
    for moment, increment in merged:
        cumulative += increment
        others.points.append((moment, cumulative))
    return [*kept, (OTHERS, others)]


def _step_columns(
    points: Sequence[tuple[float, float]], x: Callable[[float], float]
) -> list[tuple[float, float]]:
    """(x, cumulative value) per step, at most one per half unit of width (the chart is 760
    units wide): a long log has far more releases than the chart has pixels, and only the last
    total in a column shows."""
    columns: list[tuple[float, float]] = []
    for moment, value in points:
        column = round(x(moment) * 2) / 2
        if columns and columns[-1][0] == column:
            columns[-1] = (column, value)
        else:
            columns.append((column, value))
    return columns


def _increments(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    previous = 0.0
    out = []
    for moment, value in points:
        out.append((moment, value - previous))
        previous = value
    return out


def cumulative_chart(
    title: str, series: Mapping[str, SpendSeries], until: float | None = None, unit: str = "ρ"
) -> str:
    """A step line per series (cumulative spend), points marked, with a legend in HTML; the time
    axis runs to ``until`` (the log's last record) so flat stretches show as flat."""
    ranked = _ranked_series(series)
    times = [t for _, one in ranked for t, _ in one.points]
    if not times:
        return f'<p class="empty">{esc(title)}: nothing was released.</p>'
    start, end = min(times), max([*times, *([until] if until is not None else [])])
    # A margin so the first and last points are not drawn on the frame.
    margin = max((end - start) * 0.03, 1.0)
    start, end = start - margin, end + margin
    top_value = max(float(one.total) for _, one in ranked) or 1.0
    step = _nice_step(top_value)
    top = step * math.ceil(top_value / step)
    plot_w = _WIDTH - _PLOT_LEFT - _PLOT_RIGHT
    plot_h = _LINE_HEIGHT - _PLOT_TOP - _PLOT_BOTTOM

    def x(moment: float) -> float:
        return _PLOT_LEFT + (moment - start) / (end - start) * plot_w

    def y(value: float) -> float:
        return _PLOT_TOP + plot_h - value / top * plot_h

    parts = [
        f'<svg class="chart line-chart" viewBox="0 0 {_WIDTH} {_LINE_HEIGHT}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>'
    ]
    ticks = round(top / step)
    for i in range(ticks + 1):
        value = i * step
        parts.append(
            f'<line class="grid" x1="{_PLOT_LEFT}" x2="{_WIDTH - _PLOT_RIGHT}" '
            f'y1="{y(value):.1f}" y2="{y(value):.1f}"/>'
            f'<text class="tick" x="{_PLOT_LEFT - 6}" y="{y(value) + 4:.1f}" '
            f'text-anchor="end">{esc(_number(value))}</text>'
        )
    for i in range(5):
        moment = start + (end - start) * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        parts.append(
            f'<text class="tick" x="{x(moment):.1f}" y="{_LINE_HEIGHT - _PLOT_BOTTOM + 18}" '
            f'text-anchor="{anchor}">{esc(_time_label(moment, end - start))}</text>'
        )
    parts.append(
        f'<text class="axis-label" x="14" y="{_PLOT_TOP + plot_h / 2:.1f}" '
        f'transform="rotate(-90 14 {_PLOT_TOP + plot_h / 2:.1f})" text-anchor="middle">'
        f"cumulative {esc(unit)}</text>"
        f'<line class="axis" x1="{_PLOT_LEFT}" x2="{_PLOT_LEFT}" y1="{_PLOT_TOP}" '
        f'y2="{_PLOT_TOP + plot_h}"/>'
        f'<line class="axis" x1="{_PLOT_LEFT}" x2="{_WIDTH - _PLOT_RIGHT}" '
        f'y1="{_PLOT_TOP + plot_h}" y2="{_PLOT_TOP + plot_h}"/>'
    )
    legend = []
    for index, (name, one) in enumerate(ranked):
        colour = PALETTE[index]
        coordinates = [f"{x(start):.1f},{y(0):.1f}"]
        previous = 0.0
        for column, value in _step_columns(one.points, x):
            # A step: the total changes at the moment of release.
            coordinates.append(f"{column:.1f},{y(previous):.1f}")
            coordinates.append(f"{column:.1f},{y(value):.1f}")
            previous = value
        coordinates.append(f"{x(end):.1f},{y(previous):.1f}")
        parts.append(
            f'<polyline class="series" data-series="{index}" fill="none" stroke="{colour}" '
            f'stroke-width="2.5" points="{" ".join(coordinates)}"/>'
        )
        for moment, value in _markers(one.points):
            when = dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds")
            parts.append(
                f'<circle class="point" data-series="{index}" cx="{x(moment):.1f}" '
                f'cy="{y(value):.1f}" r="3.5" fill="{colour}"><title>{esc(name)}: '
                f"{esc(unit)} {esc(_number(value))} by {esc(when)}</title></circle>"
            )
        legend.append(
            f'<li><span class="swatch" style="background:{colour}"></span>{esc(name)} '
            f'<span class="muted">{esc(unit)} {esc(rho_text(one.total))} '
            f"(ε {esc(epsilon_text(one.total))})</span></li>"
        )
    parts.append("</svg>")
    return (
        f'<figure>{"".join(parts)}<figcaption><ul class="legend">{"".join(legend)}</ul>'
        "</figcaption></figure>"
    )


def bar_chart(
    title: str,
    bars: Sequence[tuple[str, float, str]],
    css_class: str,
    width: int = _WIDTH,
    label_width: int = _BAR_LABEL,
) -> str:
    """Horizontal bars: (label, value, value as shown). Labels are record strings: escaped."""
    if not bars:
        return f'<p class="empty">{esc(title)}: none.</p>'
    height = _BAR_ROW * len(bars) + 8
    top = max(value for _, value, _ in bars) or 1.0
    room = width - label_width - 70
    parts = [
        f'<svg class="chart bar-chart {css_class}" viewBox="0 0 {width} {height}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>'
    ]
    for index, (label, value, shown) in enumerate(bars):
        row_y = 4 + index * _BAR_ROW
        length = max(value / top * room, 1.0 if value > 0 else 0.0)
        parts.append(
            f'<g class="bar"><title>{esc(label)}: {esc(shown)}</title>'
            f'<text class="label" x="{label_width - 8}" y="{row_y + 16}" text-anchor="end">'
            f"{esc(_short(label))}</text>"
            f'<rect x="{label_width}" y="{row_y + 3}" width="{length:.1f}" '
            f'height="{_BAR_ROW - 8}" fill="{PALETTE[3] if css_class == "refusals" else PALETTE[0]}"/>'
            f'<text class="value" x="{label_width + length + 6:.1f}" y="{row_y + 16}">'
            f"{esc(shown)}</text></g>"
        )
    parts.append("</svg>")
    return f"<figure>{''.join(parts)}</figure>"


def policy_timeline(summary: AuditSummary) -> str:
    """One band per activation, from its activation to the next one (or the log's last record)."""
    periods = summary.activations
    if not periods or summary.last_time is None:
        return '<p class="empty">No policy activation is recorded in this log.</p>'
    start = periods[0].start.timestamp()
    end = max(summary.last_time.timestamp(), periods[-1].start.timestamp())
    if end - start < 1:  # one activation and nothing after it: a band one second wide
        end = start + 1
    height = _BAR_ROW * len(periods) + 30
    room = _WIDTH - _BAR_LABEL - 20
    versions = list(dict.fromkeys(p.version for p in periods))

    def x(moment: float) -> float:
        return _BAR_LABEL + (moment - start) / (end - start) * room

    parts = [
        f'<svg class="chart timeline" viewBox="0 0 {_WIDTH} {height}" role="img" '
        'xmlns="http://www.w3.org/2000/svg"><title>Policy versions in force</title>'
    ]
    for index, period in enumerate(periods):
        until = periods[index + 1].start.timestamp() if index + 1 < len(periods) else end
        row_y = 4 + index * _BAR_ROW
        colour = PALETTE[versions.index(period.version) % len(PALETTE)]
        left = x(period.start.timestamp())
        width = max(x(until) - left, 2.0)
        parts.append(
            f'<g class="period"><title>{esc(period.version)} from '
            f"{esc(period.start.isoformat(timespec='seconds'))} (record {period.seq})</title>"
            f'<text class="label" x="{_BAR_LABEL - 8}" y="{row_y + 16}" text-anchor="end">'
            f"{esc(period.version[:16] or '(no version)')}</text>"
            f'<rect x="{left:.1f}" y="{row_y + 3}" width="{width:.1f}" height="{_BAR_ROW - 8}" '
            f'fill="{colour}"/></g>'
        )
    axis_y = height - 8
    for i, moment in enumerate((start, end)):
        parts.append(
            f'<text class="tick" x="{x(moment):.1f}" y="{axis_y}" '
            f'text-anchor="{"start" if i == 0 else "end"}">'
            f"{esc(_time_label(moment, end - start))}</text>"
        )
    parts.append("</svg>")
    return f"<figure>{''.join(parts)}</figure>"


# -- the page --------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1b1b;
background:#fff;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:1.7rem;margin:0 0 4px}h2{font-size:1.25rem;margin:36px 0 8px;
border-bottom:2px solid #e3e3e3;padding-bottom:4px}
.muted,.meta{color:#5a5a5a}.meta{margin:0 0 16px;font-size:.92rem}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}
.card{border:1px solid #d9d9d9;border-radius:6px;padding:8px 14px;min-width:110px}
.card strong{display:block;font-size:1.35rem}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:0 32px}
@media (max-width:820px){.pair{grid-template-columns:1fr}}
figure{margin:8px 0 4px}svg.chart{width:100%;height:auto;display:block}
svg text{font-family:inherit;font-size:12px;fill:#1b1b1b}svg .tick{fill:#5a5a5a;font-size:11px}
svg .grid{stroke:#e6e6e6;stroke-width:1}svg .axis{stroke:#8a8a8a;stroke-width:1}
.legend{list-style:none;padding:0;margin:6px 0;display:flex;flex-wrap:wrap;gap:6px 18px}
.swatch{display:inline-block;width:14px;height:14px;border-radius:3px;margin-right:6px;
vertical-align:-2px}
table{border-collapse:collapse;width:100%;font-size:.88rem;margin:8px 0}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e6e6e6;vertical-align:top}
th{background:#f4f4f4}td.num,th.num{text-align:right}
td.wrap{overflow-wrap:anywhere;max-width:320px}.empty{color:#5a5a5a;font-style:italic}
code{font-size:.85rem}
@media print{main{max-width:none}h2{break-after:avoid}figure{break-inside:avoid}}
"""


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], numeric: set[int]) -> str:
    head = "".join(
        f'<th class="num">{esc(h)}</th>' if i in numeric else f"<th>{esc(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{esc(c)}</td>' if i in numeric else f'<td class="wrap">{esc(c)}</td>'
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(summary: AuditSummary, *, source: str, generated: dt.datetime) -> str:
    """The whole page as one string."""
    span = (
        f"{summary.first_time.isoformat(timespec='seconds')} to "
        f"{summary.last_time.isoformat(timespec='seconds')}"
        if summary.first_time and summary.last_time
        else "no timed records"
    )
    seqs = (
        f"records {summary.first_seq} to {summary.last_seq}"
        if summary.first_seq is not None
        else "no records"
    )
    cards = [
        ("records", summary.records),
        ("queries", summary.kinds.get("query", 0)),
        *(
            (decision, summary.decisions.get(decision, 0))
            for decision in ("released", "cached", "denied", "rejected", "failed")
        ),
        ("explains", summary.kinds.get("explain", 0)),
        ("ρ charged", rho_text(summary.charged_rho)),
        ("consumers", len(summary.consumers)),
    ]
    sections = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # No scripts, no network: the policy forbids both even if something slipped through.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">",
        "<title>Silogate audit report</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<h1>Silogate audit report</h1>",
        f'<p class="meta">Log <code>{esc(source)}</code> · {esc(seqs)} · {esc(span)} · '
        f"generated {esc(generated.isoformat(timespec='seconds'))}. This report reads the log as "
        "it is: run <code>silogate audit verify</code> to check that no record was changed or "
        "removed.</p>",
        '<div class="cards">'
        + "".join(f'<div class="card"><strong>{esc(v)}</strong>{esc(k)}</div>' for k, v in cards)
        + "</div>",
        *_decision_sections(summary),
        *_budget_sections(summary),
        *_dataset_sections(summary),
        *_policy_sections(summary),
        *_refusal_table(summary),
        "</main></body></html>",
    ]
    return "\n".join(sections) + "\n"


def _budget_sections(summary: AuditSummary) -> list[str]:
    until = summary.last_time.timestamp() if summary.last_time else None
    consumer_rows = [
        (
            name,
            who.queries,
            who.released,
            who.refused,
            rho_text(summary.consumer_spend[name].total) if name in summary.consumer_spend else "0",
            epsilon_text(summary.consumer_spend[name].total)
            if name in summary.consumer_spend
            else "0",
            who.last,
        )
        for name, who in sorted(summary.consumers.items())
    ]
    out = [
        '<section id="budget-consumers"><h2>Budget spent over time, per consumer</h2>',
        '<p class="muted">Cumulative ρ (zCDP) charged by released queries, and by failed '
        "queries for the silos that had already released. ρ adds up across queries; ε is the "
        "single pure-DP query of the same cost (ε = √(2ρ)). Cached answers and replays cost "
        f"nothing. Failed queries kept ρ {esc(rho_text(summary.failed_rho))} charged.</p>",
        cumulative_chart("Cumulative ρ per consumer", summary.consumer_spend, until),
        _table(
            ("consumer", "queries", "released", "refused", "ρ spent", "as ε", "last query"),
            consumer_rows,
            {1, 2, 3, 4, 5},
        ),
        "</section>",
        '<section id="budget-populations"><h2>Budget spent over time, per population</h2>',
    ]
    if not summary.populations_known:
        out.append(
            '<p class="empty">Records name datasets, not populations: give the policy bundle '
            "(<code>--policy DIR</code>) to see spending per population.</p>"
        )
    else:
        out.append(
            '<p class="muted">Each measure is charged to its dataset\'s population, as the '
            "population budget is charged.</p>"
        )
        out.append(cumulative_chart("Cumulative ρ per population", summary.population_spend, until))
        if summary.unattributed_rho:
            out.append(
                f'<p class="muted">ρ {esc(rho_text(summary.unattributed_rho))} was released on '
                "datasets the given bundle does not declare, or its split over measures could "
                "not be told: it is in no population line.</p>"
            )
    out.append("</section>")
    return out


def _decision_sections(summary: AuditSummary) -> list[str]:
    decisions = sorted(summary.decisions.items(), key=lambda item: (-item[1], item[0]))
    reasons = summary.reasons.most_common(_TOP_REASONS)
    explains = ", ".join(f"{k}: {v}" for k, v in sorted(summary.explains.items())) or "none"
    # Side by side and near the top: the first screen answers "what happened" at a glance.
    half = {"width": _HALF_WIDTH, "label_width": _HALF_LABEL}
    return [
        '<div class="pair"><section id="decisions"><h2>Queries per decision</h2>',
        bar_chart(
            "Queries per decision", [(k, v, str(v)) for k, v in decisions], "decisions", **half
        ),
        f'<p class="muted">Explain requests (no spending): {esc(explains)}.</p></section>',
        '<section id="denials"><h2>Denials by reason</h2>',
        bar_chart("Denials by reason", [(k, v, str(v)) for k, v in reasons], "refusals", **half),
        '<p class="muted">Queries denied (policy, budget), rejected (invalid) or failed, by '
        "reason code.</p></section></div>",
    ]


def _dataset_sections(summary: AuditSummary) -> list[str]:
    ranked = sorted(summary.datasets.items(), key=lambda item: (-item[1].queries, item[0]))
    top = ranked[:_TOP_DATASETS]
    return [
        '<section id="datasets"><h2>Top datasets</h2>',
        bar_chart(
            "Queries per dataset", [(k, d.queries, str(d.queries)) for k, d in top], "datasets"
        ),
        _table(
            ("dataset", "queries", "released", "refused", "ρ charged", "as ε"),
            (
                (k, d.queries, d.released, d.refused, rho_text(d.rho), epsilon_text(d.rho))
                for k, d in top
            ),
            {1, 2, 3, 4, 5},
        ),
        f'<p class="muted">{len(ranked)} dataset(s) in all.</p></section>',
    ]


def _policy_sections(summary: AuditSummary) -> list[str]:
    rows = [
        (
            p.version,
            p.start.isoformat(timespec="seconds"),
            p.seq,
            summary.versions_used.get(p.version, 0),
        )
        for p in summary.activations
    ]
    out = [
        '<section id="policy"><h2>Policy versions in force</h2>',
        policy_timeline(summary),
        _table(("version", "activated", "record", "queries decided"), rows, {2, 3}),
    ]
    if summary.policy_refusals:
        out.append("<h3>Refused policy bundles</h3>")
        out.append(
            _table(
                ("time", "refused version", "kept version", "reason", "problems"),
                (
                    (
                        text_field(r, "time"),
                        text_field(r, "refused_version"),
                        text_field(r, "active_version"),
                        text_field(r, "reason"),
                        r.get("problem_count", ""),
                    )
                    for r in summary.policy_refusals
                ),
                {4},
            )
        )
    out.append("</section>")
    return out


def _refusal_table(summary: AuditSummary) -> list[str]:
    rows = [
        (
            r.get("seq", ""),
            text_field(r, "time"),
            text_field(r, "consumer"),
            text_field(r, "purpose"),
            text_field(r, "request_id"),
            text_field(r, "decision"),
            text_field(r, "reason"),
            text_field(r, "message"),
        )
        for r in reversed(summary.latest_refusals)
    ]
    return [
        '<section id="latest-refusals"><h2>Latest refused queries</h2>',
        _table(
            (
                "record",
                "time",
                "consumer",
                "purpose",
                "request id",
                "decision",
                "reason",
                "message",
            ),
            rows,
            {0},
        )
        if rows
        else '<p class="empty">No query was refused.</p>',
        "</section>",
    ]


def write_report(
    directory: Path, out: Path, *, policy: Path | None = None, now: dt.datetime | None = None
) -> AuditSummary:
    """Read the log in ``directory`` and write the report to ``out`` (replaced atomically)."""
    populations = PopulationMap.from_bundle(policy) if policy is not None else None
    summary = summarise(iter_records(directory), populations)
    page = render_report(summary, source=str(directory), generated=now or dt.datetime.now(dt.UTC))
    out.parent.mkdir(parents=True, exist_ok=True)
    # A half-written report must never look like a finished one: write beside it, then rename.
    # (Mode "x" with the process's umask, as any other file the auditor writes; mkstemp's 0600
    # would hide the report from whoever it is for.)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("x", encoding="utf-8") as stream:
            stream.write(page)
        os.replace(temporary, out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return summary
