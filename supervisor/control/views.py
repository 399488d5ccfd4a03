"""What the control API shows: the supervisor's state as JSON-ready data, and the plan of a dry-run upgrade."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import psutil

from .. import __version__
from ..config import invalid, reread
from ..errors import UserError
from ..generation import Generation
from ..identity import Identity
from ..instance import EXITED, Instance
from ..release import next_release
from ..spawn import SpawnError
from ..strategy import Strategy, drain_count

if TYPE_CHECKING:
    from ..supervisor import Supervisor


def status(supervisor: Supervisor) -> dict[str, Any]:
    """Everything `supervise ctl status` shows, as JSON-ready data."""
    rollout = supervisor.rollout
    return {
        "supervisor": {"pid": os.getpid(), "name": supervisor.fleet.settings.name, "version": __version__,
                       "uptime": round(time.monotonic() - supervisor.started_at, 3), "started_at": supervisor.started_wall,
                       "state": "stopping" if supervisor.fleet.stopping else (rollout.state if rollout else "idle"),
                       "control": str(supervisor.fleet.settings.control_path), "restarts": supervisor.tally.restarts,
                       "orphans_reaped": supervisor.reaper.orphans_reaped, "processes": supervisor.fleet.processes,
                       "strategy": supervisor.fleet.settings.strategy.describe(supervisor.fleet.processes),
                       "ready_instances": sum(len(generation.ready()) for generation in supervisor.fleet.generations),
                       "operation": supervisor.busy,
                       "release": _identity(supervisor.fleet.serving.identity) if supervisor.fleet.serving else None},
        "listeners": [{"name": listener.name, "address": listener.address, "kind": listener.kind,
                       "adopted": listener.adopted, "fd": 3 + index} for index, listener in enumerate(supervisor.fleet.listeners)],
        "generations": [_generation_status(supervisor, generation) for generation in supervisor.fleet.generations],
        "rollout": None if rollout is None else {
            "state": rollout.state, "trigger": rollout.trigger, "elapsed": round(time.monotonic() - rollout.began, 3),
            "new_gen": rollout.new.number if rollout.new else None, "old_gen": rollout.old.number if rollout.old else None,
            "batches": list(rollout.batches), "replaced": rollout.replaced},
        "history": supervisor.book.history.as_dict()["records"],
        "last_known_good": supervisor.book.history.last_known_good,
        "last_known_bad": supervisor.book.history.last_known_bad,
        "state_error": supervisor.book.history.save_error,
        "workers": [worker.info() for worker in supervisor.workers],
    }

def _generation_status(supervisor: Supervisor, generation: Generation) -> dict[str, Any]:
    instances = [_instance_status(instance) for instance in sorted(generation.instances, key=lambda item: item.index)]
    ready_after = generation.ready_at - generation.started_at if generation.ready_at else None
    watchdog = generation.last_watchdog
    return {"number": generation.number, "state": generation.state, "serving": generation is supervisor.fleet.serving,
            "pid": generation.leader, "pids": generation.pids(), "age": round(time.monotonic() - generation.started_at, 3),
            "rss": sum(item["rss"] for item in instances),
            "cpu_percent": round(sum(item["cpu_percent"] for item in instances), 1),
            "ready": generation.ready_at is not None, "ready_instances": len(generation.ready()),
            "ready_after": round(ready_after, 3) if ready_after is not None else None,
            "status": "; ".join(dict.fromkeys(item["status"] for item in instances if item["status"])),
            "watchdog_age": round(time.monotonic() - watchdog, 3) if watchdog else None,
            "instances": instances,
            "argv": list(generation.release.argv), "executable": generation.release.executable,
            "cwd": generation.release.cwd, "release": _identity(generation.identity)}


def _identity(identity: Identity | None) -> dict[str, Any] | None:
    return identity.as_dict() if identity else None


def _instance_status(instance: Instance) -> dict[str, Any]:
    rss, cpu = 0, 0.0
    for process in instance.living():
        try:
            with process.oneshot():
                rss += process.memory_info().rss
                cpu += process.cpu_percent()
        except psutil.Error:
            continue
    ready_after = instance.ready_at - instance.started_at if instance.ready_at else None
    return {"index": instance.index, "state": instance.state if instance.alive else EXITED, "pid": instance.leader,
            "pids": instance.pids(), "ready": instance.ready, "alive": instance.alive,
            "age": round(time.monotonic() - instance.started_at, 3), "rss": rss, "cpu_percent": round(cpu, 1),
            "ready_after": round(ready_after, 3) if ready_after is not None else None, "status": instance.status_text,
            "unhealthy": instance.sick,
            "watchdog_age": round(time.monotonic() - instance.last_watchdog, 3) if instance.last_watchdog else None}


async def plan(supervisor: Supervisor, force: bool) -> dict[str, Any]:
    """What an upgrade would do now, step by step, without doing any of it (ctl upgrade --dry-run)."""
    number, old = supervisor.fleet.next_number, supervisor.fleet.serving
    try:
        settings = reread(supervisor.fleet.settings)
    except UserError as exc:
        return {"error": invalid(exc), "steps": [f"refuse: {invalid(exc)}"]}
    try:
        release = next_release(settings, supervisor.fleet.release)
    except (SpawnError, UserError) as exc:
        return {"error": str(exc), "steps": [f"roll back at once: exec failed: {exc}"]}
    identity = await supervisor.fleet.identify(release, fresh=True)
    refusal = supervisor.fleet.refusal(release, identity, force)
    hooks = settings.hooks
    steps = [f"refuse: {refusal}"] if refusal else []
    if hooks.pre_upgrade:
        steps.append(f"run pre-upgrade hook (up to {hooks.timeout:g}s), refuse the upgrade if it fails: {hooks.pre_upgrade}")
    held = {listener.spec for listener in supervisor.fleet.listeners}
    steps.extend(f"bind new listener {spec.name} on {spec}" for spec in settings.listen if spec not in held)
    steps.extend(f"stop passing listener {listener.name} ({listener.address}); close it once unused"
                 for listener in supervisor.fleet.listeners if listener.spec is not None and listener.spec not in settings.listen)
    processes = supervisor.fleet.scaled or settings.processes
    strategy = settings.strategy
    probe_text = settings.ready.text if settings.ready else supervisor.fleet.probe.spec.text
    changed = await supervisor.fleet.changed_in_place(old) if old is not None and strategy.step(processes) < processes else None
    if changed:
        steps.append(f"{changed}: batches could not be rolled back to it, so all instances start at once (surge)")
        strategy = Strategy(success_percent=strategy.success_percent)
    batches = _batches(strategy, processes, [instance.index for instance in old.drain_order()] if old else [])
    many = f", {processes} instances" if processes > 1 else ""
    steps.append(f"start generation {number}: {release.describe()} (in {release.cwd}){many}")
    ready = (f"wait up to {settings.ready_timeout:g}s for readiness: {probe_text}, answered by generation {number}'s "
             f"own processes; polls from 10ms to {settings.health_interval:g}s")
    watch = (f"watch {settings.watch:g}s beside generation {old.number if old else '-'}: health check every "
             f"{settings.health_interval:g}s, roll back after {settings.health_threshold} failures in a row"
             if settings.watch > 0 else "")
    drain = f"{settings.drain_signal.name}, SIGKILL its tree after {settings.drain_timeout:g}s"
    if len(batches) == 1:
        steps.append(ready + (f" (all {processes}; {strategy.required(processes)} must pass)" if processes > 1 else ""))
        steps.extend([watch] if watch else [])
        steps.extend([f"drain generation {old.number}: {drain}"] if old is not None else [])
    else:
        for batch in batches:
            last = batch["batch"] == len(batches)
            then = (f"promote generation {number} and drain the rest of generation {old.number if old else '-'}" if last
                    else f"drain generation {old.number if old else '-'} instance(s) {_listed(batch['drain'])} ({drain})")
            steps.append(f"batch {batch['batch']} of {len(batches)}: start instance(s) {_listed(batch['start'])}, wait "
                         f"until {batch['required']} of {len(batch['start'])} are ready (up to {settings.ready_timeout:g}s)"
                         + (f", watch {settings.watch:g}s" if settings.watch > 0 else "") + f", then {then}")
        steps.append(f"on failure: drain the new instances of the failed batch, start as many generation "
                     f"{old.number if old else '-'} instances as the finished batches replaced, each ready before a "
                     "new one is drained")
    if hooks.post_upgrade:
        steps.append(f"run post-upgrade hook: {hooks.post_upgrade}")
    return {"command": list(release.argv), "executable": release.executable, "cwd": release.cwd,
            "fingerprint": identity.digest, "release": identity.as_dict(), "known_bad": supervisor.book.history.is_known_bad(identity),
            "probe": probe_text, "processes": processes,
            "strategy": strategy.describe(processes), "batches": batches,
            "timeouts": {"ready": settings.ready_timeout, "probe": settings.probe_timeout, "watch": settings.watch,
                         "drain": settings.drain_timeout, "hook": hooks.timeout},
            "hooks": {"pre_upgrade": hooks.pre_upgrade, "post_upgrade": hooks.post_upgrade, "on_rollback": hooks.on_rollback},
            "steps": steps}


def _batches(strategy: Strategy, processes: int, old: list[int]) -> list[dict[str, Any]]:
    """The batches of an upgrade in which every instance becomes ready at its first try; `old` is the old
    generation's instance indexes in the order they drain."""
    batches, start = [], 0
    sizes = strategy.batches(processes)
    for number, size in enumerate(sizes, start=1):
        indexes = list(range(start, start + size))
        start += size
        count = len(old) if number == len(sizes) else drain_count(size, start, len(old), processes)
        drain, old = old[:count], old[count:]
        batches.append({"batch": number, "start": indexes, "required": strategy.required(size), "drain": drain})
    return batches


def _listed(indexes: list[int]) -> str:
    if not indexes:
        return "none"
    if len(indexes) > 2 and indexes == list(range(indexes[0], indexes[-1] + 1)):
        return f"{indexes[0]}-{indexes[-1]}"
    return ",".join(map(str, indexes))
