"""Events: what happened, to which generation and which pids. They flow out to the log (and to subscribers
such as the control API's event stream and metrics); nothing flows back in."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from .event_kinds import Kind

if TYPE_CHECKING:
    from .logsink import LogSink

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


@dataclass(frozen=True)
class Event:
    """One thing that happened. `kind` is a stable machine name (`promoted`, `rolled-back`, …)."""

    kind: Kind
    message: str
    level: str = "info"
    gen: int | None = None
    pids: tuple[int, ...] = ()
    instance: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        """A flat JSON-ready form: the fixed keys first, then the event's own fields."""
        data: dict[str, Any] = {
            "ts": json_stamp(self.time),
            "level": self.level,
            "event": self.kind,
        }
        if self.gen is not None:
            data["gen"] = self.gen
        if self.instance is not None:
            data["instance"] = self.instance
        if self.pids:
            data["pids"] = list(self.pids)
        data["msg"] = self.message
        data.update(self.fields)
        return data


def json_stamp(when: float) -> str:
    """A log line's time in JSON: UTC, milliseconds (`2026-12-04T15:39:32.422Z`)."""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def text_stamp(when: float) -> str:
    """A log line's time in text: local, milliseconds (`15:39:32.422`)."""
    return datetime.fromtimestamp(when).strftime("%H:%M:%S.%f")[:-3]


Subscriber = Callable[[Event], None]


@dataclass
class Events:
    """The one place events are published; the log is its first subscriber."""

    log_format: str = "text"
    log_level: str = "info"
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    subscribers: list[Subscriber] = field(default_factory=list)
    sink: LogSink | None = None  # when set, log lines go there instead of `stream`: it never blocks (logsink.py)

    def emit(
        self, kind: Kind, message: str, *, level: str = "info", gen: int | None = None, pids: tuple[int, ...] | list[int] = (),
        instance: int | None = None, **fields: Any
    ) -> Event:
        """Publish one event to the log and every subscriber."""
        event = Event(kind, message, level, gen, tuple(pids), instance, fields)
        if LEVELS[level] >= LEVELS[self.log_level]:
            self._write(event)
        for subscriber in list(self.subscribers):
            subscriber(event)
        return event

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        self.subscribers.append(subscriber)
        return lambda: self.subscribers.remove(subscriber) if subscriber in self.subscribers else None

    def dropped_line(self, count: int) -> str:
        """The log line that says `count` lines could not be written (the log's reader stalled)."""
        lines = "log line" if count == 1 else "log lines"
        return self.format(Event(Kind.LOG_DROPPED, f"dropped {count} {lines}: the log's reader was not keeping up",
                                 level="warning", fields={"dropped": count}))

    def format(self, event: Event) -> str:
        """The event as one log line, in the configured format."""
        if self.log_format == "json":
            return json.dumps(event.as_dict(), default=str)
        stamp = text_stamp(event.time)
        where = f"gen {event.gen}" if event.gen is not None else ""
        if event.instance is not None:
            where += f" #{event.instance}"
        if event.pids:
            where += (" " if where else "") + "pid " + ",".join(map(str, event.pids))
        tag = f"[{where}] " if where else ""
        level = "" if event.level == "info" else event.level.upper() + ": "
        return f"{stamp} supervise: {level}{tag}{event.message}"

    def _write(self, event: Event) -> None:
        self.write_lines(self.format(event) + "\n", 1)

    def write_lines(self, text: str, count: int) -> bool:
        """Put `count` whole lines (`text`, each ending in a newline) on the log at once, through the sink when
        there is one (it never blocks: what its reader does not take in time is dropped and counted there);
        whether they were written."""
        if self.sink is not None:
            return self.sink.write_block(text.encode(errors="replace"), count)
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            return False  # a closed stderr must never take the supervisor down
        return True
