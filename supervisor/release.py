"""A release: the command a generation runs, resolved from disk at the moment it is started.

Resolving again on every upgrade is what makes "deploy = replace files + SIGHUP" work: a replaced binary, a
flipped `current` symlink in the working directory or in the executable's path are all picked up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UserError
from .spawn import ExecutableNotFound, resolve_executable

if TYPE_CHECKING:
    from .config import Settings

_FD_TEMPLATE = re.compile(r"\{fd(?::([A-Za-z0-9_.\-]+))?\}")


@dataclass(frozen=True)
class Release:
    """Exactly what was started: argv as configured, the executable and working directory as resolved."""

    argv: tuple[str, ...]
    executable: str
    cwd: str
    logical_cwd: str
    env: tuple[tuple[str, str], ...] = ()
    version_file: str | None = None  # names the release (see identity.py); relative to `cwd`


    def describe(self, names: Sequence[str] | None = None) -> str:
        """One line for logs: the resolved executable and the arguments — with `{fd}` and `{fd:NAME}` replaced as the
        child gets them when the listeners' `names` are given."""
        argv = self.argv if names is None else substitute(self.argv, names)
        return " ".join((self.executable, *argv[1:]))


def logical_cwd(chdir: str | None) -> str:
    """The working directory as the operator named it, symlinks kept (`/srv/app/current`, not its target).

    The shell's $PWD keeps the symlinked path; os.getcwd() has already resolved it and would pin the release.
    """
    if chdir:
        return os.path.abspath(chdir)
    pwd = os.environ.get("PWD")
    try:
        if pwd and os.path.isabs(pwd) and os.path.samefile(pwd, "."):
            return pwd
    except OSError:
        pass
    return os.getcwd()


def resolve(argv: Sequence[str], logical: str, env: Sequence[tuple[str, str]], path: str | None,
            version_file: str | None = None) -> Release:
    """Resolve the working directory and executable now; raises a clear error if either is missing."""
    cwd = os.path.realpath(logical)
    if not os.path.isdir(cwd):
        raise ExecutableNotFound(f"cannot start {argv[0]}: working directory {logical} does not exist")
    executable = pinned(resolve_executable(argv[0], path, cwd))
    return Release(tuple(argv), executable, cwd, logical, tuple(env), version_file)


def next_release(settings: Settings, current: Release) -> Release:
    """What an upgrade with `settings` would start: the command resolved on disk again, in --chdir if given,
    else in the working directory the current release was started from (as the operator named it)."""
    logical = logical_cwd(settings.chdir) if settings.chdir else current.logical_cwd
    return resolve(settings.command, logical, settings.env, os.environ.get("PATH"), settings.version_file)


def pinned(executable: str) -> str:
    """The executable with symlinks in its directory resolved (`current/bin/app` → `releases/v7/bin/app`), so a
    generation restarted later — a dead instance, a rollback — runs the release it was started from even after
    the `current` link moved on. The file name itself is kept: a venv's bin/python must stay a link to work."""
    directory, name = os.path.split(executable)
    return os.path.join(os.path.realpath(directory), name)


def check_templates(argv: Sequence[str], names: Sequence[str]) -> None:
    """Reject `{fd:NAME}` for a NAME no listener has, and `{fd}` with no listener at all."""
    for arg in argv:
        for match in _FD_TEMPLATE.finditer(arg):
            name = match.group(1)
            if name is None and not names:
                raise UserError(f"argument {arg!r} uses {{fd}} but there is no --listen")
            if name is not None and name not in names:
                raise UserError(f"argument {arg!r} names listener {name!r}; known: {', '.join(names) or 'none'}")


def substitute(argv: Sequence[str], names: Sequence[str]) -> tuple[str, ...]:
    """Replace `{fd}` with 3 and `{fd:NAME}` with the fd number that listener gets in the child."""

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(3 + (names.index(name) if name is not None else 0))

    return tuple(_FD_TEMPLATE.sub(number, arg) for arg in argv)


def generation_env(release: Release, generation: int, notify_path: str | None) -> Mapping[str, str]:
    """The variables a child of `generation` gets on top of the inherited environment."""
    env = dict(release.env)
    env["SUPERVISE_GENERATION"] = str(generation)
    env["PWD"] = release.logical_cwd
    if notify_path:
        env["NOTIFY_SOCKET"] = notify_path
    return env
