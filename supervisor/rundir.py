"""Directories the supervisor keeps its sockets and state in: ours or refused, and the per-run runtime directory.

A directory in a shared place (`/tmp/supervise-UID`) may have been created first by another user, who could then
read our sockets or plant symlinks: like tmux and ssh-agent, we refuse a directory that is not a real directory
owned by us and closed to others' writes. Each run gets its own `run-PID-N` directory (its notify sockets) holding
a `lock` file flocked for the supervisor's whole life: a later supervisor removes a directory only when it can
take that lock. A pid is no proof of life (another PID namespace, a recycled pid); a lock is, and the kernel drops
it when its holder dies, even by SIGKILL. Everything below a parent is reached through directory fds and
O_NOFOLLOW, so a symlink planted anywhere is never followed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .config import default_runtime_dir
from .errors import UserError

LOCK_NAME = "lock"
RUN_PREFIX = "run-"
STAGING_PREFIX = ".new-"  # a run directory being set up; it is renamed to run-* once its lock is held
STAGING_STALE_AFTER = 60.0  # seconds: a staging directory this old, unlocked, was left by a killed supervisor
MAX_RUNTIME_PATH = 56  # leaves room for /run-PID-NANOSECONDS/genN.SEQ.notify within AF_UNIX's 107 bytes
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def own_directory(path: Path, what: str, *, private: bool) -> None:
    """Create `path` (mode 0700) if missing, then refuse it with one line unless it is safe to put our files in.

    `private`: a directory we name ourselves in a shared place (the runtime directory): it must be a real
    directory (not a symlink) owned by our uid. Otherwise (a directory the user named: --control, --state-dir)
    symlinks are the user's choice and root's directories are trusted too. Neither may be writable by group or
    others, except a sticky directory the user named (such as /tmp), where others cannot replace our files.
    """
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = os.lstat(path) if private else os.stat(path)
    except OSError as exc:
        raise UserError(f"cannot use {what} {path}: {exc.strerror}") from None
    problem = _ownership_problem(info, private)
    if problem:
        raise UserError(f"refusing {what} {path}: {problem}")


def _ownership_problem(info: os.stat_result, private: bool) -> str | None:
    """Why a directory is not safe to use, or None."""
    uid = os.geteuid()
    if stat.S_ISLNK(info.st_mode):
        return "it is a symlink (remove it; another user may have planted it)"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if info.st_uid != uid and (private or info.st_uid != 0):
        return f"it is owned by uid {info.st_uid}, not by uid {uid} (another user created it: remove it or choose another directory)"
    if info.st_mode & 0o022 and (private or not info.st_mode & stat.S_ISVTX):
        return f"it is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}; chmod go-w it)"
    return None


def runtime_parent() -> Path:
    """The per-user directory the run directories go in, created and checked (refused with one line if not ours);
    short, since socket paths are limited to 107 bytes."""
    parent = default_runtime_dir()
    if len(str(parent)) > MAX_RUNTIME_PATH:
        parent = Path("/tmp") / f"supervise-{os.getuid()}"
    own_directory(parent, "runtime directory", private=True)
    return parent


@dataclass
class RuntimeDir:
    """This run's private directory and the fd of its lock, held (flock) until the directory is removed."""

    path: Path
    lock: int

    @classmethod
    def create(cls, parent: Path, shared: bool) -> RuntimeDir:
        """A new run directory under `parent` (see runtime_parent), which is cleaned of stale run directories first.

        `shared`: children run as another user and must reach their notify socket, so the directories become
        traversable (0711: no listing); each socket itself belongs to that user.
        """
        try:
            parent_fd = os.open(parent, _DIRECTORY)
            try:
                problem = _ownership_problem(os.fstat(parent_fd), private=True)  # the one checked, not a swapped one
                if problem:
                    raise UserError(f"refusing runtime directory {parent}: {problem}")
                remove_stale(parent_fd)
                name, lock = _create_locked(parent_fd, shared)
            finally:
                os.close(parent_fd)
        except OSError as exc:
            raise UserError(f"cannot create runtime directory under {parent}: {exc.strerror}") from None
        return cls(parent / name, lock)

    def remove(self) -> None:
        """Remove the directory and its sockets, then let the lock go."""
        try:
            parent_fd = os.open(self.path.parent, _DIRECTORY)
            try:
                _remove_directory(parent_fd, self.path.name)
            finally:
                os.close(parent_fd)
        except OSError:
            pass  # the parent went away: nothing of ours is left to remove
        os.close(self.lock)


def _create_locked(parent_fd: int, shared: bool) -> tuple[str, int]:
    """Make the run directory with its lock held before it appears under its run-* name; (name, lock fd)."""
    name = f"{RUN_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
    staging = STAGING_PREFIX + name
    os.mkdir(staging, 0o700, dir_fd=parent_fd)
    directory = os.open(staging, _DIRECTORY, dir_fd=parent_fd)
    try:
        lock = os.open(LOCK_NAME, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                       dir_fd=directory)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if shared:
            os.fchmod(parent_fd, 0o711)
            os.fchmod(directory, 0o711)
        os.rename(staging, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    finally:
        os.close(directory)
    return name, lock


def remove_stale(parent_fd: int) -> None:
    """Remove the run directories under `parent_fd` whose supervisor is gone (their lock can be taken). Entries
    that are not real directories owned by us are never touched."""
    with os.scandir(parent_fd) as entries:
        candidates = [entry.name for entry in entries
                      if entry.name.startswith((RUN_PREFIX, STAGING_PREFIX + RUN_PREFIX))
                      and entry.is_dir(follow_symlinks=False)]
    for name in candidates:
        _remove_if_stale(parent_fd, name)


def _remove_if_stale(parent_fd: int, name: str) -> None:
    try:
        directory = os.open(name, _DIRECTORY, dir_fd=parent_fd)
    except OSError:
        return  # gone, or replaced by a symlink since it was listed
    lock = None
    try:
        info = os.fstat(directory)
        if info.st_uid != os.geteuid():
            return
        if name.startswith(STAGING_PREFIX) and time.time() - info.st_mtime < STAGING_STALE_AFTER:
            return  # being set up right now by a supervisor starting next to us
        gone, lock = _lock_if_gone(directory)
        if gone:
            _remove_directory(parent_fd, name, directory)
    except OSError:
        pass  # removed by another supervisor cleaning up at the same time, or not removable: left as it is
    finally:
        if lock is not None:
            os.close(lock)
        os.close(directory)


def _lock_if_gone(directory: int) -> tuple[bool, int | None]:
    """Whether the supervisor of a run directory is gone, and the fd of its lock, now held by us, if it has one.

    Gone: its lock can be taken, or there is no lock file (left by an older version, or tampered with)."""
    try:
        lock = os.open(LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except OSError as exc:
        return exc.errno in (errno.ENOENT, errno.ELOOP), None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return False, None
    return True, lock


def _remove_directory(parent_fd: int, name: str, directory: int | None = None) -> None:
    """Unlink every non-directory entry of `name` (a link is removed, never followed), then the directory."""
    handle = directory if directory is not None else os.open(name, _DIRECTORY, dir_fd=parent_fd)
    try:
        with os.scandir(handle) as entries:
            for entry in list(entries):
                if not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.name, dir_fd=handle)
        os.rmdir(name, dir_fd=parent_fd)
    finally:
        if directory is None:
            os.close(handle)
