"""What `ctl status` prints, from the JSON a supervisor sends (control/render.py): why a generation or an instance
is being replaced shows in its STATUS column."""

from __future__ import annotations

from typing import Any

from supervisor.control.render import status_lines


def generation(number: int, *instances: dict[str, Any], status: str = "") -> dict[str, Any]:
    return {"number": number, "state": "serving", "pids": [100 + number], "age": 12.0, "rss": 1 << 20,
            "cpu_percent": 0.0, "ready": True, "status": status, "instances": list(instances)}


def instance(index: int, unhealthy: str | None = None) -> dict[str, Any]:
    return {"index": index, "state": "serving", "pid": 200 + index, "age": 3.0, "rss": 1 << 20, "cpu_percent": 0.0,
            "ready": True, "status": "", "unhealthy": unhealthy}


def rows(lines: list[str], *cells: str) -> list[str]:
    """The table rows whose first cells are `cells`."""
    return [line for line in lines if line.split()[:len(cells)] == list(cells)]


def test_a_generation_replaced_by_an_upgrade_says_why() -> None:
    lines = status_lines({"generations": [generation(1, instance(0)), generation(2, instance(0))],
                          "rollout": {"state": "watching", "trigger": "memory 612 MiB > 512 MiB", "old_gen": 1,
                                      "new_gen": 2, "elapsed": 1.0}})
    assert rows(lines, "1", "serving")[0].endswith("  being replaced: memory 612 MiB > 512 MiB")
    assert rows(lines, "2", "serving")[0].endswith("  -")


def test_an_instance_replaced_beside_its_siblings_says_why_in_both_rows() -> None:
    lines = status_lines({"generations": [generation(1, instance(0), instance(1, "memory 612 MiB > 512 MiB"),
                                                     status="warming")]})
    assert rows(lines, "1", "serving")[0].endswith("  instance 1 being replaced: memory 612 MiB > 512 MiB; warming")
    assert rows(lines, "1", "1", "serving")[0].endswith("  being replaced: memory 612 MiB > 512 MiB")
    assert rows(lines, "1", "0", "serving")[0].endswith("  -")


def release(version: str | None, cwd: str, env: str, digest: str) -> dict[str, Any]:
    return {"digest": digest, "version": version, "covers": "3 files hashed", "known": True,
            "executable": "/usr/bin/python3", "argv": ["python3", "app.py"], "cwd": cwd, "env": env}


def test_last_known_good_and_bad_of_the_same_command_show_what_tells_them_apart() -> None:
    lines = status_lines({"last_known_good": release("1.4", "/srv/app/releases/1.4", "aaa", "d1"),
                          "last_known_bad": release("1.5", "/srv/app/releases/1.5", "aaa", "d2")})
    assert rows(lines, "last", "known", "good") == [
        "last known good  1.4  version 1.4, release directory /srv/app/releases/1.4, files digest d1"]
    assert rows(lines, "last", "known", "bad") == [
        "last known bad   1.5  version 1.5, release directory /srv/app/releases/1.5, files digest d2"]
    assert "                 both run python3 app.py" in lines


def test_a_release_told_apart_by_its_environment_alone_says_so() -> None:
    lines = status_lines({"last_known_good": release(None, "/srv/app", "aaa", "d1"),
                          "last_known_bad": release(None, "/srv/app", "bbb", "d1")})
    assert rows(lines, "last", "known", "good") == ["last known good  d1  env digest aaa"]
    assert rows(lines, "last", "known", "bad") == ["last known bad   d1  env digest bbb"]


def test_releases_of_different_commands_are_shown_whole() -> None:
    other = {**release("1.5", "/srv/app", "aaa", "d2"), "argv": ["gunicorn", "app:app"]}
    lines = status_lines({"last_known_good": release("1.4", "/srv/app", "aaa", "d1"), "last_known_bad": other})
    assert rows(lines, "last", "known", "bad") == ["last known bad   1.5  gunicorn app:app  (3 files hashed)"]
    assert rows(lines, "last", "known", "good") == ["last known good  1.4  python3 app.py  (3 files hashed)"]
