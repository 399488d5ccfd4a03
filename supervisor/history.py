"""What happened to past rollouts, and which releases are known good or known bad.

Releases are told apart by their identity (identity.py). Like a batch-rollout engine, we refuse to roll out an
identity that already failed, unless forced — but never one that could not be told (unknown). The record
survives a supervisor restart: it is written atomically (temp file + rename) after every change.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .identity import Identity

_KEEP = 20


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


@dataclass
class History:
    """The last rollouts and the last-known-good/bad releases, optionally persisted at `path`."""

    path: Path | None = None
    records: deque[Record] = field(default_factory=lambda: deque(maxlen=_KEEP))
    last_known_good: dict[str, Any] | None = None
    last_known_bad: dict[str, Any] | None = None
    save_error: str | None = None

    @classmethod
    def load(cls, path: Path | None) -> History:
        """Read the saved history, or start empty (a missing or unreadable file is not an error)."""
        history = cls(path)
        if path is None:
            return history
        try:
            data = json.loads(path.read_text())
            history.records.extend(Record(**item) for item in data.get("records", []))
            history.last_known_good = data.get("last_known_good")
            history.last_known_bad = data.get("last_known_bad")
        except (OSError, ValueError, TypeError):
            pass
        return history

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
        if bad is not None:
            self.last_known_bad = bad.as_dict()
        self.save()

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": [asdict(record) for record in self.records],
            "last_known_good": self.last_known_good,
            "last_known_bad": self.last_known_bad,
        }

    def save(self) -> None:
        """Write atomically; a failure is remembered (shown in status), never fatal."""
        if self.path is None:
            return
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary.write_text(json.dumps(self.as_dict(), indent=1))
            os.replace(temporary, self.path)
            self.save_error = None
        except OSError as exc:
            self.save_error = f"cannot save state to {self.path}: {exc.strerror}"

