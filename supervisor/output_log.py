"""The children's output on supervise's own log (--child-output prefix), and the last lines of each instance.

Every line a child writes goes out on supervise's log stream tagged with its generation, instance and pid — in
text, `12:00:01.234 [gen 2 #0 pid 4242] GET / 200`; with --log-format json, an object with `event: output` —
so journald and `docker logs` show who said what. Lines are written in blocks (all the lines of one read) through
the log sink, which never blocks: when the log's reader stalls, whole blocks are dropped and counted, and the
sink says "dropped N log lines" once the reader is back (logsink.py).

The last lines of every instance stay in memory (a Ring: RING_LINES lines, RING_BYTES bytes at most), for
`ctl logs` and for the reason of a failure (`exited with status 1 during readiness; last output:
ModuleNotFoundError: …`). Rings of living instances are kept, and those of the ARCHIVED most recent instances that
failed (died on their own, or belonged to a generation that never served), so a rolled-back release's last
words can still be read after it is gone.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .events import Events, json_stamp, text_stamp

RING_LINES = 200
RING_BYTES = 256 * 1024
ARCHIVED = 8
TAIL_LINES = 5  # the last non-empty lines quoted for a failure
QUOTE_LIMIT = 500  # characters of the last line put into a one-line reason
_encode = json.JSONEncoder().encode


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a child's output: `seq` orders every line of every child (a follower asks for those after it)."""

    seq: int
    time: float
    stream: str
    text: str


@dataclass(eq=False)
class Ring:
    """The last lines of one instance: generation `gen`, index `instance`, main process `pid`."""

    gen: int
    instance: int
    pid: int = 0
    lines: deque[Line] = field(default_factory=deque)
    size: int = 0

    def add(self, first: int, now: float, stream: str, texts: list[str]) -> None:
        """Lines numbered from `first` on; only the last RING_LINES of them can stay."""
        kept = texts[-RING_LINES:]
        seq = first + len(texts) - len(kept)
        for offset, text in enumerate(kept):
            self.lines.append(Line(seq + offset, now, stream, text))
            self.size += len(text)
        while self.lines and (len(self.lines) > RING_LINES or self.size > RING_BYTES):
            self.size -= len(self.lines.popleft().text)

    def tail(self, count: int = TAIL_LINES) -> tuple[str, ...]:
        """The last `count` non-empty lines, oldest first."""
        found: list[str] = []
        for line in reversed(self.lines):
            if line.text.strip():
                found.append(line.text.rstrip())
                if len(found) == count:
                    break
        return tuple(reversed(found))

    def carried(self) -> dict[str, Any]:
        """The ring as plain data, for a re-exec."""
        return {"gen": self.gen, "instance": self.instance, "pid": self.pid,
                "lines": [[line.seq, line.time, line.stream, line.text] for line in self.lines]}

    @classmethod
    def revive(cls, data: dict[str, Any]) -> Ring:
        ring = cls(data["gen"], data["instance"], data["pid"])
        for seq, when, stream, text in data["lines"]:
            ring.add(seq, when, stream, [text])
        return ring

    def as_dicts(self, after: int = 0) -> list[dict[str, Any]]:
        return [self.line_dict(line) for line in self.lines if line.seq > after]

    def line_dict(self, line: Line) -> dict[str, Any]:
        return {"seq": line.seq, "ts": line.time, "gen": self.gen, "instance": self.instance, "pid": self.pid,
                "stream": line.stream, "msg": line.text}


def quoted(reason: str, tail: tuple[str, ...]) -> str:
    """A failure's reason with the last line its instance wrote (the one that usually says why)."""
    if not tail:
        return reason
    last = tail[-1] if len(tail[-1]) <= QUOTE_LIMIT else tail[-1][:QUOTE_LIMIT] + "…"
    return f"{reason}; last output: {last}"


@dataclass(eq=False)
class OutputLog:
    """Where every instance's lines go (`relay`), what is kept of them (`live` and `archive`), and the counts.
    `capture` says whether new instances get pipes at all (--child-output prefix) or inherit our stdout/stderr."""

    events: Events
    capture: bool = True
    seq: int = 0  # the last line's number
    dropped_total: int = 0  # lines the log's reader did not take in time
    live: list[Ring] = field(default_factory=list)
    archive: deque[Ring] = field(default_factory=lambda: deque(maxlen=ARCHIVED))

    def carried(self) -> dict[str, Any]:
        """What a re-exec carries of it: the line numbering, the dropped count, the archived rings (the living
        instances' rings go with their pipes: capture.py)."""
        return {"seq": self.seq, "dropped": self.dropped_total, "archive": [ring.carried() for ring in self.archive]}

    def revive(self, data: dict[str, Any]) -> None:
        """Take back what `carried` gave, in the new image."""
        self.seq = max(self.seq, data["seq"])
        self.dropped_total += data["dropped"]
        self.archive.extend(Ring.revive(ring) for ring in data["archive"])

    def open(self, gen: int, instance: int) -> Ring:
        """The ring of an instance about to start."""
        return self.adopt(Ring(gen, instance))

    def adopt(self, ring: Ring) -> Ring:
        """A living instance's ring (after a re-exec: as it was carried)."""
        self.live.append(ring)
        return ring

    def close(self, ring: Ring, failed: bool) -> None:
        """An instance is gone: its ring is archived if it failed (and said something), else dropped."""
        if ring in self.live:
            self.live.remove(ring)
        if failed and ring.lines:
            self.archive.append(ring)

    def relay(self, ring: Ring, stream: str, texts: list[str]) -> None:
        """Lines an instance just wrote: into its ring, and out on the log, all in one write."""
        if not texts:
            return
        now = time.time()
        first, self.seq = self.seq + 1, self.seq + len(texts)
        ring.add(first, now, stream, texts)
        if not self.events.write_lines(self._format(ring, stream, now, texts), len(texts)):
            self.dropped_total += len(texts)

    def _format(self, ring: Ring, stream: str, now: float, texts: list[str]) -> str:
        if self.events.log_format == "json":
            head = (f'{{"ts":"{json_stamp(now)}","level":"info","event":"output","gen":{ring.gen},'
                    f'"instance":{ring.instance},"pid":{ring.pid},"stream":"{stream}","msg":')
            return "".join([head + _encode(text) + "}\n" for text in texts])
        prefix = f"{text_stamp(now)} [gen {ring.gen} #{ring.instance} pid {ring.pid}] "
        return "".join([prefix + text + "\n" for text in texts])

    def query(self, gen: int | None = None, instance: int | None = None, count: int = 100,
              after: int = 0) -> list[dict[str, Any]]:
        """The last `count` lines (after line number `after`) of the instances that match, oldest first."""
        rings = [ring for ring in (*self.archive, *self.live)
                 if (gen is None or ring.gen == gen) and (instance is None or ring.instance == instance)]
        lines = sorted((item for ring in rings for item in ring.as_dicts(after)), key=lambda item: item["seq"])
        return lines[-count:] if count > 0 else []
