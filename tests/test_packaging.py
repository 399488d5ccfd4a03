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
