"""What the control API shows: the supervisor's state as JSON-ready data, and the plan of a dry-run upgrade."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import psutil

from .. import __version__
from ..config import reread
from ..errors import UserError
from ..generation import Generation
from ..history import fingerprint
from ..release import logical_cwd, resolve
from ..spawn import SpawnError

if TYPE_CHECKING:
    from ..supervisor import Supervisor


def status(supervisor: Supervisor) -> dict[str, Any]:
    """Everything `supervise ctl status` shows, as JSON-ready data."""
    rollout = supervisor.rollout
    return {
        "supervisor": {"pid": os.getpid(), "name": supervisor.settings.name, "version": __version__,
                       "uptime": round(time.monotonic() - supervisor.started_at, 3), "started_at": supervisor.started_wall,
                       "state": "stopping" if supervisor.stopping else (rollout.state if rollout else "idle"),
                       "control": str(supervisor.settings.control_path), "restarts": supervisor.tally.restarts,
                       "orphans_reaped": supervisor.reaper.orphans_reaped},
        "listeners": [{"name": listener.name, "address": listener.address, "kind": listener.kind,
                       "adopted": listener.adopted, "fd": 3 + index} for index, listener in enumerate(supervisor.listeners)],
        "generations": [_generation_status(supervisor, generation) for generation in supervisor.generations],
        "rollout": None if rollout is None else {
            "state": rollout.state, "trigger": rollout.trigger, "elapsed": round(time.monotonic() - rollout.began, 3),
            "new_gen": rollout.new.number if rollout.new else None, "old_gen": rollout.old.number if rollout.old else None},
        "history": supervisor.history.as_dict()["records"],
        "last_known_good": supervisor.history.last_known_good,
        "last_known_bad": supervisor.history.last_known_bad,
        "state_error": supervisor.history.save_error,
        "workers": [worker.info() for worker in supervisor.workers],
    }

def _generation_status(supervisor: Supervisor, generation: Generation) -> dict[str, Any]:
    rss, cpu = 0, 0.0
    for process in generation.living():
        try:
            with process.oneshot():
                rss += process.memory_info().rss
                cpu += process.cpu_percent()
        except psutil.Error:
            continue
    ready_after = generation.ready_at - generation.started_at if generation.ready_at else None
    watchdog = round(time.monotonic() - generation.last_watchdog, 3) if generation.last_watchdog else None
    return {"number": generation.number, "state": generation.state, "serving": generation is supervisor.serving,
            "pid": generation.leader, "pids": generation.pids(), "age": round(time.monotonic() - generation.started_at, 3),
            "rss": rss, "cpu_percent": round(cpu, 1), "ready": generation.ready_at is not None,
            "ready_after": round(ready_after, 3) if ready_after is not None else None, "status": generation.status_text,
            "watchdog_age": watchdog,
            "argv": list(generation.release.argv), "executable": generation.release.executable,
            "cwd": generation.release.cwd}

def plan(supervisor: Supervisor, force: bool) -> dict[str, Any]:
    """What an upgrade would do now, step by step, without doing any of it (ctl upgrade --dry-run)."""
    number, old = supervisor.next_number, supervisor.serving
    try:
        settings = reread(supervisor.settings)
    except UserError as exc:
        return {"error": f"invalid config: {exc}", "steps": [f"refuse: invalid config: {exc}"]}
    try:
        logical = logical_cwd(settings.chdir) if settings.chdir else supervisor.release.logical_cwd
        release = resolve(settings.command, logical, settings.env, os.environ.get("PATH"))
    except (SpawnError, UserError) as exc:
        return {"error": str(exc), "steps": [f"roll back at once: exec failed: {exc}"]}
    print_ = fingerprint(release)
    known_bad = supervisor.history.is_known_bad(print_)
    hooks = settings.hooks
    steps = [] if not known_bad or force else [f"refuse: release {print_.digest} is known bad (pass --force)"]
    if hooks.pre_upgrade:
        steps.append(f"run pre-upgrade hook (up to {hooks.timeout:g}s), refuse the upgrade if it fails: {hooks.pre_upgrade}")
    held = {listener.spec for listener in supervisor.listeners}
    steps.extend(f"bind new listener {spec.name} on {spec}" for spec in settings.listen if spec not in held)
    steps.extend(f"stop passing listener {listener.name} ({listener.address}); close it once unused"
                 for listener in supervisor.listeners if listener.spec is not None and listener.spec not in settings.listen)
    steps.append(f"start generation {number}: {release.describe()} (in {release.cwd})")
    probe_text = settings.ready.text if settings.ready else supervisor.probe.spec.text
    steps.append(f"wait up to {settings.ready_timeout:g}s for readiness: {probe_text}, answered by "
                 f"generation {number}'s own processes; polls from 10ms to {settings.health_interval:g}s")
    if settings.watch > 0:
        steps.append(f"watch {settings.watch:g}s beside generation {old.number if old else '-'}: health check every "
                     f"{settings.health_interval:g}s, roll back after {settings.health_threshold} failures in a row")
    if old is not None:
        steps.append(f"drain generation {old.number}: {settings.drain_signal.name}, SIGKILL its tree after "
                     f"{settings.drain_timeout:g}s")
    if hooks.post_upgrade:
        steps.append(f"run post-upgrade hook: {hooks.post_upgrade}")
    return {"command": list(release.argv), "executable": release.executable, "cwd": release.cwd,
            "fingerprint": print_.digest, "known_bad": known_bad, "probe": probe_text,
            "timeouts": {"ready": settings.ready_timeout, "probe": settings.probe_timeout, "watch": settings.watch,
                         "drain": settings.drain_timeout, "hook": hooks.timeout},
            "hooks": {"pre_upgrade": hooks.pre_upgrade, "post_upgrade": hooks.post_upgrade, "on_rollback": hooks.on_rollback},
            "steps": steps}
