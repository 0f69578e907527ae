"""PolicyHolder without servers: activation, refusal, change detection, the watcher task."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import edit_rule, wait_until

from gateway.errors import ConfigurationError, PolicyInvalid
from gateway.policy.holder import PolicyHolder
from gateway.policy.loader import bundle_version
from gateway.policy.model import Bundle
from gateway.policy.signing import sign_bundle

LOGGER = logging.getLogger("tests.policy_runtime")
RULE = "civil-elderly-care"  # the rule the bundle_dir fixture pins (see conftest.py)


class Events:
    """What the holder reported, in order."""

    def __init__(self) -> None:
        self.activated: list[str] = []
        self.refused: list[PolicyInvalid] = []

    def holder(
        self,
        root: Path,
        verify_key: Path | None = None,
        check: Callable[[Bundle], None] | None = None,
    ) -> PolicyHolder:
        return PolicyHolder(
            root,
            verify_key,
            on_activate=lambda bundle: self.activated.append(bundle.version),
            logger=LOGGER,
            on_refuse=self.refused.append,
            check=check,
        )


def settle_twice(holder: PolicyHolder) -> bool:
    """Two watcher steps: the first sees a change, the second (files unchanged) loads it."""
    first = holder.poll()
    return holder.poll() or first


def test_start_up_activates_the_bundle(bundle_dir: Path) -> None:
    events = Events()
    holder = events.holder(bundle_dir)
    assert holder.current.version == bundle_version(bundle_dir)
    assert events.activated == [holder.current.version]


def test_start_up_with_an_invalid_bundle_raises(bundle_dir: Path) -> None:
    (bundle_dir / "rules.yaml").write_text("rules: [\n")
    events = Events()
    with pytest.raises(PolicyInvalid):
        events.holder(bundle_dir)
    assert events.activated == []


def test_reload_swaps_in_a_valid_change(bundle_dir: Path) -> None:
    events = Events()
    holder = events.holder(bundle_dir)
    old = holder.current
    edit_rule(bundle_dir, RULE, max_epsilon_per_query="2")
    assert holder.reload() is True
    assert holder.current.version == bundle_version(bundle_dir) != old.version
    assert str(holder.current.rules[RULE].max_epsilon_per_query) == "2"
    assert events.activated == [old.version, holder.current.version]
    # The same files again: nothing to activate, nothing reported.
    assert holder.reload() is False
    assert len(events.activated) == 2


def test_an_invalid_change_keeps_the_old_bundle_and_logs_one_line(
    bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = Events()
    holder = events.holder(bundle_dir)
    old = holder.current
    (bundle_dir / "rules.yaml").write_text("rules:\n  broken: [\n")
    with caplog.at_level(logging.ERROR, logger=LOGGER.name):
        assert holder.reload() is False
    assert holder.current is old
    assert len(events.refused) == 1 and events.refused[0].reason == "POLICY_INVALID"
    [line] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert line.__dict__["active_version"] == old.version
    assert line.__dict__["refused_version"] == bundle_version(bundle_dir)
    assert line.__dict__["problems"][0].startswith("rules.yaml:")


def test_a_process_check_can_refuse_a_bundle(bundle_dir: Path) -> None:
    """A silo refuses a bundle naming a table its database lacks, with the check's reason."""

    def check(bundle: Bundle) -> None:
        if "spare" in bundle.rules[RULE].description:
            raise ConfigurationError("lacks table spare", reason="DATA_MISSING")

    events = Events()
    holder = events.holder(bundle_dir, check=check)
    old = holder.current
    edit_rule(bundle_dir, RULE, description="spare")
    assert holder.reload() is False
    assert holder.current is old
    assert events.refused[0].reason == "DATA_MISSING"
    assert str(events.refused[0].problems[0]) == "lacks table spare"


def test_poll_waits_for_the_files_to_stop_changing(bundle_dir: Path) -> None:
    events = Events()
    holder = events.holder(bundle_dir)
    edit_rule(bundle_dir, RULE, description="first change")
    assert holder.poll() is False  # seen, not loaded: an editor may still be writing
    assert len(events.activated) == 1
    assert holder.poll() is True
    assert holder.current.version == bundle_version(bundle_dir)
    assert holder.poll() is False
    assert len(events.activated) == 2


def test_a_half_written_file_is_refused_once_then_the_complete_one_applies(
    bundle_dir: Path,
) -> None:
    events = Events()
    holder = events.holder(bundle_dir)
    old = holder.current
    rules = bundle_dir / "rules.yaml"
    original = rules.read_text()
    complete = original.replace("min_group_size: 5", "min_group_size: 6", 1)
    assert complete != original
    rules.write_text(complete[: len(complete) // 2])
    assert settle_twice(holder) is False
    assert holder.current is old
    assert len(events.refused) == 1
    # Unchanged files are not loaded (nor reported) again at every poll.
    assert holder.poll() is False and holder.poll() is False
    assert len(events.refused) == 1
    rules.write_text(complete)
    assert settle_twice(holder) is True
    assert holder.current.version == bundle_version(bundle_dir)


def test_a_change_that_keeps_size_and_mtime_is_still_seen(bundle_dir: Path) -> None:
    """mtime comes from a coarse clock: two writes in one tick look identical to ``stat``. A
    fingerprint with recently modified files is not trusted until they are older."""
    rules = bundle_dir / "rules.yaml"
    tick = time.time_ns()
    os.utime(rules, ns=(tick, tick))
    events = Events()
    holder = events.holder(bundle_dir)
    assert holder.poll() is False  # nothing changed yet
    text = rules.read_text()
    assert "min_group_size: 5" in text
    rules.write_text(text.replace("min_group_size: 5", "min_group_size: 7", 1))
    os.utime(rules, ns=(tick, tick))  # the same tick, the same size: the same fingerprint
    assert holder.poll() is True
    assert holder.current.version == bundle_version(bundle_dir)


def test_with_a_key_an_unsigned_change_is_refused_until_signed(
    bundle_dir: Path, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    sign_bundle(bundle_dir, private)
    events = Events()
    holder = events.holder(bundle_dir, public)
    old = holder.current
    edit_rule(bundle_dir, RULE, description="not yet signed")
    assert settle_twice(holder) is False
    assert holder.current is old
    assert events.refused[-1].reason == "POLICY_SIGNATURE_INVALID"
    # Signing changes only manifest.txt and bundle.sig, which the watcher watches too.
    sign_bundle(bundle_dir, private)
    assert settle_twice(holder) is True
    assert holder.current.version == bundle_version(bundle_dir) != old.version


def test_the_watch_task_applies_changes_and_stops(bundle_dir: Path) -> None:
    events = Events()

    async def scenario() -> tuple[str, str]:
        holder = events.holder(bundle_dir)
        holder.start_watching(0.02)
        edit_rule(bundle_dir, RULE, description="watched change")
        expected = bundle_version(bundle_dir)
        await asyncio.to_thread(wait_until, lambda: holder.current.version == expected)
        await holder.stop_watching()
        edit_rule(bundle_dir, RULE, description="after the watcher stopped")
        # Stopped means stopped: neither the watcher nor an explicit reload applies it.
        await asyncio.sleep(0.1)
        reloaded = holder.reload()
        assert reloaded is False
        return holder.current.version, expected

    current, expected = asyncio.run(scenario())
    assert current == expected
    assert events.activated[-1] == expected and len(events.activated) == 2


def test_a_bundle_is_never_active_without_its_activation_record(bundle_dir: Path) -> None:
    """If the activation cannot be recorded (audit log unavailable), the old bundle stays and
    the next poll tries again."""
    attempts: list[str] = []
    recorded: list[str] = []

    def on_activate(bundle: Bundle) -> None:
        attempts.append(bundle.version)
        if len(attempts) == 2:  # the first reload
            raise OSError("no space left on device")
        recorded.append(bundle.version)

    holder = PolicyHolder(bundle_dir, None, on_activate, LOGGER)
    old = holder.current
    edit_rule(bundle_dir, RULE, description="recorded later")
    assert holder.poll() is False
    with pytest.raises(OSError):
        holder.poll()
    assert holder.current is old
    assert recorded == [old.version]
    assert holder.poll() is True
    assert recorded == [old.version, holder.current.version]
