"""Hostile and mistaken input (issue 11, items 9 and 11), with the real `supervise` command and real processes.

- Every value has a type and a range, checked by one table for the flag and the config key alike; a bad one is
  one line on stderr and exit 2, never a traceback, and nothing is started. A config error names the file and
  the key, and an unknown key gets the closest known one as a suggestion.
- Unrelated apps never share state: the default --name is the app and its first listener's port, logged at
  start; a name can never place the control socket outside the runtime directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import PYTHON, STUB, Supervise, free_port, http_get, supervise_command, wait_port_free

_CONSOLE_SCRIPT = Path(PYTHON).parent / "supervise"
SUPERVISE = [str(_CONSOLE_SCRIPT)] if _CONSOLE_SCRIPT.exists() else supervise_command()
ONE_LINE_TIMEOUT = 15.0  # a refusal takes well under a second; generous for a loaded machine


@dataclass
class Outcome:
    returncode: int | None  # None: still running at the deadline (it was then killed, with its process group)
    stderr: str


def run_supervise(args: list[str], env: dict[str, str] | None = None) -> Outcome:
    """Run supervise as an operator would; a refusal is expected at once. Whatever it started is killed after."""
    process = subprocess.Popen([*SUPERVISE, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=ONE_LINE_TIMEOUT)
        return Outcome(process.returncode, stderr)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its children die with it (PR_SET_PDEATHSIG)
        _, stderr = process.communicate(timeout=10)
        return Outcome(None, stderr)


def assert_one_line(outcome: Outcome, *needles: str) -> str:
    """Exit 2, one `supervise: error:` line holding every needle, no traceback."""
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert outcome.returncode == 2, (outcome.returncode, lines[:5])
    assert len(lines) == 1 and lines[0].startswith("supervise: error: "), lines[:5]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- item 9: every flag has a type and a range -----------------------------------------------------------------

BAD_FLAGS: dict[str, tuple[list[str], str]] = {
    "processes-100000": (["-n", "100000"], "expected an integer from 1 to 1024, got 100000"),
    "processes-zero": (["-n", "0"], "expected an integer from 1 to 1024, got 0"),
    "health-interval-0": (["--health-interval", "0"], "expected a duration from 50ms to 1h"),
    "health-interval-1ms": (["--health-interval", "1ms"], "expected a duration from 50ms to 1h"),
    "probe-timeout-negative": (["--probe-timeout", "-1"], "--probe-timeout"),
    "watch-split-unit": (["--watch", "5", "sec"], "option --watch: '5 sec' is two words, and 'sec' would be run as "
                         "the command; write 5s"),
    "max-rss-split-unit": (["--max-rss=512", "MiB"], "option --max-rss: '512 MiB' is two words"),
    "liveness-interval-1ms": (["--liveness-interval", "1ms"], "expected a duration from 50ms to 1h"),
    "max-rss-small": (["--max-rss", "512K"], "expected a size from 1 MiB to 16 TiB (like 512M, 2G), got \"512K\""),
    "max-rss-unit": (["--max-rss", "2 PB"], "'--max-rss': expected a size from 1 MiB"),
    "ready-timeout-huge": (["--ready-timeout", "9" * 400 + "h"], "expected a duration from 100ms to 24h"),
    "watch-inf": (["--watch", "inf"], "expected a duration from 0s to 24h"),
    "backlog-huge": (["--backlog", "99999999999999999999"], "expected an integer from 1 to 65535"),
    "max-restarts-negative": (["--max-restarts", "-1"], "expected an integer from 0 to 1000"),
    "health-threshold-bool": (["--health-threshold", "true"], "expected an integer from 1 to 1000"),
    "name-300-characters": (["--name", "n" * 300], "invalid name"),
    "name-climbs-out": (["--name", "x/../../y"], "invalid name 'x/../../y'"),
    "name-dot": (["--name", ".hidden"], "invalid name '.hidden'"),
    "unix-mode-out-of-range": (["--unix-mode", "77777"], "an octal file mode"),
    "batch-5000-digits": (["--strategy", "rolling", "--batch", "9" * 5000], "--batch"),
    "env-no-name": (["--env", "=x"], "KEY=VALUE"),
    "log-level-verbose": (["--log-level", "verbose"], "'verbose' is not one of 'debug', 'info', 'warning', 'error'"),
    "loop-trio": (["--loop", "trio"], "'trio' is not one of 'auto', 'uvloop', 'asyncio'"),
}


@pytest.mark.timeout(40)
@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_a_bad_flag_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    flags, needle = BAD_FLAGS[case]
    port = free_port()
    outcome = run_supervise([*flags, "--control", str(tmp_path / "c.sock"), "-l", f"127.0.0.1:{port}",
                             "--ready", "delay:100ms", "--", "/bin/sleep", "30"])
    assert_one_line(outcome, needle)
    assert not (tmp_path / "c.sock").exists(), "refused before anything was set up"
    assert wait_port_free(port, 1)


# -- item 9: every config key has the same type and range, and its errors name the file and the key -----------

BAD_KEYS: dict[str, tuple[str, list[str]]] = {
    "processes-string": ('processes = "3"', ["key 'processes': expected an integer from 1 to 1024, got \"3\""]),
    "processes-bool": ("processes = true", ["key 'processes': expected an integer from 1 to 1024, got true"]),
    "processes-float": ("processes = 2.9", ["key 'processes': expected an integer from 1 to 1024, got 2.9"]),
    "processes-100000": ("processes = 100000", ["key 'processes': expected an integer from 1 to 1024, got 100000"]),
    "log-format-xml": ('log_format = "xml"', ["key 'log_format': expected one of text, json, got \"xml\""]),
    "log-level-verbose": ('log_level = "verbose"', ["key 'log_level': expected one of debug, info, warning, error"]),
    "loop-trio": ('loop = "trio"', ["key 'loop': expected one of auto, uvloop, asyncio, got \"trio\""]),
    "env-nested-table": ('[env]\nA = "1"\nB = { c = "d" }', ["key 'env': variable B: expected a string", "a table"]),
    "env-not-a-table": ("env = 3", ["key 'env': expected a table"]),
    "watch-inf": ("watch = inf", ["key 'watch': expected a duration from 0s to 24h", "got inf"]),
    "watch-nan": ("watch = nan", ["key 'watch': expected a duration", "got nan"]),
    "probe-timeout-negative": ("probe_timeout = -1", ["key 'probe_timeout': expected a duration from 10ms to 1h"]),
    "health-interval-zero": ('health_interval = "0s"', ["key 'health_interval': expected a duration from 50ms"]),
    "liveness-interval-day": ('liveness_interval = "2h"', ["key 'liveness_interval': expected a duration from 50ms"]),
    "max-rss-float": ("max_rss = 1.5", ["key 'max_rss': expected a size from 1 MiB to 16 TiB", "got 1.5"]),
    "max-rss-huge": ('max_rss = "17T"', ["key 'max_rss': expected a size", 'got "17T"']),
    "backlog-huge": ("backlog = 99999999999999999999", ["key 'backlog': expected an integer from 1 to 65535"]),
    "name-climbs-out": ('name = "x/../../y"', ["key 'name': invalid name 'x/../../y'"]),
    "unix-mode-int": ("unix_mode = 0o660", ["key 'unix_mode': expected an octal file mode like \"660\", got 432"]),
    "nodelay-string": ('nodelay = "no"', ["key 'nodelay': expected true or false"]),
    "listen-number": ("listen = 8080", ["key 'listen': expected a list"]),
    "hook-timeout-bool": ("[hooks]\ntimeout = true", ["key 'hooks.timeout': expected a duration"]),
    "control-nul": ('control = "/tmp/a\\u0000b"', ["key 'control': expected a path"]),
    "unknown-key-suggested": ("helth_interval = \"1s\"", ["unknown key 'helth_interval' (did you mean 'health_interval'?)"]),
    "unknown-hook-suggested": ("[hooks]\ntimout = \"1s\"", ["unknown key 'hooks.timout' (did you mean 'hooks.timeout'?)"]),
}


def _config(tmp_path: Path, port: int, body: str) -> Path:
    """A config that would start (with `body` instead of its own value of the key `body` sets)."""
    path = tmp_path / "app.toml"
    base = {"command": '["/bin/sleep", "30"]', "listen": f'["127.0.0.1:{port}"]', "ready": '"delay:100ms"',
            "control": f'"{tmp_path / "c.sock"}"'}
    lines = [f"{key} = {value}" for key, value in base.items() if not body.startswith(f"{key} ")]
    path.write_text("\n".join([*lines, body]) + "\n")
    return path


@pytest.mark.timeout(40)
@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_a_bad_config_value_is_one_line_naming_the_file_and_the_key(case: str, tmp_path: Path) -> None:
    body, needles = BAD_KEYS[case]
    port = free_port()
    path = _config(tmp_path, port, body)
    assert_one_line(run_supervise(["--config", str(path)]), f"config {path}: ", *needles)
    assert not (tmp_path / "c.sock").exists()
    assert wait_port_free(port, 1)


UNREADABLE_FILES: dict[str, tuple[bytes, str]] = {
    "deeply-nested-tables": (b"a = " + b"{b = " * 5000 + b"1" + b"}" * 5000 + b"\n", "invalid TOML"),
    "deeply-nested-arrays": (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", "invalid TOML"),
    "5000-digit-number": (b"processes = " + b"9" * 5000 + b"\n", "invalid TOML"),
    "not-utf8": (b'command = ["/bin/true"]\n# \xff\xfe\n', "not UTF-8 text"),
    "huge": (b"# " + b"x" * (2 << 20) + b"\n", "larger than"),
}


@pytest.mark.timeout(40)
@pytest.mark.parametrize("case", list(UNREADABLE_FILES))
def test_a_file_that_cannot_be_read_is_one_line(case: str, tmp_path: Path) -> None:
    content, needle = UNREADABLE_FILES[case]
    path = tmp_path / "app.toml"
    path.write_bytes(content)
    assert_one_line(run_supervise(["--config", str(path)]), f"config {path}: ", needle)


@pytest.mark.timeout(40)
def test_flag_and_key_are_checked_by_the_same_rule(tmp_path: Path) -> None:
    port = free_port()
    by_flag = assert_one_line(run_supervise(["--control", str(tmp_path / "c.sock"), "-l", f"127.0.0.1:{port}",
                                             "--probe-timeout", "2h", "--", "/bin/sleep", "30"]))
    by_key = assert_one_line(run_supervise(["--config", str(_config(tmp_path, port, 'probe_timeout = "2h"'))]))
    expectation = "expected a duration from 10ms to 1h (like 250ms, 5s, 2m)"
    assert expectation in by_flag and expectation in by_key, (by_flag, by_key)


@pytest.mark.timeout(60)
def test_a_bad_value_in_a_reread_file_refuses_the_upgrade_naming_file_and_key(tmp_path: Path) -> None:
    port, path = free_port(), tmp_path / "app.toml"
    base = f'command = ["{PYTHON}", "{STUB}"]\nlisten = ["127.0.0.1:{port}"]\nwatch = "0"\ndrain_timeout = "5s"\n'
    path.write_text(base)
    sup = Supervise(["--config", str(path)]).start()
    try:
        sup.wait_for("serving")
        staged = tmp_path / "app.toml.new"
        staged.write_text(base + 'processes = "3"\n')
        staged.replace(path)
        refused = sup.upgrade()
        assert refused["event"] == "upgrade-refused", refused
        assert f"config {path}: key 'processes': expected an integer from 1 to 1024, got \"3\"" in refused["reason"]
        status = sup.ctl("status", "--json")
        assert status.returncode == 0, status.stderr
        generations = json.loads(status.stdout)["generations"]
        assert [(gen["number"], gen["state"]) for gen in generations] == [(1, "serving")], generations
        assert http_get(port)[0] == 200
    finally:
        sup.stop()


# -- item 11: names -------------------------------------------------------------------------------------------


@pytest.fixture
def runtime_root() -> Iterator[Path]:
    """A short private XDG_RUNTIME_DIR (tmp_path is too long for notify socket paths), as /run is: 0711."""
    directory = Path(tempfile.mkdtemp(prefix="sv-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(40)
def test_a_name_never_places_the_control_socket_outside_the_runtime_dir(runtime_root: Path) -> None:
    inner = runtime_root / "a" / "b"
    inner.mkdir(parents=True, mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(inner)}
    outcome = run_supervise(["--name", "x/../../y", "-l", f"127.0.0.1:{free_port()}", "--", "/bin/sleep", "30"], env)
    assert_one_line(outcome, "invalid name")
    assert sorted(path.name for path in runtime_root.rglob("*")) == ["a", "b"], "nothing was created anywhere"
    ctl = subprocess.run([*SUPERVISE, "ctl", "--name", "../../y", "status"], capture_output=True, text=True, env=env,
                         timeout=ONE_LINE_TIMEOUT, stdin=subprocess.DEVNULL)
    assert ctl.returncode == 2 and "Traceback" not in ctl.stderr, ctl.stderr
    assert ctl.stderr.strip().splitlines() == [ctl.stderr.strip()] and "invalid name '../../y'" in ctl.stderr


@pytest.mark.timeout(90)
def test_unrelated_apps_get_their_own_name_socket_and_state(runtime_root: Path) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_root)}
    apps: dict[str, tuple[Supervise, int]] = {}
    try:
        for app in ("alpha", "beta"):  # two scripts started the same way: `python SCRIPT`, no --name
            script = runtime_root / f"{app}.py"
            shutil.copy(STUB, script)
            port = free_port()
            sup = Supervise(["-l", f"127.0.0.1:{port}", "--watch", "0", "--drain-timeout", "5s", "--", PYTHON,
                             str(script)], env=env, own_control=False).start()
            apps[f"{app}-{port}"] = (sup, port)
            sup.wait_for("serving")
        for name, (sup, _port) in apps.items():
            starting = sup.wait_for("starting")
            assert starting["name"] == name and name in starting["msg"], starting
            assert starting["control"] == str(runtime_root / "supervise" / f"{name}.sock"), starting
        first = next(iter(apps))
        upgraded = subprocess.run([*SUPERVISE, "ctl", "--name", first, "upgrade"], capture_output=True, text=True,
                                  env=env, timeout=60, stdin=subprocess.DEVNULL)
        assert upgraded.returncode == 0, (upgraded.stdout, upgraded.stderr)
        for name, (sup, _port) in apps.items():
            status = subprocess.run([*SUPERVISE, "ctl", "--name", name, "status", "--json"], capture_output=True,
                                    text=True, env=env, timeout=30, stdin=subprocess.DEVNULL)
            assert status.returncode == 0, status.stderr
            data = json.loads(status.stdout)
            assert data["supervisor"]["pid"] == sup.pid and data["supervisor"]["name"] == name
            assert [record["result"] for record in data["history"]] == (["promoted"] if name == first else []), data
        states = {path.name for path in (runtime_root / "supervise").glob("*.state.json")}
        assert states == {f"{name}.state.json" for name in apps}, states
    finally:
        for sup, _port in apps.values():
            sup.stop()
