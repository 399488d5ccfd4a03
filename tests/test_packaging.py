"""The package as pip installs it (not the editable checkout the tests run from) holds every module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness import ROOT


@pytest.mark.timeout(120)
def test_wheel_contains_every_module(tmp_path: Path) -> None:
    # From a clean copy: a stale build/ in the checkout would hide a package missing from the configuration.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", ".venv", ".git", "__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=110)
    assert built.returncode == 0, built.stderr
    wheel = next(tmp_path.glob("supervise-*.whl"))
    packed = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(path.relative_to(ROOT)) for path in (ROOT / "supervisor").rglob("*.py")}
    assert sources and sources <= packed, f"missing from the wheel: {sorted(sources - packed)}"
    assert any(name.endswith("entry_points.txt") for name in packed)


def test_no_module_of_the_supervisor_imports_the_testing_package() -> None:
    # supervisor.testing is for tests and benchmarks: what `supervise` imports stays light without it.
    package = ROOT / "supervisor"
    modules = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for path in package.rglob("*.py") if "testing" not in path.parts and path.name != "__main__.py")
    probe = ("import importlib, sys\n"
             f"for name in {modules!r}:\n    importlib.import_module(name)\n"
             "print(sorted(name for name in sys.modules if name.startswith('supervisor.testing')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert len(modules) > 40 and done.stdout.strip() == "[]", (len(modules), done.stdout)
