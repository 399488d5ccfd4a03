"""What happened to past rollouts, and which releases are known good or known bad.

Releases are told apart by their identity (identity.py). Like a batch-rollout engine, we refuse to roll out an
identity that already failed, unless forced — but never one that could not be told (unknown). The record
survives a supervisor restart: it is written atomically (temp file + rename) after every change, and checked
when read back: a file that cannot be trusted is set aside, never fatal.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .event_kinds import Kind
from .events import Events
from .identity import Identity
from .safefile import write_atomically
from .shapes import ShapeError, build, check

_KEEP = 20
_CHUNK = 1 << 20
_MAX_STATE = 4 << 20  # bytes: twenty records take a few kilobytes; anything near this is not our file
INTERRUPTED = "interrupted"


@dataclass
class Record:
    """One finished rollout."""

    result: str
    reason: str
    trigger: str
    new_gen: int | None
    old_gen: int | None
    started_at: float
    timings: dict[str, float]
    fingerprint: dict[str, Any] | None = None  # the release's identity (Identity.as_dict)
    blame: str = ""  # whether the failure was pinned on the release (marked known bad), and why not
    output: list[str] = field(default_factory=list)  # the last lines the failed instance wrote


@dataclass
class InProgress:
    """The marker of an upgrade under way, saved when it starts: found at the next start, it means the supervisor
    was killed in the middle of that upgrade."""

    trigger: str
    started_at: float
    old_gen: int | None
    new_gen: int | None
    pid: int

    def interrupted(self) -> Record:
        """The record of that upgrade, cut short."""
        return Record(INTERRUPTED, f"the supervisor (pid {self.pid}) was killed during this upgrade; it never finished",
                      self.trigger, self.new_gen, self.old_gen, self.started_at, {})


@dataclass
class History:
    """The last rollouts and the last-known-good/bad releases, optionally persisted at `path`."""

    path: Path | None = None
    records: deque[Record] = field(default_factory=lambda: deque(maxlen=_KEEP))
    last_known_good: dict[str, Any] | None = None
    last_known_bad: dict[str, Any] | None = None
    save_error: str | None = None
    in_progress: InProgress | None = None
    events: Events | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path | None, events: Events | None = None) -> History:
        """Read the saved history, or start empty: a missing file is no error, one that cannot be trusted is moved
        aside (said once), an upgrade a killed supervisor left unfinished is recorded as interrupted."""
        history = cls(path, events=events)
        if path is None:
            return history
        try:
            data = read_state(path)
        except FileNotFoundError:
            return history
        except OSError as exc:
            history._warn(Kind.STATE_UNREADABLE, f"cannot read state file {path} ({exc.strerror}): starting with an empty "
                          "history", path=str(path))
            return history
        except ValueError as exc:
            history._set_aside(path, exc)
            return history
        history.records.extend(data.records)
        history.last_known_good, history.last_known_bad = data.last_known_good, data.last_known_bad
        if data.in_progress is not None:
            history._record_interrupted(data.in_progress)
        return history

    def _set_aside(self, path: Path, problem: ValueError) -> None:
        """Move a state file that cannot be trusted out of the way (kept for a post-mortem) and say so."""
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.rename(path, aside)
            where = f"moved aside to {aside}"
        except OSError as exc:
            where = f"could not move it aside ({exc.strerror})"
        self._warn(Kind.STATE_CORRUPT, f"state file {path} cannot be trusted ({problem}); {where}; starting with an "
                   "empty history", path=str(path), aside=str(aside), problem=str(problem))

    def _record_interrupted(self, marker: InProgress) -> None:
        record = marker.interrupted()
        self._warn(Kind.UPGRADE_INTERRUPTED, f"the upgrade to generation {marker.new_gen} ({marker.trigger}) was cut short: "
                   f"supervisor pid {marker.pid} was killed during it; recorded as interrupted", pids=(marker.pid,),
                   trigger=marker.trigger)
        self.records.append(record)
        self.save()

    def _warn(self, kind: Kind, message: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(kind, message, level="warning", **fields)

    def begin(self, trigger: str, old_gen: int | None, new_gen: int | None) -> None:
        """An upgrade starts: saved now, so a supervisor killed before it ends leaves a trace (see load)."""
        self.in_progress = InProgress(trigger, time.time(), old_gen, new_gen, os.getpid())
        self.save()

    def finish(self) -> None:
        """The upgrade that began is over, whatever its outcome (add() has recorded it, if it was)."""
        if self.in_progress is not None:
            self.in_progress = None
            self.save()

    def is_known_bad(self, identity: Identity) -> bool:
        """Whether `identity` failed before. An unknown identity is never known bad: it cannot be told apart."""
        return identity.known and self.last_known_bad is not None and self.last_known_bad.get("digest") == identity.digest

    def good(self, identity: Identity) -> None:
        """A release is serving: it is the last known good, and no longer known bad."""
        self.last_known_good = identity.as_dict()
        if self.last_known_bad is not None and self.last_known_bad.get("digest") == identity.digest:
            self.last_known_bad = None
        self.save()

    def blame(self, identity: Identity, serving: Identity | None) -> tuple[Identity | None, str]:
        """Whether a release that failed by its own fault becomes known bad, and the sentence that says so. Never one
        that cannot be told apart from the serving or the last known good release: that would refuse a good one."""
        if not identity.known:
            return None, f"release {identity.name} not marked known bad: its identity is {identity.covers}"
        good = self.last_known_good or {}
        if (serving is not None and serving.digest == identity.digest) or good.get("digest") == identity.digest:
            return None, (f"release {identity.name} not marked known bad: the failure cannot be pinned on a release "
                          f"identity, it is the same as the serving or last known good release's ({identity.covers}); "
                          "--version-file tells releases apart")
        return identity, f"release {identity.name} marked known bad: upgrading to it again is refused unless forced"

    def add(self, record: Record, bad: Identity | None = None) -> None:
        """Append a finished rollout; `bad` marks the release that failed."""
        self.records.append(record)
        self.in_progress = None
        if bad is not None:
            self.last_known_bad = bad.as_dict()
        self.save()

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": [asdict(record) for record in self.records],
            "last_known_good": self.last_known_good,
            "last_known_bad": self.last_known_bad,
            "in_progress": asdict(self.in_progress) if self.in_progress else None,
        }

    def save(self) -> None:
        """Write atomically, never through a symlink; a failure is remembered (shown in status) and said once in the
        log, as is the first save that works again: lost state is never silent, and never fatal."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomically(self.path, json.dumps(self.as_dict(), indent=1).encode(), 0o600)
        except OSError as exc:
            if self.save_error is None:
                self._warn(Kind.STATE_SAVE_FAILED, f"cannot save state to {self.path} ({exc.strerror}): rollout history "
                           "and known good/bad releases will be lost at restart until it can be saved again",
                           path=str(self.path), error=exc.strerror)
            self.save_error = f"cannot save state to {self.path}: {exc.strerror}"
            return
        if self.save_error is not None and self.events is not None:
            self.events.emit(Kind.STATE_SAVED, f"state saved to {self.path} again", path=str(self.path))
        self.save_error = None


@dataclass
class SavedState:
    """What a state file holds, checked."""

    records: list[Record]
    last_known_good: dict[str, Any] | None
    last_known_bad: dict[str, Any] | None
    in_progress: InProgress | None


def read_state(path: Path) -> SavedState:
    """The state saved at `path`. Raises OSError if it cannot be read, ValueError if it cannot be trusted: not a
    regular file (a symlink is never followed), too large, not JSON, or any value of the wrong shape."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError("a symlink, not a file we wrote") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError("not a regular file")
        raw = _read_at_most(descriptor, _MAX_STATE)
    finally:
        os.close(descriptor)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc or 'nested too deeply'}") from None
    return parse_state(data)


def _read_at_most(descriptor: int, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := os.read(descriptor, _CHUNK):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ValueError(f"larger than {limit} bytes")
    return b"".join(chunks)


def parse_state(data: Any) -> SavedState:
    """Check decoded JSON against the shape History saves (every record, release and marker); ShapeError if off."""
    if not isinstance(data, dict):
        raise ShapeError(f"expected an object, found {'null' if data is None else type(data).__name__}")
    records = data.get("records", [])
    check(records, list[dict[str, Any]], "records")
    releases = {key: data.get(key) for key in ("last_known_good", "last_known_bad")}
    for key, release in releases.items():
        check(release, dict[str, Any] | None, key)
        if release is not None:
            check(release.get("digest"), str, f"{key}.digest")
    marker = data.get("in_progress")
    return SavedState([build(Record, item, f"records[{index}]") for index, item in enumerate(records)],
                      releases["last_known_good"], releases["last_known_bad"],
                      None if marker is None else build(InProgress, marker, "in_progress"))
