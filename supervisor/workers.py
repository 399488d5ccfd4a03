"""Background workers: small periodic duties with one common shape, so status can show how each is doing."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio


@dataclass
class Worker:
    """Runs `job` every `interval` seconds; a failing run is recorded, never fatal to the supervisor."""

    name: str
    interval: float
    job: Callable[[], Awaitable[None]]
    running: bool = False
    runs: int = 0
    last_run: float | None = None
    last_error: str | None = None
    errors: int = field(default=0)

    async def run(self) -> None:
        """Loop forever (until cancelled by the owner's task group)."""
        while True:
            await anyio.sleep(self.interval)
            await self.run_once()

    async def run_once(self) -> None:
        self.running = True
        try:
            await self.job()
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - a worker reports its failure and tries again next time
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            self.running = False
            self.runs += 1
            self.last_run = time.time()

    def info(self) -> dict[str, Any]:
        """Runtime information for status."""
        return {"name": self.name, "interval": self.interval, "running": self.running, "runs": self.runs,
                "errors": self.errors, "last_run": self.last_run, "last_error": self.last_error}
