"""Files written so that nobody can redirect them: atomic replacement through an unguessable temp file.

A supervisor often runs as root and writes into shared directories (/run for the pidfile, the state directory).
A temp file with a predictable name (`.NAME.PID`) lets another user plant a symlink there and have us overwrite
any file it points to. Here the temp file is created with O_CREAT|O_EXCL|O_NOFOLLOW under a random name in the
target's own directory (reached through one directory fd, so the directory cannot be swapped mid-write), then
renamed over the target; rename replaces a symlink at the target name rather than following it.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path

_SUFFIX = ".tmp"
STALE_AFTER = 60.0  # seconds: a temp file of ours this old belongs to a write that died half-way
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _temp_prefix(name: str) -> str:
    return f".{name}."


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` (file mode `mode`), never following a symlink; raises OSError on failure.

    A reader sees the old content or the new, never a part; leftovers of our own earlier failed writes beside
    `path` are removed on the way. No fsync: it would stall the event loop on a busy disk, and what a power
    loss can leave (an empty file) is caught when the file is read back.
    """
    directory = os.open(path.parent, _DIRECTORY_FLAGS)
    try:
        remove_leftovers(directory, path.name)
        temporary = f"{_temp_prefix(path.name)}{secrets.token_hex(8)}{_SUFFIX}"
        descriptor = os.open(temporary, _CREATE_FLAGS, mode, dir_fd=directory)
        try:
            try:
                os.fchmod(descriptor, mode)  # exactly `mode`, whatever the umask
                _write_all(descriptor, data)
            finally:
                os.close(descriptor)
            os.replace(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except OSError:
            _unlink_quietly(directory, temporary)
            raise
    finally:
        os.close(directory)


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]


def remove_leftovers(directory: int, name: str) -> None:
    """Remove temp files of earlier writes of `name` that never finished (empty or partial): regular files (never
    a link), owned by us, named as we name them and older than STALE_AFTER (a write in progress is left alone)."""
    prefix, now, uid = _temp_prefix(name), time.time(), os.geteuid()
    with os.scandir(directory) as entries:
        for entry in entries:
            if not (entry.name.startswith(prefix) and entry.name.endswith(_SUFFIX)):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_uid == uid and now - info.st_mtime > STALE_AFTER:
                _unlink_quietly(directory, entry.name)


def _unlink_quietly(directory: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=directory)
    except OSError:
        pass  # gone already, or not ours to remove: nothing depends on it
