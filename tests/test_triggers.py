"""--upgrade-on-change: replacing the executable or flipping a symlink upgrades once, after a settle delay."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from harness import Supervise, free_port, http_get, write_release


def release(path: Path, tag: str, *flags: str) -> None:
    """Deploy the stub tagged `tag` at `path` (a script named `run`), replacing it atomically."""
    assert path.name == "run"
    write_release(path.parent, "--tag", tag, *flags)


def tag(port: int) -> str:
    return json.loads(http_get(port, "/env")[1])["tag"]


def upgrades(sup: Supervise) -> list[dict]:
    return [event for event in sup.events if event["event"] in ("promoted", "rolled-back", "upgrade-refused")]


@pytest.mark.timeout(40)
def test_replaced_executable_upgrades_once_and_a_broken_one_is_not_retried(tmp_path: Path) -> None:
    port, run = free_port(), tmp_path / "app" / "run"
    release(run, "one")
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--watch", "0", "--ready", "http/readyz", "--ready-timeout", "3s",
                     "--upgrade-on-change", str(run), "--change-settle", "300ms", "--", str(run)]).start()
    try:
        sup.wait_for("serving")
        release(run, "two")
        promoted = sup.wait_for("promoted", timeout=10)
        assert sup.of_kind("upgrade-requested")[0]["trigger"] == f"changed: {run}"
        sup.wait_for("retired", where=lambda event: event["gen"] == promoted["old_gen"])
        assert tag(port) == "two"
        release(run, "broken", "--never-ready")
        rolled_back = sup.wait_for("rolled-back", timeout=10)
        time.sleep(2.5)  # a broken release is not retried until the file changes again
        assert len(upgrades(sup)) == 2 and tag(port) == "two", upgrades(sup)
        release(run, "three")
        mark = sup.mark()
        verdict = sup.wait_for("promoted", after=mark, timeout=10)
        assert rolled_back["gen"] < verdict["gen"] and len(upgrades(sup)) == 3
    finally:
        sup.stop()


@pytest.mark.timeout(30)
def test_flipped_symlink_upgrades_once(tmp_path: Path) -> None:
    port = free_port()
    for name in ("v1", "v2"):
        release(tmp_path / "releases" / name / "run", name)
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "releases" / "v1")
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--watch", "0", "--upgrade-on-change", str(current),
                     "--change-settle", "300ms", "--", str(current / "run")]).start()
    try:
        sup.wait_for("serving")
        flipped = tmp_path / "current.new"
        flipped.symlink_to(tmp_path / "releases" / "v2")
        os.replace(flipped, current)
        promoted = sup.wait_for("promoted", timeout=10)
        sup.wait_for("retired", where=lambda event: event["gen"] == promoted["old_gen"])
        assert tag(port) == "v2"
        time.sleep(1.5)
        assert len(upgrades(sup)) == 1, "one flip, one upgrade"
    finally:
        sup.stop()
