"""Errors a user can cause: each becomes one line on stderr and an exit code, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, reported as one clear line."""

    exit_code = 2


class StartupError(UserError):
    """The supervisor could not start serving (port in use, exec failure of the first generation)."""

    exit_code = 1
