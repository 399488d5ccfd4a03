"""Test-session set-up shared by every test module."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator

import pytest

from harness import Supervise

# A test run started in the background by a non-interactive shell (as CI may be) ignores SIGINT and SIGQUIT,
# and every process the tests start would inherit that: tests that send Ctrl-C to a child would then test
# nothing. Give the session (and so its children) the dispositions of a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def pytest_configure(config: pytest.Config) -> None:
    """Every supervisor the tests start (and every `ctl` without --control) keeps its runtime files in a directory
    of this test session: never in the machine's /run/supervise or the user's real $XDG_RUNTIME_DIR."""
    directory = tempfile.mkdtemp(prefix="supervise-xdg-")
    os.chmod(directory, 0o711)  # as /run is: children running as another user (--user) reach their notify socket
    os.environ["XDG_RUNTIME_DIR"] = directory
    config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
    config.add_cleanup(_remove_abandoned_cgroups)


@pytest.fixture
def running() -> Iterator[list[Supervise]]:
    """The supervisors a test started, each stopped (with everything it started) after the test."""
    started: list[Supervise] = []
    yield started
    for supervise in started:
        supervise.stop()


# The fast layer: logic on a virtual clock or on plain data, no process started. Every other module proves what
# only real processes, sockets and signals can and is marked `real`: `pytest -m "not real"` runs this layer alone.
FAST = {"test_desired", "test_dry_run", "test_envfile", "test_event_kinds", "test_exit_watch", "test_identity",
        "test_output_lines", "test_parsers", "test_readiness", "test_restart_budget", "test_rollout_paths",
        "test_snapshot", "test_sock_diag", "test_start_priorities", "test_states", "test_status_render", "test_steering",
        "test_steering_paths", "test_traffic"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] not in FAST:
            item.add_marker(pytest.mark.real)


def _remove_abandoned_cgroups() -> None:
    """Tests that SIGKILL a supervisor leave its (empty) cgroup directory for the next one of that name: remove
    those whose supervisor is gone and that hold no process, so the suite leaves nothing in the machine's cgroups."""
    from supervisor import cgroups

    base = cgroups.own_cgroup()
    if base is None or not cgroups.usable(base):
        return
    for entry in base.iterdir():
        if entry.name.startswith("supervise.") and not cgroups.populated(entry) and cgroups.is_dead_home(entry):
            cgroups.remove_tree(entry)
