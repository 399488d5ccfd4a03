"""Running the project's code as user `nobody`, from files that user can read.

The clone, its virtualenv (an editable install points into the clone) and the interpreter the virtualenv was
made with may all live under a directory only root can enter: a clone under `mktemp -d` (mode 0700), a pyenv
under /root. A process switched to `nobody` then fails with "No module named supervisor" before it tests
anything. So what it runs is copied into a world-readable directory: the modules a `supervise ctl` run imports
from outside the standard library (the project and its pure-Python dependencies), and it is run by the first
interpreter `nobody` can execute.
"""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The top-level modules a `supervise ctl` run imports from outside the standard library, one path per line.
_LIST_CTL_MODULES = """
import runpy, sys, sysconfig
from pathlib import Path
before = set(sys.modules)
sys.argv = ["supervise", "ctl", "--control", "/nonexistent/ctl.sock", "status"]
try:
    runpy.run_module("supervisor", run_name="__main__")
except SystemExit:
    pass
stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
for name in sorted({name.partition(".")[0] for name in set(sys.modules) - before}):
    where = getattr(sys.modules.get(name), "__file__", None)
    if where and stdlib not in Path(where).resolve().parents:
        print(Path(where).parent if Path(where).name == "__init__.py" else where)
"""


def prefix() -> list[str]:
    """The command prefix that runs what follows as nobody, with no supplementary groups."""
    try:
        group = grp.getgrnam("nogroup").gr_name
    except KeyError:
        group = "nobody"
    return ["setpriv", "--reuid=nobody", f"--regid={group}", "--clear-groups"]


def _candidates() -> list[str]:
    """Interpreters to try: the one the tests run with first (same version), then the system's."""
    found = [os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""), shutil.which("python3"),
             "/usr/bin/python3", "/usr/local/bin/python3"]
    return list(dict.fromkeys(filter(None, found)))


def _copy_readable(sources: list[Path], lib: Path) -> None:
    lib.mkdir(mode=0o755)
    for source in sources:
        if source.is_dir():
            shutil.copytree(source, lib / source.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(source, lib / source.name)
    for place, folders, files in os.walk(lib):
        for name in folders:
            os.chmod(os.path.join(place, name), 0o755)
        for name in files:
            os.chmod(os.path.join(place, name), 0o644)


@dataclass(frozen=True)
class NobodyPython:
    """An interpreter nobody can run, and a world-readable directory holding the code it imports."""

    python: str
    path: Path

    @classmethod
    def prepare(cls, directory: Path) -> NobodyPython | None:
        """Copy what a `supervise ctl` run imports into `directory/lib` (readable by everyone) and find an
        interpreter that runs `supervise ctl --help` from there as nobody; None if there is none."""
        listed = subprocess.run([sys.executable, "-c", _LIST_CTL_MODULES], cwd="/", capture_output=True, text=True,
                                timeout=60, check=True, stdin=subprocess.DEVNULL)
        _copy_readable([Path(line) for line in listed.stdout.splitlines()], directory / "lib")
        for python in _candidates():
            candidate = cls(python, directory / "lib")
            if subprocess.run(candidate.command("-m", "supervisor", "ctl", "--help"), **candidate.options(),
                              capture_output=True).returncode == 0:
                return candidate
        return None

    def command(self, *args: str) -> list[str]:
        """`python args…` run as nobody (no user site-packages)."""
        return [*prefix(), self.python, "-s", *args]

    def options(self) -> dict[str, Any]:
        """subprocess.run options for `command`: imports only the copied code, writes no bytecode, from /."""
        env = {**os.environ, "PYTHONPATH": str(self.path), "PYTHONDONTWRITEBYTECODE": "1"}
        return {"env": env, "cwd": "/", "stdin": subprocess.DEVNULL, "timeout": 60}
