"""One instance's stdout and stderr, read through pipes on the event loop (--child-output prefix).

The supervisor must never wait on a child's output: the read ends are non-blocking and read by the event loop
when readable, at most CHUNK bytes per stream per turn of the loop, so a child writing 100 MB in a burst makes
the loop busy, never deaf (a status request is answered between two reads); a stream whose pipe a read emptied
rests for PAUSE, so a server that logs every request costs one wakeup per PAUSE rather than one per line
(measured in benchmarks/child_output.py: ~36 µs of supervisor CPU per line without). The child's ends stay blocking, as
a child expects of its stdout; since we read whatever comes, it only waits while the loop is busy — a stalled
log reader costs dropped lines (output_log.py), never a blocked child or supervisor.

When the instance exits, what it wrote is all in the pipes already: `drain` reads it before the exit is
reported, so the lines come before "exited" and the failure's reason can quote them. The streams end at EOF
(every process of the instance closed them: a partial last line is flushed then), or when the instance is
closed. Across a re-exec the read ends are carried like the sockets (their numbers, and what each held of a
partial line), and read again by the new image.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import os
from dataclasses import dataclass, field
from typing import Any

from .lines import LineSplitter
from .output_log import TAIL_LINES, OutputLog, Ring

CHUNK = 64 * 1024  # bytes read from one stream per turn of the loop
PAUSE = 0.01  # seconds a stream is left alone after a read that emptied it: lines come out at most this late
_DRAIN_CHUNKS = 16  # at most this many reads when draining (a grandchild may still be writing)
STREAMS = ("stdout", "stderr")


@dataclass(eq=False)
class Stream:
    """The read end of one pipe and the line it is in the middle of."""

    name: str
    fd: int
    splitter: LineSplitter = field(default_factory=LineSplitter)
    reading: bool = False  # a reader is registered on the loop
    resume: asyncio.TimerHandle | None = None  # reading pauses after a short read, to take more lines at once


@dataclass(eq=False)
class Capture:
    """The pipes of one instance, relayed to `log` and kept in `ring`. `writers` are the child's ends, open only
    until it is started (spawn dups them to fds 1 and 2)."""

    log: OutputLog
    ring: Ring
    streams: list[Stream]
    writers: tuple[int, int] | None = None

    @classmethod
    def open(cls, log: OutputLog, gen: int, instance: int) -> Capture:
        """Two pipes for an instance about to start; raises OSError (nothing left open) if they cannot be made."""
        opened: list[int] = []
        try:
            streams: list[Stream] = []
            writers: list[int] = []
            for name in STREAMS:
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                opened += [read_end, write_end]
                os.set_blocking(read_end, False)  # our end only: the child's end is a description of its own
                moved = fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, 3)  # never fd 1 or 2, whatever is closed here
                opened.append(moved)
                streams.append(Stream(name, read_end))
                writers.append(moved)
        except OSError:
            for fd in opened:
                os.close(fd)
            raise
        for fd in set(opened) - {stream.fd for stream in streams} - set(writers):
            os.close(fd)
        return cls(log, log.open(gen, instance), streams, (writers[0], writers[1]))

    def started(self, pid: int) -> None:
        """The child runs: our copies of its ends are closed, and reading starts."""
        self.ring.pid = pid
        self._close_writers()
        self.start()

    def _close_writers(self) -> None:
        if self.writers is not None:
            for fd in self.writers:
                os.close(fd)
            self.writers = None

    def start(self) -> None:
        """Read each open stream whenever it is readable (on the running loop)."""
        for stream in self.streams:
            if not stream.reading and stream.resume is None:
                self._watch(stream)

    def _watch(self, stream: Stream) -> None:
        asyncio.get_running_loop().add_reader(stream.fd, self._readable, stream)
        stream.reading = True

    def _readable(self, stream: Stream) -> None:
        """Read; after a short read (the pipe is empty) pause for PAUSE: a server logging each request then costs a
        wakeup per PAUSE, not per line. A full read (a burst) is followed by the next at once."""
        if self._read(stream) or stream not in self.streams:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(stream.fd)
        stream.reading = False
        stream.resume = loop.call_later(PAUSE, self._resume, stream)

    def _resume(self, stream: Stream) -> None:
        stream.resume = None
        if stream in self.streams:
            self._watch(stream)

    def _read(self, stream: Stream) -> bool:
        """One read of at most CHUNK bytes, relayed; False once nothing more is there for now (or ever)."""
        try:
            data = os.read(stream.fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            self.log.relay(self.ring, stream.name, stream.splitter.finish())
            self._end(stream)
            return False
        self.log.relay(self.ring, stream.name, stream.splitter.feed(data))
        return len(data) == CHUNK

    def _end(self, stream: Stream) -> None:
        if stream.resume is not None:
            stream.resume.cancel()
            stream.resume = None
        if stream.reading:
            try:
                asyncio.get_running_loop().remove_reader(stream.fd)
            except RuntimeError:
                pass  # no loop any more (the very end): nothing is registered on it either
            stream.reading = False
        os.close(stream.fd)
        self.streams.remove(stream)

    def drain(self) -> None:
        """Read what is in the pipes now: after the instance exited, everything it wrote."""
        for stream in list(self.streams):
            for _ in range(_DRAIN_CHUNKS):
                if not self._read(stream):
                    break

    def tail(self) -> tuple[str, ...]:
        """The last non-empty lines it wrote, drained first; a partial last line counts as a line."""
        self.drain()
        lines = [*self.ring.tail(), *(text for stream in self.streams if (text := stream.splitter.pending().strip()))]
        return tuple(lines[-TAIL_LINES:])

    def close(self, failed: bool) -> None:
        """The instance is gone: drain, flush partial lines, close the pipes; its ring is archived if it `failed`."""
        self._close_writers()  # never started: the child could not be spawned
        self.drain()
        for stream in list(self.streams):
            self.log.relay(self.ring, stream.name, stream.splitter.finish())
            self._end(stream)
        self.log.close(self.ring, failed)

    # -- across a re-exec ---------------------------------------------------------------------------------------

    def carried(self) -> dict[str, Any]:
        """What a re-exec carries: the read ends by number, their partial lines, the ring."""
        return {"streams": [{"name": stream.name, "fd": stream.fd,
                             "partial": base64.b64encode(stream.splitter.partial).decode()} for stream in self.streams],
                "ring": self.ring.carried()}

    @classmethod
    def revive(cls, log: OutputLog, data: dict[str, Any]) -> Capture:
        """The capture again in the new image, reading on (call on the loop)."""
        ring = log.adopt(Ring.revive(data["ring"]))
        streams = [Stream(item["name"], item["fd"], LineSplitter(_partial=base64.b64decode(item["partial"])))
                   for item in data["streams"]]
        capture = cls(log, ring, streams)
        capture.start()
        return capture


def carried_fds(data: dict[str, Any] | None) -> list[int]:
    """The read ends a carried capture names."""
    return [item["fd"] for item in data["streams"]] if data else []
