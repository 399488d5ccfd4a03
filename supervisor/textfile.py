"""Reading a small text file an operator points us at (a config file, an env file) as hostile input.

A path can name a FIFO (opening it must not block the supervisor), a device, a huge file or binary junk: each is
refused with one line that names the file, before any of it is parsed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UserError

FILE_LIMIT = 1 << 20  # bytes: a settings file is a page of settings, not a data set


def read_text(path: Path, what: str) -> str:
    """The text of `path`, a regular file of at most FILE_LIMIT bytes of UTF-8; `what` names the file's role in
    the one-line error (`cannot read config /etc/app.toml: …`, `env file /etc/app.env: not UTF-8 text …`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # checked before fdopen, which raises on a directory
            raise UserError(f"cannot read {what} {path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read(FILE_LIMIT + 1)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > FILE_LIMIT:
        raise UserError(f"{what} {path}: larger than {FILE_LIMIT // 1024} KiB")
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{what} {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}, "
                        f"line {line})") from None
