"""What `ctl status` shows: a snapshot (snapshot.py) as JSON-ready data."""

from __future__ import annotations

from typing import Any

from ..snapshot import GenerationView, InstanceView, Snapshot


def status(snapshot: Snapshot) -> dict[str, Any]:
    """Everything `supervise ctl status` shows."""
    now, supervisor, rollout, serving = snapshot.taken_at, snapshot.supervisor, snapshot.rollout, snapshot.serving
    return {
        "supervisor": {"pid": supervisor.pid, "name": supervisor.name, "version": supervisor.version,
                       "uptime": _age(now, supervisor.started_at), "started_at": supervisor.started_wall,
                       "reexecs": list(supervisor.reexecs),
                       "state": supervisor.state, "control": supervisor.control, "restarts": snapshot.tally.restarts,
                       "orphans_reaped": supervisor.orphans_reaped, "processes": supervisor.processes,
                       "strategy": supervisor.strategy, "cutover": supervisor.cutover,
                       "unsteered": dict(supervisor.unsteered),
                       "ready_instances": sum(len(generation.ready()) for generation in snapshot.generations),
                       "operation": supervisor.operation, "release": serving.release if serving else None},
        "listeners": [{"name": listener.name, "address": listener.address, "kind": listener.kind,
                       "adopted": listener.adopted, "fd": listener.fd} for listener in snapshot.listeners],
        "generations": [_generation(now, generation) for generation in snapshot.generations],
        "rollout": None if rollout is None else {
            "state": rollout.state, "trigger": rollout.trigger, "elapsed": _age(now, rollout.began),
            "new_gen": rollout.new_gen, "old_gen": rollout.old_gen, "batches": list(rollout.batches),
            "replaced": rollout.replaced},
        "history": list(snapshot.history),
        "last_known_good": snapshot.last_known_good,
        "last_known_bad": snapshot.last_known_bad,
        "state_error": snapshot.state_error,
        "workers": list(snapshot.workers),
    }


def _generation(now: float, generation: GenerationView) -> dict[str, Any]:
    instances = [_instance(now, instance) for instance in generation.instances]
    return {"number": generation.number, "state": generation.state, "serving": generation.serving,
            "pid": generation.leader, "pids": list(generation.pids), "age": _age(now, generation.started_at),
            "rss": sum(item["rss"] for item in instances),
            "cpu_percent": round(sum(item["cpu_percent"] for item in instances), 1),
            "ready": generation.ready_at is not None, "ready_instances": len(generation.ready()),
            "ready_after": _since(generation.started_at, generation.ready_at),
            "status": "; ".join(dict.fromkeys(item["status"] for item in instances if item["status"])),
            "watchdog_age": _age(now, generation.last_watchdog),
            "instances": instances,
            "argv": list(generation.argv), "executable": generation.executable,
            "cwd": generation.cwd, "release": generation.release,
            "traffic": None if generation.traffic is None else {
                "state": generation.traffic.state, "share": generation.traffic.share,
                "queued": dict(generation.traffic.queued)}}


def _instance(now: float, instance: InstanceView) -> dict[str, Any]:
    return {"index": instance.index, "state": instance.state, "pid": instance.leader, "pids": list(instance.pids),
            "ready": instance.ready, "alive": instance.alive, "age": _age(now, instance.started_at),
            "rss": sum(process.rss for process in instance.processes),
            "cpu_percent": round(sum(process.cpu_percent for process in instance.processes), 1),
            "ready_after": _since(instance.started_at, instance.ready_at), "status": instance.status,
            "unhealthy": instance.sick, "watchdog_age": _age(now, instance.last_watchdog)}


def _age(now: float, then: float | None) -> float | None:
    """Seconds from `then` to `now`, for people (ms); None for what never happened."""
    return round(now - then, 3) if then is not None else None


def _since(start: float, then: float | None) -> float | None:
    return _age(then, start) if then is not None else None
