"""Release identity without a supervisor: what it covers, what it ignores, its bound, and when a failure is blamed."""

from __future__ import annotations

import io
import os
from pathlib import Path

import anyio

from supervisor.events import Events
from supervisor.history import History
from supervisor.identity import Bounds, Identity, content_files, identify
from supervisor.release import Release
from supervisor.release_book import ReleaseBook


def release(cwd: Path, *argv: str, version_file: str | None = None) -> Release:
    executable = str(cwd / "run")
    if not os.path.exists(executable):
        Path(executable).write_text("#!/bin/sh\n")
    return Release(argv or (executable,), executable, str(cwd), str(cwd), version_file=version_file)


def test_modules_named_as_module_attr_or_after_dash_m_are_hashed(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("app = 1\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "main.py").write_text("create = 1\n")
    (tmp_path / "worker.py").write_text("")
    subject = release(tmp_path, "gunicorn", "app:app", "pkg.main:create()", "--bind", "127.0.0.1:8000", "-m", "worker")
    assert list(content_files(subject)) == [str(tmp_path / "run"), str(tmp_path / "app.py"),
                                            str(tmp_path / "pkg" / "main.py"), str(tmp_path / "worker.py")]


def test_an_edit_in_place_changes_the_identity_and_nothing_else_does(tmp_path: Path) -> None:
    settings = tmp_path / "conf" / "settings.json"
    settings.parent.mkdir()
    settings.write_text("{}")
    subject = release(tmp_path, "python", "app.py")
    first = identify(subject)
    assert first.known and first == identify(subject)
    (tmp_path / "__pycache__").mkdir()  # caches and tooling come and go with no deploy
    (tmp_path / "__pycache__" / "app.cpython-311.pyc").write_text("x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    assert identify(subject).digest == first.digest
    settings.write_text('{"broken": true}')
    assert identify(subject).digest != first.digest


def test_a_virtualenv_counts_by_what_is_installed_not_by_every_file(tmp_path: Path) -> None:
    site = tmp_path / ".venv" / "lib" / "python3.11" / "site-packages"
    (site / "lib_a").mkdir(parents=True)
    (tmp_path / ".venv" / "pyvenv.cfg").write_text("home = /usr\n")
    (site / "lib_a" / "module.py").write_text("")
    (site / "lib_a-1.0.dist-info").mkdir()
    subject = release(tmp_path, "python", "app.py")
    first = identify(subject)
    (site / "lib_a" / "module.py").write_text("rewritten below the top level")
    assert identify(subject).digest == first.digest
    (site / "lib_a-1.0.dist-info").rename(site / "lib_a-1.1.dist-info")
    assert identify(subject).digest != first.digest


def test_past_the_bound_the_identity_is_unknown_and_never_known_bad(tmp_path: Path) -> None:
    for number in range(60):
        (tmp_path / f"file{number}").write_text("")
    subject = release(tmp_path, "python", "app.py")
    unknown = identify(subject, Bounds(entries=50))
    assert not unknown.known and unknown.covers.startswith("unknown: more than 50 entries")
    history = History()
    bad, blame = history.blame(unknown, serving=None)
    assert bad is None and "not marked known bad" in blame
    history.last_known_bad = unknown.as_dict()  # even if a file says so, an unknown identity is not refused
    assert not history.is_known_bad(unknown)


def test_a_version_file_is_the_name_and_a_new_version_a_new_identity(tmp_path: Path) -> None:
    (tmp_path / "VERSION").write_text("1.4.2\nbuilt by ci\n")
    subject = release(tmp_path, "python", "app.py", version_file="VERSION")
    first = identify(subject)
    assert (first.version, first.name, first.covers) == ("1.4.2", "1.4.2", "version file VERSION")
    (tmp_path / "unrelated.log").write_text("the walk is not what names it")
    assert identify(subject).digest == first.digest
    (tmp_path / "VERSION").write_text("1.4.3\n")
    assert identify(subject).digest != first.digest
    (tmp_path / "VERSION").unlink()
    fallback = identify(subject)
    assert fallback.version is None and "version file VERSION: No such file" in fallback.covers and fallback.known


def test_a_failure_is_pinned_only_on_a_release_that_can_be_told_apart(tmp_path: Path) -> None:
    def identity(digest: str) -> Identity:
        return Identity(digest, digest, "/bin/app", ("app",), str(tmp_path), covers="2 file(s) hashed")

    history = History()
    history.good(identity("good"))
    assert history.blame(identity("good"), serving=identity("serving"))[0] is None  # the last known good
    assert history.blame(identity("serving"), serving=identity("serving"))[0] is None
    bad, blame = history.blame(identity("new"), serving=identity("serving"))
    assert bad == identity("new") and "marked known bad" in blame and "not" not in blame
    history.last_known_bad = identity("serving").as_dict()
    history.good(identity("serving"))  # promoted: it is no longer known bad
    assert history.last_known_bad is None


def test_the_event_loop_keeps_running_while_a_release_is_identified(tmp_path: Path) -> None:
    """A release's files are hashed off the event loop: a 64 MiB executable (a Go binary, a bundled app) takes a
    tenth of a second or more to hash, and the loop ticks all the while. Hashed on the loop, it would tick 0 times."""
    executable = tmp_path / "server"
    with open(executable, "wb") as handle:
        handle.truncate(64 << 20)  # sparse: no disk is written, every byte still read and hashed
    subject = Release((str(executable),), str(executable), str(tmp_path), str(tmp_path))
    book = ReleaseBook(History(), Events(log_level="error", stream=io.StringIO()))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.001)
            ticks += 1

    async def identify_beside_ticks() -> Identity:
        async with anyio.create_task_group() as group:
            group.start_soon(tick)
            identity = await book.identify(subject)
            group.cancel_scope.cancel()
        return identity

    identity = anyio.run(identify_beside_ticks)
    assert identity.known and identity == identify(subject)
    assert ticks >= 5, f"the event loop ran {ticks} times while the release was hashed"
