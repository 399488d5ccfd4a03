"""`supervise check`: a good setup passes with one "ok" line and exit 0, having created nothing; each class of
mistake is one line and exit 2; several mistakes are all reported, not only the first. Real `supervise check`
processes, a few hundred milliseconds each."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness import PYTHON, STUB, free_port, supervise_command


def check(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*supervise_command(), "check", *args], capture_output=True, text=True, timeout=20,
                          stdin=subprocess.DEVNULL, cwd=cwd)


def good(tmp_path: Path, port: int) -> list[str]:
    """A setup that starts: options, an env file, hooks, an exec probe-free http probe, a named listener."""
    (tmp_path / "app.env").write_text("# settings\nGREETING='hello there'\n")
    return ["-l", f"web=127.0.0.1:{port}", "--control", str(tmp_path / "run" / "c.sock"), "--ready", "http:/readyz",
            "--env-file", str(tmp_path / "app.env"), "--env-file", f"-{tmp_path}/optional.env",
            "--pre-upgrade", "test -d /", "--on-rollback", 'echo "rolled back: $SUPERVISE_REASON"',
            "--pidfile", str(tmp_path / "run" / "app.pid"), "--", PYTHON, STUB, "--tag", "fd-{fd:web}"]


@pytest.mark.timeout(20)
def test_a_good_setup_passes_and_nothing_is_created(tmp_path: Path) -> None:
    done = check(*good(tmp_path, free_port()))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.startswith("supervise check: ok: ") and done.stdout.count("\n") == 1, done.stdout
    assert not (tmp_path / "run").exists(), "check creates no directory for the control socket or the pidfile"

    config = tmp_path / "app.toml"
    config.write_text(f'command = ["/bin/sleep", "1"]\nlisten = ["127.0.0.1:{free_port()}"]\n'
                      f'env_file = ["{tmp_path / "app.env"}"]\n[hooks]\npre_upgrade = "true"\n')
    done = check("--config", str(config), "--control", str(tmp_path / "run" / "c.sock"))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def _mistakes(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each class of mistake: what replaces or extends the good setup, and what its one line must say."""
    (tmp_path / "bad.env").write_text("A=1\nexport B=2\n")
    (tmp_path / "broken.toml").write_text("command = [\n")
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    command = ["--", "/bin/sleep", "1"]
    return {
        "flag-value": (["--watch", "soon", *command], "option --watch: expected a duration"),
        "listener": (["-l", "127.0.0.1:99999", *command], "invalid --listen '127.0.0.1:99999': port 99999"),
        "missing-executable": (["--", "/nonexistent/app"], "cannot execute /nonexistent/app: no such file"),
        "not-executable": (["--", str(tmp_path / "not-executable")], "permission denied (not an executable file)"),
        "not-on-path": (["--", "no-such-program-here"], "no-such-program-here: command not found in PATH"),
        "missing-chdir": (["--chdir", str(tmp_path / "gone"), *command], f"working directory {tmp_path}/gone"),
        "config": (["--config", str(tmp_path / "broken.toml")], "broken.toml: invalid TOML"),
        "env-file": (["--env-file", str(tmp_path / "bad.env"), *command], "bad.env line 2: 'export B'"),
        "missing-env-file": (["--env-file", str(tmp_path / "none.env"), *command], "cannot read env file"),
        "unknown-probe": (["--ready", "bogus:x", *command], "unknown probe kind 'bogus'"),
        "probe-without-tcp": (["-l", f"unix:{tmp_path}/s.sock", "--ready", "tcp", *command], "needs a TCP --listen"),
        "hook-syntax": (["--pre-upgrade", 'echo "unclosed', *command], "--pre-upgrade 'echo \"unclosed': /bin/sh "
                                                                         "cannot parse it"),
        "hook-program": (["--on-rollback", "no-such-notifier --now", *command], "no-such-notifier: command not found"),
        "exec-probe": (["--ready", "exec:if then", *command], "--ready exec 'if then': /bin/sh cannot parse it"),
        "fd-template": (["--", "/bin/sleep", "{fd:admin}"], "names listener 'admin'; known: listen0"),
        "user": (["--user", "no-such-user-here", *command], "--user no-such-user-here: no such user"),
        "pidfile": (["--pidfile", str(tmp_path), *command], f"cannot write pidfile {tmp_path}: it is a directory"),
    }


MISTAKES = ["flag-value", "listener", "missing-executable", "not-executable", "not-on-path", "missing-chdir", "config",
            "env-file", "missing-env-file", "unknown-probe", "probe-without-tcp", "hook-syntax", "hook-program",
            "exec-probe", "fd-template", "user", "pidfile"]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", MISTAKES)
def test_each_class_of_mistake_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    args, needle = _mistakes(tmp_path)[case]
    listener = [] if "-l" in args else ["-l", f"127.0.0.1:{free_port()}"]
    base = [*listener, "--control", str(tmp_path / "c.sock")]
    done = check(*base, *args)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and done.stdout == "", done
    assert len(lines) == 1 and lines[0].startswith("supervise check: ") and needle in lines[0], done.stderr


@pytest.mark.timeout(20)
def test_every_problem_is_reported_not_only_the_first(tmp_path: Path) -> None:
    (tmp_path / "bad.env").write_text("OK=1\nNO VALUE\n")
    done = check("-l", "127.0.0.1:99999", "-l", f"web=127.0.0.1:{free_port()}", "--watch", "soon",
                 "--env-file", str(tmp_path / "bad.env"), "--post-upgrade", "no-such-hook", "--",
                 "/bin/sleep", "{fd:web}", "{fd:nope}")
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    expected = ["invalid --listen '127.0.0.1:99999'", "option --watch", "bad.env line 2: expected KEY=VALUE",
                "names listener 'nope'; known: web", "no-such-hook: command not found"]
    assert len(lines) == len(expected) and all(needle in line for needle, line in zip(expected, lines)), done.stderr

    config = tmp_path / "app.toml"
    config.write_text('command = ["/bin/true"]\nwatch = "soon"\nprocesses = 0\ncolour = 1\n')
    done = check("--config", str(config))
    assert done.returncode == 2
    assert [line.split(": ", 2)[2] for line in done.stderr.splitlines()] == [
        "key 'watch': expected a duration from 0s to 24h (like 250ms, 5s, 2m), got \"soon\"",
        "key 'processes': expected an integer from 1 to 1024, got 0",
        "unknown key 'colour' (see the options in supervise --help)"]
