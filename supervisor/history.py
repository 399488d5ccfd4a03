"""What happened to past rollouts, and which releases are known good or known bad.

A release is identified by a fingerprint: the resolved executable, a hash of its content and of every file
named in argv that exists (so `python app.py` changes when app.py does), argv and the resolved working
directory. Like a batch-rollout engine, we refuse to roll out a fingerprint that already failed, unless forced.
The record survives a supervisor restart: it is written atomically (temp file + rename) after every change.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .release import Release

_KEEP = 20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Fingerprint:
    """A release's identity: what exactly would be executed."""

    digest: str
    executable: str
    argv: tuple[str, ...]
    cwd: str

    def as_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "executable": self.executable, "argv": list(self.argv), "cwd": self.cwd}


def _hash_file(digest: Any, path: str) -> None:
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        digest.update(b"<unreadable>")


def fingerprint(release: Release) -> Fingerprint:
    """Fingerprint a release as it is on disk right now."""
    digest = hashlib.sha256()
    _hash_file(digest, release.executable)
    for arg in release.argv[1:]:
        path = arg if os.path.isabs(arg) else os.path.join(release.cwd, arg)
        if os.path.isfile(path):
            digest.update(path.encode())
            _hash_file(digest, path)
    digest.update(json.dumps([release.executable, list(release.argv), release.cwd, list(release.env)]).encode())
    return Fingerprint(digest.hexdigest()[:16], release.executable, release.argv, release.cwd)


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
    fingerprint: dict[str, Any] | None = None


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

    def is_known_bad(self, print_: Fingerprint) -> bool:
        return self.last_known_bad is not None and self.last_known_bad.get("digest") == print_.digest

    def good(self, print_: Fingerprint) -> None:
        """A release is serving: it is the last known good, and no longer known bad."""
        self.last_known_good = print_.as_dict()
        if self.is_known_bad(print_):
            self.last_known_bad = None
        self.save()

    def add(self, record: Record, bad: Fingerprint | None = None) -> None:
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

