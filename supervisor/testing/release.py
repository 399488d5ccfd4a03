"""A release on disk, as the tests and benchmarks deploy one: an executable `run` script, rewritten atomically
as a deploy tool would, that execs a test server with this release's flags."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from supervisor.testing.checkout import STUB


def write_release(directory: Path, server: Path, *flags: str, only: dict[int, list[str]] | None = None,
                  python: str = sys.executable) -> Path:
    """(Re)write `directory/run`: it execs `python server` with `flags`, or with `only[i]` for SUPERVISE_INSTANCE=i."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["#!/bin/sh"]
    for index, special in (only or {}).items():
        lines.append(f'[ "$SUPERVISE_INSTANCE" = "{index}" ] && exec {python} {server} {_quoted(special)}')
    lines.append(f"exec {python} {server} {_quoted(flags)}")
    staged, script = directory / ".run.new", directory / "run"
    staged.write_text("\n".join(lines) + "\n")
    staged.chmod(0o755)
    os.replace(staged, script)
    return script


def _quoted(items: list[str] | tuple[str, ...]) -> str:
    return " ".join(f"'{item}'" for item in items)


@dataclass
class Release:
    """One release directory whose `run` script is rewritten for each deploy (of `server`, the stub by default)."""

    directory: Path
    server: Path = Path(STUB)

    @property
    def script(self) -> Path:
        return self.directory / "run"

    def deploy(self, *flags: str) -> None:
        """Replace the script atomically with one that runs the server with `flags`, as a deploy tool would."""
        write_release(self.directory, self.server, *flags)
