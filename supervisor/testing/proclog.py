"""A process's stderr as it arrives: every line and the supervisor's JSON events among them, time-stamped, with
waits on them that end as soon as what is awaited (or the end of the stream) arrives, never on a fixed sleep."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Stream = Literal["lines", "events"]


@dataclass
class ProcessLog:
    """Lines read from one process's stderr, and the JSON events among them (a dict with an "event" key).

    `line_times`/`event_times` run parallel to `lines`/`events`: time.monotonic() when each was read.
    """

    lines: list[str] = field(default_factory=list)
    line_times: list[float] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    event_times: list[float] = field(default_factory=list)
    interleaved: list[str] = field(default_factory=list)  # JSON lines glued after a child's unterminated output
    ended: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    def follow(self, stream: Iterable[bytes]) -> None:
        """Take every line of `stream` until it ends (run it in a reader thread)."""
        for raw in stream:
            self.take(raw)
        self.end()

    def end(self) -> None:
        """The stream is over: waits stop waiting for more."""
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def take(self, raw: bytes) -> None:
        """One line: kept, and parsed if it is one of the supervisor's JSON events."""
        stamp = time.monotonic()
        line = raw.decode(errors="replace").rstrip("\n")
        start = line.find('{"ts"')  # a child's own output may precede our JSON on the same line (shared stderr)
        event = _parsed(line[start:]) if start >= 0 else None
        with self.changed:
            self.lines.append(line)
            self.line_times.append(stamp)
            if isinstance(event, dict) and "event" in event:
                self.events.append(event)
                self.event_times.append(stamp)
                if start > 0:
                    self.interleaved.append(line)
            self.changed.notify_all()

    def marks(self) -> tuple[int, int]:
        """(lines, events) seen so far: pass one as `after` to look only at what comes next."""
        with self.changed:
            return len(self.lines), len(self.events)

    def first(self, stream: Stream, match: Callable[[Any], bool], after: int = 0, timeout: float = 0.0) -> int | None:
        """Index of the first line or event at index >= `after` that `match`es, waiting up to `timeout` for it;
        None when it did not come in time or the stream ended without it."""
        items = self.lines if stream == "lines" else self.events
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for index in range(after, len(items)):
                    if match(items[index]):
                        return index
                after = len(items)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.ended:
                    return None
                self.changed.wait(remaining)

    def tail(self, count: int = 40) -> str:
        with self.changed:
            return "\n".join(self.lines[-count:])


def _parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
