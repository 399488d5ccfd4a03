"""--env-file with a real supervisor: the file is read at start and again on each upgrade, so a change reaches the
next generation only — never a running one, not even an instance of it that is replaced — and a bad file refuses
the upgrade, naming the file and line, while the serving generation goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from harness import PYTHON, STUB, Supervise, free_port, http_get, supervise_command


def write(path: Path, text: str) -> None:
    staged = path.with_suffix(".new")
    staged.write_text(text)
    staged.replace(path)


def seen(port: int) -> dict:
    return json.loads(http_get(port, "/env")[1])


@pytest.mark.timeout(60)
def test_a_change_reaches_the_next_generation_only_and_a_bad_file_refuses(tmp_path: Path,
                                                                          running: list[Supervise]) -> None:
    port, path = free_port(), tmp_path / "app.env"
    write(path, "# release settings\nRELEASE=one\nGREETING='hello there'\n")
    sup = Supervise(["--env-file", str(path), "--env", "GREETING=from flag", "-l", f"127.0.0.1:{port}",
                     "--watch", "0", "--", PYTHON, STUB]).start()
    running.append(sup)
    sup.wait_for("serving")
    first = seen(port)
    assert first["environ"]["RELEASE"] == "one" and first["environ"]["GREETING"] == "from flag", "--env wins"

    write(path, "RELEASE=two\n")
    mark = sup.mark()
    os.kill(first["pid"], signal.SIGKILL)  # the instance is replaced within its generation: same release
    sup.wait_for("ready", where=lambda event: event["gen"] == 1, after=mark)
    replaced = seen(port)
    assert replaced["pid"] != first["pid"] and replaced["generation"] == 1
    assert replaced["environ"]["RELEASE"] == "one", "a running generation never sees the edited file"

    verdict = sup.upgrade()
    assert verdict["event"] == "promoted", verdict
    second = seen(port)
    assert second["generation"] == 2 and second["environ"]["RELEASE"] == "two"

    write(path, "RELEASE=three\n\nexport BROKEN=1\n")
    refused = sup.upgrade()
    assert refused["event"] == "upgrade-refused", refused
    assert f"invalid env file {path} line 3: 'export BROKEN' is not a variable name" in refused["reason"], refused
    path.unlink()
    refused = sup.upgrade()
    assert refused["event"] == "upgrade-refused" and f"cannot read env file {path}" in refused["reason"], refused
    after = seen(port)
    assert after["generation"] == 2 and after["environ"]["RELEASE"] == "two", "the serving generation goes on"
    assert [event["gen"] for event in sup.of_kind("spawned")] == [1, 1, 2]


@pytest.mark.timeout(20)
def test_a_bad_env_file_at_start_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "app.env"
    path.write_bytes(b"A=1\nB='never closed\n")
    done = subprocess.run([*supervise_command(), "--env-file", str(path), "--", "/bin/true"], capture_output=True,
                          text=True, timeout=15)
    assert done.returncode == 2
    assert done.stderr == f"supervise: error: env file {path} line 2: a quote opened on this line is never closed\n"
