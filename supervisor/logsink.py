"""The supervisor's own log output, written so that it never blocks the event loop.

stderr is often a pipe, and whatever reads it can stall (a log shipper that hangs, a journald under pressure,
`| less` left on its first page). A blocking write to a full pipe froze the whole supervisor — status,
upgrades, liveness checks, reaping — for as long as the reader stalled. Here a line goes out through a
descriptor of our own that never blocks; what the pipe does not take at once waits in a buffer of at most
BUFFER_LIMIT bytes, written out when the pipe is writable again; a line that does not fit is dropped and
counted, and once there is room again one line says how many were dropped.

The children inherit fd 2 itself, so its O_NONBLOCK flag (a property of the open file description they
share with us, and with whoever started us) is never touched: a child's own writes keep blocking as it
expects. For a pipe, a FIFO or a terminal we open the same file again through /proc/self/fd/2, which gives a
description of our own that may be non-blocking (a terminal can stall too: ^S, a frozen pty reader). A socket
(journald) is sent to with MSG_DONTWAIT, a per-call flag. A regular file keeps plain blocking writes: Linux has
no non-blocking mode for disk files, and no reader can stall them. Where reopening fails (no /proc, a FIFO with
no reader) a write goes out only when poll() says there is room, in pieces of at most PIPE_BUF bytes; a child
that writes between the poll and our write can still make that one write wait until the reader takes PIPE_BUF
bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

BUFFER_LIMIT = 1 << 20  # bytes of log lines kept while the reader stalls
FLUSH_TIMEOUT = 2.0  # at exit, how long buffered lines may take to go out

Send = Callable[[bytes], int]


@dataclass(frozen=True)
class Output:
    """A descriptor of our own (close-on-exec) on the log's file, how to write to it without blocking, how to close it."""

    fd: int
    send: Send
    close: Callable[[], None]


def private_output(fd: int) -> Output:
    """An Output on the file at `fd`, whose open file description (and so O_NONBLOCK) is shared with nobody."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        try:
            own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            pass  # no /proc, or a FIFO with no reader (whose writes fail at once: they cannot block either)
        else:
            return Output(own, lambda data: os.write(own, data), lambda: os.close(own))
    duplicate = os.dup(fd)
    if stat.S_ISREG(mode):  # a disk file has no non-blocking mode and never waits on a reader: written whole
        return Output(duplicate, lambda data: os.write(duplicate, data), lambda: os.close(duplicate))
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=duplicate)
        return Output(duplicate, lambda data: sock.send(data, socket.MSG_DONTWAIT), sock.close)
    return Output(duplicate, lambda data: _write_when_ready(duplicate, data), lambda: os.close(duplicate))


def _write_when_ready(fd: int, data: bytes) -> int:
    """Write what a blocking descriptor takes without waiting: nothing unless poll() says there is room."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(0):
        raise BlockingIOError
    return os.write(fd, data[:select.PIPE_BUF])


@dataclass(eq=False)
class LogSink:
    """Log lines to one descriptor, never waiting for it; `notice(count)` is the line that says lines were lost."""

    output: Output
    notice: Callable[[int], str]
    limit: int = BUFFER_LIMIT
    dropped_total: int = 0
    _lines: deque[tuple[bytes, int]] = field(default_factory=deque, repr=False)  # (lines, how many: 0 for a notice)
    _size: int = field(default=0, repr=False)
    _written: int = field(default=0, repr=False)  # bytes of the first buffered line already out (a partial write)
    _unsaid: int = field(default=0, repr=False)  # lines dropped since the notice was last written
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)  # the loop waiting for writability
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, fd: int, notice: Callable[[int], str]) -> LogSink | None:
        """A sink writing to the file at `fd` (usually 2), or None if `fd` is not open."""
        try:
            return cls(private_output(fd), notice)
        except OSError:
            return None

    def write_line(self, text: str) -> None:
        """Write one line now if the reader takes it, else keep it for later, else drop it and count it."""
        self.write_block((text + "\n").encode(errors="replace"), 1)

    def write_block(self, data: bytes, lines: int) -> bool:
        """Write `lines` whole lines at once (a child's output, see output_log.py), kept or dropped together as
        write_line keeps or drops one; whether they were taken."""
        with self._lock:
            self._flush()  # the reader may have made room since the last line
            if self._unsaid and self._room() >= len(data) + len(self._notice_bytes()):
                self._say_dropped()
            if self._room() < len(data):
                self._drop(lines)
                return False
            self._append(data, lines)
            self._flush()
        self._wait_writable()
        return True

    def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Write out what is buffered (for at most `timeout` seconds; the rest is counted as dropped), then close.
        Called once the event loop has ended."""
        with self._lock:
            self._stop_waiting()
        self.flush(timeout)
        with self._lock:
            self._discard()
        self.output.close()

    def flush(self, timeout: float) -> None:
        """Write out what is buffered, waiting for the reader up to `timeout` seconds (before a re-exec, and at
        the end); what is left stays buffered."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.output.fd, select.POLLOUT)
        while self._lines and (left := deadline - time.monotonic()) > 0:
            poller.poll(max(1, int(min(left, 0.1) * 1000)))  # short rounds: the poll-gated send needs no event
            with self._lock:
                self._flush()

    # -- inside the lock ------------------------------------------------------------------------------------------

    def _room(self) -> int:
        return self.limit - self._size

    def _notice_bytes(self) -> bytes:
        return (self.notice(self._unsaid) + "\n").encode(errors="replace")

    def _append(self, data: bytes, lines: int) -> None:
        self._lines.append((data, lines))
        self._size += len(data)

    def _say_dropped(self) -> None:
        self._append(self._notice_bytes(), 0)
        self._unsaid = 0

    def _drop(self, lines: int) -> None:
        self._unsaid += lines
        self.dropped_total += lines

    def _discard(self) -> None:
        """Give up on everything buffered: its lines (not its notices) count as dropped."""
        self._drop(sum(lines for _, lines in self._lines))
        self._lines.clear()
        self._size = self._written = 0

    def _flush(self) -> None:
        """Write buffered lines in order until the reader stops taking them; the notice goes out once all did."""
        while self._lines:
            line = self._lines[0][0]
            try:
                count = self.output.send(line[self._written:] if self._written else line)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the reader is gone (EPIPE) or the file is unusable: what we hold cannot go out
                self._discard()
                return
            self._written += count
            if self._written < len(line):
                continue  # a partial write: try the rest at once (it fails with EAGAIN if the pipe is full)
            self._lines.popleft()
            self._size -= len(line)
            self._written = 0
            if not self._lines and self._unsaid:
                self._say_dropped()

    # -- waiting for the reader -----------------------------------------------------------------------------------

    def _wait_writable(self) -> None:
        """Have the running event loop (if this thread runs one) call us when the descriptor takes data again."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop here (start-up, exit, another thread): the next line or close() writes the rest
        with self._lock:
            if not self._lines or self._loop is loop:
                return
            try:
                loop.add_writer(self.output.fd, self._on_writable)
            except (OSError, ValueError, RuntimeError, NotImplementedError):
                return  # a regular file cannot be polled, and never makes a writer wait either
            self._loop = loop

    def _on_writable(self) -> None:
        with self._lock:
            self._flush()
            if not self._lines:
                self._stop_waiting()

    def _stop_waiting(self) -> None:
        """Inside the lock: no more calls from the loop (it is the loop's own thread, or the loop is closed)."""
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            try:
                loop.remove_writer(self.output.fd)
            except (OSError, ValueError, RuntimeError):
                pass


class SinkHandler(logging.Handler):
    """Routes what libraries log (aiohttp, asyncio) through the sink, as Python's last-resort handler would print it."""

    def __init__(self, sink: LogSink) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write_line(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the code that logged
            self.handleError(record)


@contextmanager
def stderr_sink(notice: Callable[[int], str]) -> Iterator[LogSink | None]:
    """For the supervisor's whole run: a sink on fd 2, which also takes what libraries log; flushed at the end."""
    sink = LogSink.open(2, notice)
    if sink is None:
        yield None
        return
    handler = SinkHandler(sink)
    logging.root.addHandler(handler)
    try:
        yield sink
    finally:
        logging.root.removeHandler(handler)
        sink.close()
