"""The code under measurement: the working tree, a directory, or a `git archive` snapshot of a revision (--src),
and the options of that supervise which keep its files (control socket, state) in the benchmark's work dir."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .processes import HOST, BenchError, child_env

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


@dataclass(frozen=True)
class Source:
    """Where supervisor/, examples/app.py and tests/servers/stub.py are taken from, and how to run that supervise."""

    root: Path
    workdir: Path
    private_options: tuple[str, ...] = ()  # which of the newer options (_private_options) this supervise understands

    @property
    def app(self) -> Path:
        return self.root / "examples" / "app.py"

    @property
    def stub(self) -> Path:
        return self.root / "tests" / "servers" / "stub.py"

    def supervise(self, port: int, *options: str, command: list[str], log_level: str = "debug") -> list[str]:
        """The command line of this supervise on HOST:port with JSON logs, `options`, its private files and `command`."""
        return [PYTHON, "-m", "supervisor", "--log-format", "json", "--log-level", log_level, "-l", f"{HOST}:{port}",
                *options, *self.private_files(port), "--", *command]

    def private_files(self, port: int) -> list[str]:
        """--name, and --control/--state-dir inside our work dir when this supervise has them: nothing is left
        behind in the user's runtime directory, and no two benchmark supervisors share a file."""
        options = ["--name", f"bench-{port}"]
        if "--control" in self.private_options:
            options += ["--control", str(self.workdir / f"ctl-{port}.sock")]
        if "--state-dir" in self.private_options:
            options += ["--state-dir", str(self.workdir / "state")]
        return options


def use_source(spec: str | None, workdir: Path) -> tuple[Source, dict[str, Any]]:
    """The code to measure (the working tree, a directory, or a git snapshot) and its description for the report."""
    if spec is None:
        root = ROOT
    elif spec.startswith("git:"):
        rev = spec[4:] or "HEAD"
        root = workdir / "src"
        root.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "supervisor", "examples", "tests/servers"],
                                 capture_output=True, check=False)
        if archive.returncode != 0:
            raise BenchError(f"--src {spec}: git archive failed: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    else:
        root = Path(spec).resolve()
    source = Source(root, workdir)
    if not (root / "supervisor" / "__main__.py").is_file() or not source.app.is_file() or not source.stub.is_file():
        raise BenchError(f"--src {spec}: no supervisor/, examples/app.py and tests/servers/stub.py under {root}")
    source = Source(root, workdir, _private_options(root))
    commit = _git("rev-parse", "HEAD") if spec is None else _git("rev-parse", spec[4:] or "HEAD") if spec.startswith("git:") else None
    dirty = bool(_git("status", "--porcelain", "--", "supervisor", "examples", "tests/servers")) if spec is None else False
    describe = (f"working tree at {commit[:10] if commit else '?'}" + (" + uncommitted changes" if dirty else "")
                if spec is None else f"{spec} = {commit[:10] if commit else '?'}" if commit else str(root))
    return source, {"spec": spec, "dir": str(root), "commit": commit, "uncommitted_changes": dirty, "describe": describe,
                    "private_options": list(source.private_options)}


def _private_options(root: Path) -> tuple[str, ...]:
    """Which of --control / --state-dir / --cutover / --start-priority / --ramp the supervise under test
    understands (older commits lack them)."""
    done = subprocess.run([PYTHON, "-m", "supervisor", "--help"], cwd=root, capture_output=True, text=True,
                          env=child_env(), check=False, timeout=60)
    newer = ("--control", "--state-dir", "--cutover", "--start-priority", "--ramp")
    return tuple(option for option in newer if option in done.stdout)


def _git(*args: str) -> str | None:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None
