"""The words of a dry run (`ctl upgrade --dry-run`): a Preview (preview.py) as the steps an upgrade would take."""

from __future__ import annotations

from typing import Any

from ..config import Settings
from ..counted import counted, inflected
from ..preview import Preview
from ..strategy import Strategy, drain_count


def plan(preview: Preview) -> dict[str, Any]:
    """What an upgrade would do now, step by step, as JSON-ready data."""
    if preview.error is not None:
        step = f"roll back at once: exec failed: {preview.error}" if preview.exec_failed else f"refuse: {preview.error}"
        return {"error": preview.error, "steps": [step]}
    plan, identity = preview.plan, preview.identity
    assert plan is not None and identity is not None
    settings, release, processes, number = plan.settings, plan.release, plan.processes, preview.number
    hooks, strategy, old = settings.hooks, settings.strategy, preview.old
    probe_text = plan.probe.spec.text
    steps = [f"refuse: {preview.refusal}"] if preview.refusal else []
    if hooks.pre_upgrade:
        steps.append(f"run pre-upgrade hook (up to {hooks.timeout:g}s), refuse the upgrade if it fails: {hooks.pre_upgrade}")
    steps.extend(f"bind new listener {spec.name} on {spec}" for spec in plan.unbound)
    steps.extend(f"stop passing listener {name} ({address}); close it once unused" for name, address in preview.closing)
    if preview.surge:
        steps.append(f"{preview.surge}: batches could not be rolled back to it, so all instances start at once (surge)")
        strategy = Strategy(success_percent=strategy.success_percent)
    batches = _batches(strategy, processes, list(preview.old_order))
    many = f", {counted(processes, 'instance')}" if processes > 1 else ""
    names = [listener.name for listener in plan.listeners] + [spec.name for spec in plan.unbound]
    steps.append(f"start generation {number}: {release.describe(names)} (in {release.cwd}){many}")
    steps.extend(_cutover(preview, settings, number, old))
    ready = (f"wait up to {settings.ready_timeout:g}s for readiness: {probe_text}, answered by generation {number}'s "
             f"own processes; polls from 10ms to {settings.health_interval:g}s")
    watch = (f"watch {settings.watch:g}s beside generation {old if old else '-'}: health check every "
             f"{settings.health_interval:g}s, roll back after {counted(settings.health_threshold, 'failure')} in a row"
             if settings.watch > 0 else "")
    drain = f"{settings.drain_signal.name}, SIGKILL its tree after {settings.drain_timeout:g}s"
    if len(batches) == 1:
        steps.append(ready + (f" (all {processes}; {strategy.required(processes)} must pass)" if processes > 1 else ""))
        steps.extend([watch] if watch else [])
        steps.extend([f"drain generation {old}: {drain}"] if old is not None else [])
    else:
        for batch in batches:
            last = batch["batch"] == len(batches)
            then = (f"promote generation {number} and drain the rest of generation {old if old else '-'}" if last
                    else f"drain generation {old if old else '-'} {inflected('instance', len(batch['drain']))} "
                         f"{_listed(batch['drain'])} ({drain})")
            steps.append(f"batch {batch['batch']} of {len(batches)}: start "
                         f"{inflected('instance', len(batch['start']))} {_listed(batch['start'])}, wait "
                         f"until {batch['required']} of {len(batch['start'])} are ready (up to {settings.ready_timeout:g}s)"
                         + (f", watch {settings.watch:g}s" if settings.watch > 0 else "") + f", then {then}")
        steps.append(f"on failure: drain the new instances of the failed batch, start as many generation "
                     f"{old if old else '-'} instances as the finished batches replaced, each ready before a "
                     "new one is drained")
    if hooks.post_upgrade:
        steps.append(f"run post-upgrade hook: {hooks.post_upgrade}")
    return {"command": list(release.argv), "executable": release.executable, "cwd": release.cwd,
            "fingerprint": identity.digest, "release": identity.as_dict(), "known_bad": preview.known_bad,
            "probe": probe_text, "processes": processes,
            "cutover": "steered" if preview.steered else "shared", "shared_listeners": dict(preview.shared),
            "strategy": strategy.describe(processes), "batches": batches,
            "timeouts": {"ready": settings.ready_timeout, "probe": settings.probe_timeout, "watch": settings.watch,
                         "drain": settings.drain_timeout, "hook": hooks.timeout},
            "hooks": {"pre_upgrade": hooks.pre_upgrade, "post_upgrade": hooks.post_upgrade, "on_rollback": hooks.on_rollback},
            "steps": steps}


def _cutover(preview: Preview, settings: Settings, number: int, old: int | None) -> list[str]:
    """How new connections move from the old generation to the new one."""
    shared = "; ".join(f"listener {name} is shared by every generation ({why})" for name, why in preview.shared)
    if not preview.steered:
        return [f"cutover shared: {shared}" if shared else "cutover shared: every generation accepts from one socket"]
    ramp = f", its share growing from 0 over {settings.ramp:g}s" if settings.ramp > 0 else ""
    return [f"cutover steered: generation {number} gets its own socket and no user connection until it is ready "
            f"(probes reach it by their source port); then new connections go to it{ramp}, and generation "
            f"{old if old else '-'} gets none but keeps running (undrained at once if generation {number} fails), "
            f"and is signalled once its socket has had no connection waiting for {settings.drain_delay:g}s"
            + (f"; {shared}" if shared else "")]


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
