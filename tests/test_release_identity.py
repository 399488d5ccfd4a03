"""Release identity under real deploys: a settings file or a module edited in place, a `current` link flipped, a
version file, a working directory too big to walk. A release that failed is refused again only when nothing it
is told by has changed; a fix deployed in place is a new release; the serving release is never known bad."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import PYTHON, STUB, Supervise, assert_lossless, free_port, http_get, start_load, write_release

QUICK = ("--ready", "http/readyz", "--ready-timeout", "5s", "--watch", "1s", "--health-interval", "200ms",
         "--drain-timeout", "5s")
# A release whose settings live in a file beside it, as most small services do.
SETTINGS_APP = f"""import json, os, sys
flags = json.load(open(os.environ.get("FLAGS_FILE", "settings.json")))
os.execv(sys.executable, [sys.executable, {STUB!r}, *flags])
"""
WSGI_APP = """import os
{broken}
def app(environ, start_response):
    body = ("ok {tag} gen=" + os.environ.get("SUPERVISE_GENERATION", "?") + "\\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def write(path: Path, text: str) -> None:
    """Replace a file the way a deploy tool does: write beside it, rename over it."""
    staged = path.with_name(f".{path.name}.new")
    staged.write_text(text)
    os.replace(staged, path)


def flags(path: Path, *values: str) -> None:
    write(path, json.dumps(list(values)))


def tag(port: int) -> str:
    code, body = http_get(port, "/")
    assert code == 200, body
    return body.split()[1]


@pytest.fixture
def supervisors() -> Iterator[list[Supervise]]:
    started: list[Supervise] = []
    yield started
    for supervise in started:
        supervise.stop()


def start(supervisors: list[Supervise], cwd: Path, *command: str, options: tuple[str, ...] = ()) -> tuple[Supervise, int]:
    port = free_port()
    supervise = Supervise(["-l", f"127.0.0.1:{port}", *QUICK, *options, "--", *command], cwd=str(cwd)).start()
    supervisors.append(supervise)
    supervise.wait_for("serving")
    return supervise, port


def spawned_since(supervise: Supervise, mark: int) -> list[dict]:
    return [event for event in supervise.events[mark:] if event["event"] == "spawned"]


@pytest.mark.timeout(90)
def test_a_fixed_settings_file_deployed_in_place_is_promoted_after_a_crashed_one(
        tmp_path: Path, supervisors: list[Supervise]) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text(SETTINGS_APP)
    flags(app / "settings.json", "--tag", "v1")
    supervise, port = start(supervisors, app, PYTHON, "app.py")
    load = start_load(port)
    try:
        flags(app / "settings.json", "--tag", "broken", "--exit-at-start", "3")
        crashed = supervise.ctl("upgrade")
        assert crashed.returncode == 1 and "rolled back" in crashed.stdout, crashed.stdout
        assert "marked known bad" in crashed.stdout, crashed.stdout

        mark = supervise.mark()
        again = supervise.ctl("upgrade")
        assert again.returncode == 1 and "refused: release" in again.stdout and "known bad" in again.stdout, again.stdout
        assert not spawned_since(supervise, mark)

        flags(app / "settings.json", "--tag", "v2")
        fixed = supervise.ctl("upgrade")
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    finally:
        stats = load.stop()
    assert_lossless(stats)
    assert tag(port) == "v2"
    status = json.loads(supervise.ctl("status", "--json").stdout)
    serving = status["supervisor"]["release"]["digest"]
    assert serving == status["last_known_good"]["digest"] != status["last_known_bad"]["digest"]
    assert "metadata of" in status["supervisor"]["release"]["covers"]


def gunicorn_runnable() -> bool:
    if importlib.util.find_spec("gunicorn") is None:
        return False
    version = tuple(int(part) for part in re.findall(r"\d+", importlib.metadata.version("gunicorn"))[:2])
    return version >= (25, 1)  # --no-control-socket


@pytest.mark.timeout(120)
@pytest.mark.skipif(not gunicorn_runnable(), reason="needs gunicorn >= 25.1 (pip install '.[test]')")
def test_gunicorn_module_edited_in_place_after_a_broken_edit_is_promoted(tmp_path: Path,
                                                                        supervisors: list[Supervise]) -> None:
    app = tmp_path / "site"
    app.mkdir()
    write(app / "wsgi.py", WSGI_APP.format(broken="", tag="v1"))
    # --preload: the master imports the app before forking, so a worker (re)started later never imports a newer
    # wsgi.py than its generation was proven ready with — without it, an edit in place reaches the old generation.
    supervise, port = start(supervisors, app, PYTHON, "-m", "gunicorn", "--no-control-socket", "--preload", "-w", "2",
                            "wsgi:app")
    load = start_load(port)
    try:
        write(app / "wsgi.py", WSGI_APP.format(broken="raise RuntimeError('a broken deploy')", tag="broken"))
        broken = supervise.ctl("upgrade")
        assert broken.returncode == 1 and "rolled back" in broken.stdout, broken.stdout
        assert "marked known bad" in broken.stdout, broken.stdout
        assert supervise.ctl("upgrade").returncode == 1  # the same broken module: refused

        write(app / "wsgi.py", WSGI_APP.format(broken="", tag="v2"))
        fixed = supervise.ctl("upgrade")
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    finally:
        stats = load.stop()
    assert_lossless(stats)
    assert tag(port) == "v2"


@pytest.mark.timeout(90)
def test_a_current_link_flipped_to_a_fixed_release_is_promoted(tmp_path: Path, supervisors: list[Supervise]) -> None:
    for name, release_flags in (("v1", ("--tag", "v1")), ("v2", ("--tag", "v2", "--exit-at-start", "3")),
                                ("v3", ("--tag", "v3"))):
        write_release(tmp_path / "releases" / name, *release_flags)
    current = tmp_path / "current"

    def flip(name: str) -> None:
        staged = tmp_path / "current.new"
        staged.symlink_to(tmp_path / "releases" / name)
        os.replace(staged, current)

    flip("v1")
    supervise, port = start(supervisors, tmp_path, "./run", options=("--chdir", str(current)))
    load = start_load(port)
    try:
        flip("v2")
        assert supervise.ctl("upgrade").returncode == 1
        flip("v3")
        fixed = supervise.ctl("upgrade")
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    finally:
        stats = load.stop()
    assert_lossless(stats)
    assert tag(port) == "v3"


@pytest.mark.timeout(90)
def test_a_failure_that_cannot_be_told_from_the_serving_release_never_marks_it_bad(
        tmp_path: Path, supervisors: list[Supervise]) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text(SETTINGS_APP)
    outside = tmp_path / "flags.json"  # what breaks it lies outside everything its identity covers
    flags(outside, "--tag", "v1")
    supervise, port = start(supervisors, app, PYTHON, "app.py", options=("--env", f"FLAGS_FILE={outside}"))
    flags(outside, "--tag", "broken", "--exit-at-start", "3")
    for _ in range(2):  # not refused the second time: nothing was pinned on the release
        mark = supervise.mark()
        failed = supervise.ctl("upgrade")
        assert failed.returncode == 1 and "rolled back" in failed.stdout, failed.stdout
        assert "not marked known bad" in failed.stdout and "cannot be pinned" in failed.stdout, failed.stdout
        assert spawned_since(supervise, mark)
        assert supervise.wait_for("release-not-blamed", after=mark)
    status = json.loads(supervise.ctl("status", "--json").stdout)
    assert status["last_known_bad"] is None
    assert "cannot be pinned" in status["history"][-1]["blame"]
    flags(outside, "--tag", "v2")
    assert supervise.ctl("upgrade").returncode == 0
    assert tag(port) == "v2"


@pytest.mark.timeout(90)
def test_a_version_file_names_the_release_and_a_new_version_is_a_new_release(
        tmp_path: Path, supervisors: list[Supervise]) -> None:
    release = tmp_path / "release"
    write_release(release, "--tag", "v1")
    write(release / "VERSION", "1.0\n")
    hooked = tmp_path / "hook.out"
    supervise, port = start(supervisors, release, "./run", options=(
        "--version-file", "VERSION", "--post-upgrade",
        f'echo "$SUPERVISE_OLD_VERSION>$SUPERVISE_NEW_VERSION $SUPERVISE_NEW_RELEASE" > {hooked}'))
    write_release(release, "--tag", "v2", "--exit-at-start", "3")
    write(release / "VERSION", "2.0\n")
    broken = supervise.ctl("upgrade")
    assert broken.returncode == 1 and "release 2.0 marked known bad" in broken.stdout, broken.stdout

    refused = supervise.ctl("upgrade")
    assert refused.returncode == 1 and "release 2.0" in refused.stdout and "known bad" in refused.stdout, refused.stdout
    assert "version file VERSION" in refused.stdout, refused.stdout
    mark = supervise.mark()
    forced = supervise.ctl("upgrade", "--force")
    assert forced.returncode == 1 and "rolled back" in forced.stdout and spawned_since(supervise, mark), forced.stdout

    write(release / "VERSION", "2.0.1\n")  # the same files, a new version: a new release, tried again
    mark = supervise.mark()
    retried = supervise.ctl("upgrade")
    assert retried.returncode == 1 and "rolled back" in retried.stdout and spawned_since(supervise, mark), retried.stdout

    write_release(release, "--tag", "v3")
    write(release / "VERSION", "3.0\n")
    assert supervise.ctl("upgrade").returncode == 0
    assert tag(port) == "v3"
    assert supervise.wait_for("hook", where=lambda event: event["hook"] == "post-upgrade")
    assert hooked.read_text().split() == ["1.0>3.0", "3.0"]
    promoted = supervise.of_kind("promoted")[-1]
    assert promoted["version"] == "3.0" and promoted["release"] == "3.0"

    status = supervise.ctl("status")
    assert re.search(r"^release +3\.0 .*\(version file VERSION\)$", status.stdout, re.M), status.stdout
    assert re.search(r"^last known bad +2\.0\.1 ", status.stdout, re.M), status.stdout
    metrics = supervise.ctl("metrics").stdout
    assert re.search(r'^supervise_release_info\{.*version="3\.0".*\} 1\.0$', metrics, re.M), metrics


@pytest.mark.timeout(120)
def test_a_working_directory_too_big_to_walk_is_unknown_and_never_refused(
        tmp_path: Path, supervisors: list[Supervise]) -> None:
    release = tmp_path / "big"
    write_release(release, "--tag", "v1")
    data = release / "data"
    data.mkdir()
    for number in range(20_001):  # one more than the walk's bound
        os.close(os.open(data / f"{number}", os.O_CREAT | os.O_WRONLY, 0o644))
    supervise, port = start(supervisors, release, "./run")
    write_release(release, "--tag", "broken", "--exit-at-start", "3")
    for _ in range(2):
        mark = supervise.mark()
        failed = supervise.ctl("upgrade")
        assert failed.returncode == 1 and "rolled back" in failed.stdout, failed.stdout
        assert "not marked known bad" in failed.stdout and "unknown" in failed.stdout, failed.stdout
        assert spawned_since(supervise, mark)
    status = json.loads(supervise.ctl("status", "--json").stdout)
    assert status["supervisor"]["release"]["known"] is False
    assert status["supervisor"]["release"]["covers"].startswith("unknown: ")
    assert status["last_known_bad"] is None
