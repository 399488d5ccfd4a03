"""Cutting a child's output stream into lines: bounded, decoded, partial lines kept until their end.

A child writes bytes, in pieces that need not end at a line's end; it may write a line of megabytes, or bytes
that are not UTF-8. Each complete line comes out as text (undecodable bytes as `\\xNN` escapes); a line longer
than MAX_LINE bytes comes out cut at the bound, marked as cut, and the rest of it up to its newline is skipped
(a runaway line must not hold the supervisor's memory or the log); what follows the last newline waits for the
next piece, or for the end of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LINE = 16 * 1024  # bytes of one line kept; the rest of a longer line is skipped
CUT_MARK = " [line cut at 16 KiB]"


def decode(data: bytes) -> str:
    """Bytes as text: UTF-8, anything else escaped (`\\xff`), never an error."""
    return data.decode("utf-8", "backslashreplace")


@dataclass
class LineSplitter:
    """One stream's lines, as its pieces arrive (see the module's doc)."""

    limit: int = MAX_LINE
    _partial: bytes = b""
    _skipping: bool = field(default=False)  # inside a line already cut: dropped up to its newline

    def feed(self, data: bytes) -> list[str]:
        """The lines that `data` completes (a line cut at the bound ends with CUT_MARK)."""
        if self._skipping:
            newline = data.find(b"\n")
            if newline < 0:
                return []
            data, self._skipping = data[newline + 1:], False
        buffer = self._partial + data if self._partial else data
        last = buffer.rfind(b"\n")
        if last < 0:
            complete, rest = [], buffer
        else:
            head, rest = buffer[:last], buffer[last + 1:]
            complete = decode(head).split("\n")
            if len(head) > self.limit:
                complete = [line if len(line) <= self.limit else self._cut(line) for line in complete]
        if len(rest) > self.limit:
            complete.append(decode(rest[:self.limit]) + CUT_MARK)
            rest, self._skipping = b"", True
        self._partial = rest
        return complete

    def _cut(self, line: str) -> str:
        return line[:self.limit] + CUT_MARK

    @property
    def partial(self) -> bytes:
        """What came after the last newline so far (carried across a re-exec)."""
        return self._partial

    def pending(self) -> str:
        """The partial line so far, as text (shown as a last line while the stream is still open)."""
        return decode(self._partial)

    def finish(self) -> list[str]:
        """The end of the stream: a partial last line is a line too."""
        rest, self._partial, self._skipping = self._partial, b"", False
        return [decode(rest)] if rest else []
