"""Short-lived operator commands (hooks, exec probes): run through spawn and the reaper, with a timeout.

They are started like generations, not with asyncio's subprocess support, so the reaper stays the only
waiter for child exits (see reaper.py).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

import anyio

from .reaper import Reaper
from .spawn import ProcessSpec, SpawnError, child_environment, spawn

SHELL = "/bin/sh"  # hooks and exec probes run as `sh -c COMMAND`


@dataclass
class CommandRunner:
    """Runs `sh -c COMMAND` in its own process group; the whole group is killed on timeout or cancellation."""

    reaper: Reaper
    base_env: Mapping[str, str]
    cwd: str | None = None
    fd_limit: tuple[int, int] | None = None  # RLIMIT_NOFILE for the command: the supervisor's as it started

    async def __call__(self, command: str, env: dict[str, str], timeout: float) -> str | None:
        """Run to completion: None on exit 0, else why it failed (`exited with status 1`, `timed out after 5s`)."""
        spec = ProcessSpec(SHELL, ("sh", "-c", command), child_environment(self.base_env, env, 0, ()), cwd=self.cwd,
                           fd_limit=self.fd_limit)
        try:
            pid = spawn(spec)
        except SpawnError as exc:
            return str(exc)
        child = self.reaper.watch(pid)
        try:
            with anyio.move_on_after(timeout):
                status = await child.wait()
                return None if status.ok else status.describe()
            return f"timed out after {timeout:g}s"
        finally:
            if child.status is None:
                _kill_group(pid)
                with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                    await child.wait()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
