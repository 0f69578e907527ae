"""`silogate audit report`: figures from a real log, escaping of caller strings, and the page as
headless Chromium draws it (a screenshot with the charts' colours in it)."""

from __future__ import annotations

import html
import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from audit_scenario import (
    SECOND_POPULATION,
    XSS_PURPOSE,
    XSS_RELEASED_ID,
    XSS_REQUEST_ID,
    AuditScenario,
    audit_scenario,
)

from gateway.audit.report import PALETTE, AuditSummary, PopulationMap, summarise, write_report
from gateway.audit.store import iter_records
from gateway.cli import main
from gateway.privacy.noise import plan_noise
from gateway.privacy.sensitivity import Sensitivity
from gateway.query.form import Spend

CHROMIUM = Path("/usr/bin/chromium")
PAYLOADS = (XSS_REQUEST_ID, XSS_PURPOSE, XSS_RELEASED_ID)


def _target_rho(error: int) -> Fraction:
    # Both target-error datasets count one row per person: sensitivity 1.
    return plan_noise(Sensitivity(1, 1), Spend(target_error=Fraction(error))).rho


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, pki: Any, data_dir: Path) -> AuditScenario:
    return audit_scenario(tmp_path_factory, pki, data_dir)


@pytest.fixture(scope="module")
def report(scenario: AuditScenario, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "audit.html"
    code = main(
        [
            "audit",
            "report",
            str(scenario.gateway_log),
            "--html",
            str(out),
            "--policy",
            str(scenario.policy),
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def summary(scenario: AuditScenario) -> AuditSummary:
    return summarise(iter_records(scenario.gateway_log), PopulationMap.from_bundle(scenario.policy))


class _Elements(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    parser.close()
    return parser


def _section(page: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S)
    assert match, section_id
    return match.group(1)


def test_the_report_is_one_file_without_scripts_or_requests(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    parsed = _parse(page)
    tags = {tag for tag, _ in parsed.tags}
    assert not tags & {"script", "link", "img", "iframe", "object", "embed", "image", "use"}
    for tag, attrs in parsed.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        assert not {"src", "href", "xlink:href"} & set(attrs), (tag, attrs)
    # The only URL is the SVG namespace name, which is never fetched.
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "default-src 'none'" in page  # a second wall, should anything slip through


def test_caller_strings_are_text_never_markup(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    for payload in PAYLOADS:
        assert payload not in page
    assert html.escape(XSS_REQUEST_ID, quote=True) in page
    assert html.escape(XSS_PURPOSE, quote=True) in page
    parsed = _parse(page)
    assert not {tag for tag, _ in parsed.tags} & {"b", "img", "script"}
    # Shown to the reader as written: the refusals table has the request id and the purpose.
    text = "".join(parsed.text)
    assert XSS_REQUEST_ID in text and XSS_PURPOSE in text


def test_spending_per_consumer_over_time(report: Path, summary: AuditSummary) -> None:
    # The failed two-silo query keeps civil's share (1/8) charged: it counts, at its time.
    expected = {
        "civil-affairs": Fraction(1, 4)
        + _target_rho(20)
        + _target_rho(40)
        + Fraction(1, 8)
        + Fraction(1, 8),
        "org-department": Fraction(1, 8) + Fraction(1, 32) + Fraction(1, 8),
        "grid-centre": Fraction(1, 50),
    }
    assert {name: s.total for name, s in summary.consumer_spend.items()} == expected
    assert [len(summary.consumer_spend[n].points) for n in expected] == [4, 3, 1]
    assert summary.failed_rho == Fraction(1, 8)
    section = _section(report.read_text(encoding="utf-8"), "budget-consumers")
    lines = re.findall(r'<polyline class="series" data-series="(\d)"', section)
    assert sorted(lines) == ["0", "1", "2"]
    points = Counter(re.findall(r'<circle class="point" data-series="(\d)"', section))
    # Ranked by spend: civil-affairs, org-department, grid-centre; one point per release.
    assert points == {"0": 4, "1": 3, "2": 1}
    assert "org-department <span" in section and "ρ 9/32" in section
    # The consumer table counts every query, the refused ones too.
    assert summary.consumers["org-department"].queries == 6
    assert summary.consumers["org-department"].refused == 3


def test_spending_per_population_prices_each_measure(summary: AuditSummary, report: Path) -> None:
    # Under the final bundle org.* belongs to the second population. The two target-error
    # measures of one query cost different amounts: each goes to its own population.
    assert {name: s.total for name, s in summary.population_spend.items()} == {
        # civil.residents of the failed query too: civil answered, its receipt says so.
        "city-residents": Fraction(1, 8)
        + _target_rho(20)
        + Fraction(1, 8)
        + Fraction(1, 50)
        + Fraction(1, 8),
        SECOND_POPULATION: Fraction(1, 8)
        + _target_rho(40)
        + Fraction(1, 8)
        + Fraction(1, 32)
        + Fraction(1, 8),
    }
    assert summary.unattributed_rho == 0
    section = _section(report.read_text(encoding="utf-8"), "budget-populations")
    assert len(re.findall(r'<polyline class="series"', section)) == 2
    assert SECOND_POPULATION in section


def test_without_a_bundle_populations_are_not_guessed(
    scenario: AuditScenario, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    summary = write_report(scenario.gateway_log, out)
    assert summary.population_spend == {}
    section = _section(out.read_text(encoding="utf-8"), "budget-populations")
    assert "--policy DIR" in section and "<polyline" not in section
    # Per dataset, each target-error measure costs what the gateway recorded for its noise
    # components, not an even split of the query's total.
    assert summary.datasets["org.members"].rho == Fraction(1, 8) + _target_rho(40) + Fraction(
        1, 32
    ) + Fraction(1, 8)


def test_decisions_and_denials_by_reason(
    scenario: AuditScenario, report: Path, summary: AuditSummary
) -> None:
    queries = [r for r in scenario.gateway_records() if r["kind"] == "query"]
    assert summary.decisions == Counter(r["decision"] for r in queries)
    assert {"released", "cached", "denied", "rejected", "failed"} <= set(summary.decisions)
    refused = [r for r in queries if r["decision"] in {"denied", "rejected", "failed"}]
    assert summary.reasons == Counter(r["reason"] for r in refused)
    page = report.read_text(encoding="utf-8")
    denials = _section(page, "denials")
    bars = re.findall(r'<g class="bar"><title>([^<]*): (\d+)</title>', denials)
    assert {(label, int(n)) for label, n in bars} == set(summary.reasons.items())
    assert "SILO_UNAVAILABLE" in denials and "POLICY_DENIED" in denials
    decisions = _section(page, "decisions")
    assert len(re.findall(r'<g class="bar">', decisions)) == len(summary.decisions)


def test_top_datasets_and_policy_versions(
    scenario: AuditScenario, report: Path, summary: AuditSummary
) -> None:
    page = report.read_text(encoding="utf-8")
    datasets = _section(page, "datasets")
    bars = re.findall(r'<g class="bar"><title>([^<]*): (\d+)</title>', datasets)
    assert bars[0] == ("org.members", "7")  # the most used dataset comes first
    assert dict((k, int(v)) for k, v in bars) == {
        name: d.queries for name, d in summary.datasets.items()
    }
    versions = [
        r["policy_version"] for r in scenario.gateway_records() if r["kind"] == "policy_activated"
    ]
    assert len(versions) == 2
    policy = _section(page, "policy")
    assert len(re.findall(r'<g class="period">', policy)) == 2
    for version in versions:
        assert version in policy
    # Queries decided under each version, as the table lists them.
    assert summary.versions_used[versions[1]] == 4


def _png_pixels(path: Path) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Decode a non-interlaced 8-bit RGB or RGBA PNG (what Chromium writes) into pixels.

    A test-sized PNG reader (chunks, zlib, the five scanline filters) so the test needs no
    imaging library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    position, chunks = 8, []
    width = height = channels = 0
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            chunks.append(body)
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    assert len(raw) == height * (stride + 1)
    pixels = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.uint8)
    for row in range(height):
        start = row * (stride + 1)
        kind = raw[start]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=start + 1)
        if kind == 0:
            current = line.copy()
        elif kind == 1:  # Sub: a running sum along the row, per channel
            sums = np.cumsum(line.reshape(width, channels).astype(np.int64), axis=0) % 256
            current = sums.astype(np.uint8).reshape(stride)
        elif kind == 2:  # Up
            current = line + previous
        else:  # Average and Paeth depend on the pixel just decoded: byte by byte
            filtered, above, out = line.tolist(), previous.tolist(), bytearray(stride)
            for i in range(stride):
                left = out[i - channels] if i >= channels else 0
                if kind == 3:
                    predicted = (left + above[i]) >> 1
                else:
                    corner = above[i - channels] if i >= channels else 0
                    pa, pb = abs(above[i] - corner), abs(left - corner)
                    pc = abs(left + above[i] - 2 * corner)
                    predicted = left if pa <= pb and pa <= pc else above[i] if pb <= pc else corner
                out[i] = (filtered[i] + predicted) & 0xFF
            current = np.frombuffer(bytes(out), dtype=np.uint8)
        pixels[row] = current
        previous = current
    return pixels.reshape(height, width, channels)[:, :, :3]


def _colour_counts(pixels: np.ndarray[Any, np.dtype[np.uint8]]) -> Counter[str]:
    flat = pixels.reshape(-1, 3).astype(np.uint32)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    values, counts = np.unique(packed, return_counts=True)
    return Counter({f"#{int(v):06x}": int(c) for v, c in zip(values, counts, strict=True)})


def _chromium(*arguments: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM.exists(), (
        "headless Chromium is needed: apt-get install -y chromium (.ci/run installs it)"
    )
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_chromium_draws_the_charts(report: Path, tmp_path: Path) -> None:
    screenshot = tmp_path / "report.png"
    done = _chromium(
        f"--screenshot={screenshot}",
        "--window-size=1280,2000",
        "--hide-scrollbars",
        report.as_uri(),
        profile=tmp_path / "profile",
    )
    assert screenshot.exists(), done.stderr[-2000:]
    assert screenshot.stat().st_size > 20_000
    pixels = _png_pixels(screenshot)
    assert pixels.shape == (2000, 1280, 3)
    colours = _colour_counts(pixels)
    assert len(colours) > 50  # text, lines and bars, not one flat colour
    assert colours["#ffffff"] < pixels.shape[0] * pixels.shape[1] * 0.97
    # The chart colours are on screen: the three consumers' lines and points, the bars of the
    # decision chart (first palette colour) and the denial bars (fourth).
    for colour in (PALETTE[0], PALETTE[1], PALETTE[2], PALETTE[3]):
        assert colours[colour] >= 40, (colour, colours[colour])
    assert colours[PALETTE[0]] >= 2_000  # a filled bar, not only thin lines


def test_chromium_runs_none_of_the_callers_markup(report: Path, tmp_path: Path) -> None:
    done = _chromium("--dump-dom", report.as_uri(), profile=tmp_path / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert "<svg" in dom and 'class="series"' in dom  # the page was loaded and parsed
    assert "<script" not in dom and "<img" not in dom and "<b " not in dom
    assert html.escape(XSS_RELEASED_ID, quote=False) in dom or XSS_RELEASED_ID not in dom


def test_report_of_an_empty_log(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    out = tmp_path / "report.html"
    summary = write_report(log, out)
    page = out.read_text(encoding="utf-8")
    assert summary.records == 0
    assert "nothing was released" in page and "No query was refused" in page


def test_the_report_file_is_replaced_whole(scenario: AuditScenario, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("stale", encoding="utf-8")
    write_report(scenario.gateway_log, out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left


def test_chromium_is_installed_by_make_test() -> None:
    # The render test installs nothing itself; `make test` does, as root, before running pytest.
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text(encoding="utf-8")
    assert "apt-get install" in makefile and "chromium" in makefile
    assert "test: $(STAMP) $(CHROMIUM)" in makefile
    assert shutil.which(str(CHROMIUM)) is not None
