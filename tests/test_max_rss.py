"""--max-rss: a serving instance whose process tree stays above the limit is replaced beside itself under load, with
no failed request — a generation of one through the upgrade path, one of several instances alone — and one that
stays below it is left alone. The leak is real: the stub server holds more resident memory every tenth of a second."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import PYTHON, STUB, Supervise, assert_lossless, free_port, pid_gone, start_load

LIMIT = "80M"
LEAK = ["--leak-per-second", "40"]  # MiB: a stub (~20 MiB) crosses 80 MiB within two seconds
LEAK_PER_REQUEST = ["--leak-per-request", "64"]  # KiB: past 80 MiB after ~1000 requests of the load on /
QUICK = ["--ready", "http/readyz", "--watch", "300ms", "--health-interval", "100ms", "--liveness-interval", "200ms",
         "--drain-timeout", "5s", "--max-rss", LIMIT]


def leaking_once(tmp_path: Path, instance: str = "", leak: list[str] = LEAK) -> Path:
    """A `run` script whose first process (of `instance`, or any) leaks; whatever replaces it does not."""
    once, script = tmp_path / "leaked-once", tmp_path / "run"
    which = f'[ "$SUPERVISE_INSTANCE" = "{instance}" ] && ' if instance else ""
    script.write_text(f"""#!/bin/sh
{which}[ ! -e {once} ] && touch {once} && exec {PYTHON} {STUB} --tag leaky {' '.join(leak)}
exec {PYTHON} {STUB} --tag fixed
""")
    script.chmod(0o755)
    return script


def replacements(sup: Supervise) -> dict[str, float]:
    """supervise_replacements_total by reason, from `ctl metrics`."""
    text = sup.ctl("metrics").stdout
    return {sample.labels["reason"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "supervise_replacements_total"}


def liveness_runs(sup: Supervise) -> int:
    """How many checks the liveness worker made so far, from `ctl status --json`."""
    workers = json.loads(sup.ctl("status", "--json").stdout)["workers"]
    return next(worker["runs"] for worker in workers if worker["name"] == "liveness")


@pytest.mark.timeout(60)
def test_a_leaking_generation_of_one_is_replaced_through_the_upgrade_path_without_a_failed_request(
        tmp_path: Path) -> None:
    port = free_port()
    sup = Supervise(["-l", f"127.0.0.1:{port}", *QUICK, "--", str(leaking_once(tmp_path))]).start()
    try:
        sup.wait_for("serving")
        load = start_load(port)
        try:
            limit = sup.wait_for("memory-limit", timeout=30)
            promoted = sup.wait_for("promoted", timeout=30)
            sup.wait_for("retired", where=lambda event: event["gen"] == 1, timeout=30)
        finally:
            stats = load.stop()
        assert limit["gen"] == 1 and limit["rss"] > limit["limit"] == 80 << 20, limit
        assert re.fullmatch(r"generation 1 held \d+ MiB for 3 checks in a row, above --max-rss 80 MiB: replacing it",
                            limit["msg"]), limit
        requested = sup.of_kind("upgrade-requested")[0]
        assert re.fullmatch(r"memory \d+ MiB > 80 MiB", requested["trigger"]), requested
        assert promoted["gen"] == 2 and promoted["old_gen"] == 1
        assert not sup.of_kind("restarting"), "replaced beside itself, never killed first"
        assert_lossless(stats)
        print(stats.summary())
        assert replacements(sup) == {"unhealthy": 0, "memory": 1}
    finally:
        sup.stop()


@pytest.mark.timeout(60)
def test_an_instance_leaking_per_request_is_replaced_alone_beside_its_siblings(tmp_path: Path) -> None:
    port, control = free_port(), tmp_path / "control.sock"
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--control", str(control), "-n", "2", *QUICK, "--",
                     str(leaking_once(tmp_path, instance="1", leak=LEAK_PER_REQUEST))]).start()
    try:
        sup.wait_for("serving")
        before = {event["instance"]: event["pids"][0] for event in sup.of_kind("spawned")}
        load = start_load(port)
        try:
            limit = sup.wait_for("memory-limit", timeout=30)
            replaced = sup.wait_for("ready", where=lambda event: event.get("instance") == 1
                                    and event["pids"][0] != before[1], timeout=30)
            sup.wait_for("instance-retired", where=lambda event: event.get("instance") == 1, timeout=30)
        finally:
            stats = load.stop()
        assert limit["instance"] == 1 and limit["reason"].startswith("memory "), limit
        assert limit["msg"].startswith("generation 1 instance 1 held "), limit
        assert_lossless(stats)
        print(stats.summary())
        assert not sup.of_kind("promoted"), "one instance is replaced, not the generation"
        assert pid_gone(before[1], 5)
        status = sup.ctl("status", "--json").stdout
        assert f'"pid": {before[0]}' in status and f'"pid": {replaced["pids"][0]}' in status
        assert replacements(sup)["memory"] == 1
    finally:
        sup.stop()


@pytest.mark.timeout(40)
def test_a_server_below_the_limit_is_never_replaced(tmp_path: Path) -> None:
    port = free_port()
    sup = Supervise(["-l", f"127.0.0.1:{port}", *QUICK, "--", PYTHON, STUB]).start()
    try:
        sup.wait_for("serving")
        load = start_load(port)
        try:
            deadline = time.monotonic() + 25
            while liveness_runs(sup) < 10 and time.monotonic() < deadline:  # well past --health-threshold checks
                time.sleep(0.2)
        finally:
            stats = load.stop()
        assert liveness_runs(sup) >= 10
        assert not sup.of_kind("memory-limit") and not sup.of_kind("upgrade-requested")
        assert_lossless(stats)
    finally:
        sup.stop()
