"""The active policy bundle of a running gateway or silo, and the watcher that hot-reloads it.

:class:`PolicyHolder` keeps one validated (and, when a key is configured, verified) bundle in
``current``. A reload loads the folder again; a new version replaces ``current`` as one reference
assignment, so a request that read ``current`` once keeps a consistent bundle to its end. A
refused bundle (invalid, unsigned, badly signed, or failing the process's own ``check``) changes
nothing: the previous bundle stays active, one structured error line is logged and ``on_refuse``
is told.

The watcher polls cheaply: one ``stat`` per file; only when that fingerprint changed and stayed
unchanged for one more interval (an editor may still be writing) does it hash the files, and only
when the content changed does it load. A bundle caught mid-write just fails validation and is
tried again when its files change.

This module never half-applies a bundle, never activates one that was not loaded whole, and never
activates one whose activation could not be reported (recorded in the audit log).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway.errors import PolicyInvalid, PolicyProblem, SilogateError
from gateway.policy.loader import bundle_files, manifest_text
from gateway.policy.model import Bundle
from gateway.policy.signing import MANIFEST_FILE, SIGNATURE_FILE, load_policy

# Files modified this recently may still change without changing their (size, mtime): mtime
# comes from a coarse clock (milliseconds on Linux, up to 2 s on some file systems). Until they
# are older, each poll compares the content itself (as git does for "racily clean" files).
_RACY_NANOSECONDS = 2_000_000_000
# How many problems an audit record or log line carries; the count is always given in full.
_MAX_REPORTED_PROBLEMS = 10

Fingerprint = tuple[tuple[str, int, int], ...]


class PolicyHolder:
    """The active bundle, loaded at construction (start-up fails if it is refused)."""

    def __init__(
        self,
        root: Path,
        verify_key: Path | None,
        on_activate: Callable[[Bundle], None],
        logger: logging.Logger,
        *,
        on_refuse: Callable[[PolicyInvalid], None] | None = None,
        check: Callable[[Bundle], None] | None = None,
    ) -> None:
        """``check`` may raise a SilogateError to refuse a bundle this process cannot serve (a
        silo whose database lacks a declared table); at start-up its error is raised as is."""
        self.root = Path(root)
        self.verify_key = verify_key
        self._on_activate = on_activate
        self._on_refuse = on_refuse
        self._check = check
        self._log = logger
        # Serialises reloads (the watcher's thread, an explicit reload) and close().
        self._lock = threading.Lock()
        self._closed = False
        self._watcher: asyncio.Task[None] | None = None
        # Taken before the first load: a change made during the load is then seen as a change.
        self._previous = self._fingerprint()
        self._settled: Fingerprint | None = None
        self._digest = self._content_digest()
        bundle = load_policy(self.root, verify_key)
        if check is not None:
            check(bundle)
        self._on_activate(bundle)
        self.current: Bundle = bundle
        self._log_activation(bundle)

    # -- reloading --------------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the folder again; True when a new version became active.

        The same version as the active one changes nothing. A refused bundle keeps the active
        one, is logged and reported to ``on_refuse``; nothing is raised. A failing ``on_activate``
        (the audit log unavailable) raises and keeps the active bundle: no bundle is ever active
        without its activation record.
        """
        with self._lock:
            if self._closed:
                return False
            try:
                bundle = load_policy(self.root, self.verify_key)
                if self._check is not None:
                    self._check(bundle)
            except SilogateError as err:
                self._refused(_as_policy_invalid(err))
                return False
            if bundle.version == self.current.version:
                return False
            self._on_activate(bundle)
            self.current = bundle
            self._log_activation(bundle)
            return True

    def poll(self) -> bool:
        """One watcher step (blocking file I/O); True when a new version became active."""
        fingerprint = self._fingerprint()
        if fingerprint is None or fingerprint == self._settled:
            return False
        if fingerprint != self._previous:
            # Changed since the last poll: wait until it stops changing before loading.
            self._previous = fingerprint
            return False
        digest = self._content_digest()
        if digest is None:
            return False
        activated = False
        if digest != self._digest:
            activated = self.reload()
            # Remembered only once handled (a raise is retried at the next poll), and taken
            # before loading: files changed during the load differ from it and load again.
            self._digest = digest
        trusted_before = time.time_ns() - _RACY_NANOSECONDS
        if all(mtime < trusted_before for _, _, mtime in fingerprint):
            self._settled = fingerprint
        return activated

    async def watch(self, interval_seconds: float) -> None:
        """Poll every ``interval_seconds`` until cancelled; loading runs in a worker thread."""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await asyncio.to_thread(self.poll)
            except Exception:
                # A watcher that died would silently freeze the policy: log and keep watching.
                self._log.exception(
                    "policy watcher failed; retrying", extra={"policy_root": str(self.root)}
                )

    def start_watching(self, interval_seconds: float) -> None:
        """Start :meth:`watch` on the running loop; 0 (or less) disables hot reload."""
        if interval_seconds > 0 and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(
                self.watch(interval_seconds), name=f"policy-watch:{self.root}"
            )

    async def stop_watching(self) -> None:
        """Cancel the watcher and wait for a reload in progress; later reloads do nothing."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            self._closed = True

    # -- reporting --------------------------------------------------------------------------

    def _log_activation(self, bundle: Bundle) -> None:
        self._log.info(
            "policy bundle activated",
            extra={"policy_root": str(self.root), "policy_version": bundle.version},
        )

    def _refused(self, err: PolicyInvalid) -> None:
        self._log.error(
            "policy bundle refused; the previous bundle stays active",
            extra={"policy_root": str(self.root), **self.refusal_fields(err)},
        )
        if self._on_refuse is not None:
            self._on_refuse(err)

    def refusal_fields(self, err: PolicyInvalid) -> dict[str, object]:
        """What a log line or an audit record says about a refused bundle."""
        return {
            "refused_version": err.metadata.get("policy_version"),
            "active_version": self.current.version,
            "reason": err.reason,
            "problem_count": len(err.problems),
            "problems": [str(p) for p in err.problems[:_MAX_REPORTED_PROBLEMS]],
        }

    # -- change detection -------------------------------------------------------------------

    def _watched_files(self) -> list[Path]:
        # The signature files are outside the version but a re-signed bundle must be seen.
        extra = [self.root / MANIFEST_FILE, self.root / SIGNATURE_FILE]
        return [*bundle_files(self.root), *(p for p in extra if p.is_file())]

    def _fingerprint(self) -> Fingerprint | None:
        """(path, size, mtime) of every watched file; None while a file vanishes mid-scan."""
        try:
            stats = [(p.relative_to(self.root).as_posix(), p.stat()) for p in self._watched_files()]
        except OSError:
            return None
        return tuple((rel, st.st_size, st.st_mtime_ns) for rel, st in stats)

    def _content_digest(self) -> str | None:
        """SHA-256 over the manifest of the files and the signature files; None if unreadable."""
        digest = hashlib.sha256()
        try:
            digest.update(manifest_text(self.root).encode())
            for name in (MANIFEST_FILE, SIGNATURE_FILE):
                path = self.root / name
                if not path.is_file():
                    digest.update(b"\0-")
                    continue
                with path.open("rb") as handle:  # streamed: the file may be huge and hostile
                    digest.update(b"\0" + hashlib.file_digest(handle, "sha256").digest())
        except OSError:
            return None
        return digest.hexdigest()


def _as_policy_invalid(err: SilogateError) -> PolicyInvalid:
    """A refusal as PolicyInvalid, keeping the original reason (e.g. DATA_MISSING from a check)."""
    if isinstance(err, PolicyInvalid):
        return err
    refusal = PolicyInvalid([PolicyProblem(None, err.message)])
    refusal.reason = err.reason
    refusal.metadata.update(err.metadata)
    return refusal
