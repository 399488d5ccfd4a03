"""What `supervise ctl` prints: status, a dry run's plan, events and verdicts, rendered as text from the JSON
the supervisor sends. Whatever the server sends is rendered without a traceback: a part that cannot be read
says so and points to `--json`."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..counted import counted

HISTORY_SHOWN = 5  # rollouts listed by `status`


def human_duration(seconds: float | None) -> str:
    """3s, 2m10s, 1h02m, 2d03h; 350ms and 1.5s below ten seconds; '-' when unknown."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def clock(timestamp: str | float | None) -> str:
    """HH:MM:SS in local time, from an ISO-8601 string (the events' `ts`) or epoch seconds."""
    if timestamp is None:
        return "--:--:--"
    try:
        when = (datetime.fromtimestamp(timestamp) if isinstance(timestamp, (int, float))
                else datetime.fromisoformat(timestamp).astimezone())
    except (ValueError, OverflowError, OSError):
        return str(timestamp)
    return when.strftime("%H:%M:%S")


def describe_event(event: dict[str, Any]) -> str:
    """One readable line: `HH:MM:SS gen N message`, with the level when it is not plain info."""
    parts = [clock(event.get("ts"))]
    if event.get("gen") is not None:
        parts.append(f"gen {event['gen']}")
    level = event.get("level", "info")
    if level != "info":
        parts.append(f"{str(level).upper()}:")
    parts.append(str(event.get("msg") or event.get("event", "")))
    return " ".join(parts)


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns two spaces apart."""
    widths = [max([len(header), *(len(row[index]) for row in rows)]) for index, header in enumerate(headers)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]


def pid_list(pids: Any) -> str:
    return ",".join(map(str, pids)) if pids else "-"


def _mib(size: Any) -> str:
    return f"{size / (1 << 20):.1f}" if isinstance(size, (int, float)) else "-"


def _percent(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "-"


def _yes_no(value: Any) -> str:
    return "-" if value is None else "yes" if value else "no"


def _total(timings: Any) -> float | None:
    """A rollout's duration: its last phase's time since it began."""
    values = [value for value in (timings or {}).values() if isinstance(value, (int, float))]
    return max(values) if values else None


def _release(identity: Any) -> str:
    """A release as status shows it: its name (version, else digest), the command, and what its identity covers."""
    if not isinstance(identity, dict):
        return "-"
    covers = f"  ({identity['covers']})" if identity.get("covers") else ""
    return f"{_release_name(identity)}  {_command(identity)}{covers}"


def _release_name(identity: dict[str, Any]) -> str:
    return str(identity.get("version") or identity.get("digest", "?"))


def _command(identity: dict[str, Any]) -> str:
    argv = identity.get("argv")
    return " ".join(map(str, argv)) if isinstance(argv, list) and argv else str(identity.get("executable", "?"))


def status_lines(status: dict[str, Any]) -> list[str]:
    """The readable form of GET /status; a part holding something unexpected is said, the others still shown."""
    return [line for title, render in _STATUS_PARTS for line in _part(title, render, status)]


_UNEXPECTED = (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError)


def _part(title: str, render: Callable[[dict[str, Any]], list[str]], status: dict[str, Any]) -> list[str]:
    """One part of the status, rendered defensively: the answer may come from another version of the supervisor,
    or from a state file written by one, and a display must never end in a traceback."""
    try:
        return render(status)
    except _UNEXPECTED as exc:
        return ["", f"{title}: cannot be shown (unexpected data in the answer: {type(exc).__name__}: {exc}); "
                    "see `supervise ctl status --json`"]


def _process_lines(status: dict[str, Any]) -> list[str]:
    generations, rollout = status.get("generations") or [], status.get("rollout") or {}
    lines = ["", *table(["GEN", "STATE", "PIDS", "AGE", "RSS(MiB)", "CPU%", "READY", "TRAFFIC", "STATUS"],
                        [_generation_row(generation, rollout) for generation in generations])]
    if any(len(generation.get("instances") or []) > 1 for generation in generations):
        lines += ["", *table(["GEN", "#", "STATE", "PID", "AGE", "RSS(MiB)", "CPU%", "READY", "STATUS"],
                             [_instance_row(generation, instance) for generation in generations
                              for instance in generation.get("instances") or []])]
    return lines


def _header_lines(status: dict[str, Any]) -> list[str]:
    supervisor = status.get("supervisor") or {}
    lines = [
        f"supervisor  pid {supervisor.get('pid', '?')}  name {supervisor.get('name', '?')}  "
        f"version {supervisor.get('version', '?')}  up {human_duration(supervisor.get('uptime'))}  "
        f"state {supervisor.get('state', '?')}",
    ]
    if reexecs := supervisor.get("reexecs"):
        last = reexecs[-1]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if isinstance(last, float) else "?"
        lines.append(f"re-exec     {counted(len(reexecs), 'time')}, last at {when}")
    if (supervisor.get("processes") or 1) > 1:
        lines.append(f"instances   {supervisor.get('ready_instances', '?')} ready of {supervisor.get('processes')} wanted; "
                     f"upgrades: {supervisor.get('strategy', '?')}")
    unsteered = supervisor.get("unsteered") or {}
    for listener in status.get("listeners") or []:
        name = listener.get("name", "?")
        how = f"  (shared by every generation: {unsteered[name]})" if name in unsteered else ""
        lines.append(f"listening   {name} {listener.get('address', '?')}{how}")
    if supervisor.get("cutover"):
        lines.append(f"cutover     {supervisor['cutover']}")
    if supervisor.get("release"):
        lines.append(f"release     {_release(supervisor['release'])}")
    return lines


def _generation_row(generation: dict[str, Any], rollout: dict[str, Any]) -> list[str]:
    cells = _process_cells(generation)
    replacing = [f"instance {instance.get('index', '?')} being replaced: {instance['unhealthy']}"
                 for instance in generation.get("instances") or [] if instance.get("unhealthy")]
    if rollout.get("trigger") and rollout.get("old_gen") == generation.get("number"):
        replacing.insert(0, f"being replaced: {rollout['trigger']}")
    status = "; ".join(replacing + ([cells[-1]] if cells[-1] != "-" else [])) or "-"
    return [str(generation.get("number", "?")), str(generation.get("state", "?")), pid_list(generation.get("pids")),
            *cells[:-1], _traffic(generation.get("traffic")), status]


def _traffic(traffic: Any) -> str:
    """`active 100%`, `drained 0% (3 queued)`; `shared` when no listener of the generation is steered."""
    if not isinstance(traffic, dict):
        return "shared"
    queued = sum(value for value in (traffic.get("queued") or {}).values() if isinstance(value, int))
    return f"{traffic.get('state', '?')} {traffic.get('share', 0):.0%}" + (f" ({queued} queued)" if queued else "")


def _instance_row(generation: dict[str, Any], instance: dict[str, Any]) -> list[str]:
    cells = _process_cells(instance)
    if instance.get("unhealthy"):
        cells[-1] = f"being replaced: {instance['unhealthy']}"
    return [str(generation.get("number", "?")), str(instance.get("index", "?")), str(instance.get("state", "?")),
            str(instance.get("pid", "?")), *cells]


def _process_cells(item: dict[str, Any]) -> list[str]:
    """Age, memory, CPU, readiness and status: the columns a generation row and an instance row share."""
    return [human_duration(item.get("age")), _mib(item.get("rss")), _percent(item.get("cpu_percent")),
            _yes_no(item.get("ready")), str(item.get("status") or "-")]


def _rollout_lines(rollout: dict[str, Any] | None) -> list[str]:
    if not rollout:
        return []
    batches = rollout.get("batches") or []
    replaced = counted(rollout.get("replaced", 0), "old instance")
    progress = f", batch {len(batches)}, {replaced} replaced" if len(batches) > 1 else ""
    return ["", f"rollout     {rollout.get('state', '?')}: generation {rollout.get('new_gen', '?')} "
                f"replacing {rollout.get('old_gen') or 'none'}, for {human_duration(rollout.get('elapsed'))}{progress}"]


def _history_lines(status: dict[str, Any]) -> list[str]:
    records = (status.get("history") or [])[-HISTORY_SHOWN:]
    lines = []
    if records:
        rows = [[clock(record.get("started_at")), str(record.get("result", "?")),
                 f"{record.get('old_gen') or '-'}->{record.get('new_gen') or '-'}",
                 human_duration(_total(record.get("timings"))), str(record.get("reason") or "-")]
                for record in reversed(records)]
        lines += ["", *table(["WHEN", "RESULT", "GENS", "TOOK", "REASON"], rows)]
    return lines


def _release_lines(status: dict[str, Any]) -> list[str]:
    good, bad = status.get("last_known_good"), status.get("last_known_bad")
    lines = ["", *_release_pair(good, bad)]
    if status.get("state_error"):
        lines.append(f"WARNING: {status['state_error']}")
    return lines


def _release_pair(good: Any, bad: Any) -> list[str]:
    """Last known good and bad: each as `_release` shows it — or, when both run the same command, what tells them
    apart (version, release directory, environment, files) and the command once."""
    if not (isinstance(good, dict) and isinstance(bad, dict)) or _command(good) != _command(bad):
        return [f"last known good  {_release(good)}", f"last known bad   {_release(bad)}"]
    differs = [(label, key) for label, key in _TOLD_APART if good.get(key) != bad.get(key)] or [("digest", "digest")]
    return [*(f"last known {which}{_release_name(item)}  " + ", ".join(f"{label} {item.get(key) or '-'}"
                                                                       for label, key in differs)
              for which, item in (("good  ", good), ("bad   ", bad))),
            f"                 both run {_command(good)}"]


_TOLD_APART = (("version", "version"), ("release directory", "cwd"), ("env digest", "env"), ("files digest", "digest"))


def _worker_lines(workers: list[dict[str, Any]]) -> list[str]:
    if not workers:
        return []
    rows = [[str(worker.get("name", "?")), human_duration(worker.get("interval")), str(worker.get("runs", 0)),
             clock(worker.get("last_run")) if worker.get("last_run") else "never", str(worker.get("last_error") or "-")]
            for worker in workers]
    return ["", *table(["WORKER", "EVERY", "RUNS", "LAST RUN", "LAST ERROR"], rows)]


_STATUS_PARTS: tuple[tuple[str, Callable[[dict[str, Any]], list[str]]], ...] = (
    ("supervisor", _header_lines),
    ("generations", _process_lines),
    ("rollout", lambda status: _rollout_lines(status.get("rollout"))),
    ("history", _history_lines),
    ("releases", _release_lines),
    ("workers", lambda status: _worker_lines(status.get("workers") or [])),
)


def plan_lines(plan: dict[str, Any]) -> list[str]:
    """The readable form of an upgrade plan (POST /upgrade?dry_run=1)."""
    timeouts = ", ".join(f"{key} {_seconds(value)}" for key, value in (plan.get("timeouts") or {}).items())
    hooks = ", ".join(f"{key}: {value}" for key, value in (plan.get("hooks") or {}).items() if value) or "none"
    lines = ["upgrade plan (dry run: nothing was started)"]
    if plan.get("error"):
        return [*lines, f"  the release cannot be started: {plan['error']}", "steps:", *_numbered(plan.get("steps"))]
    lines += [
        f"  command      {' '.join(plan.get('command') or [])}",
        f"  executable   {plan.get('executable', '?')}",
        f"  cwd          {plan.get('cwd', '?')}",
        f"  release      {_release(plan.get('release'))}" + ("  (KNOWN BAD)" if plan.get("known_bad") else ""),
        f"  probe        {plan.get('probe', '?')}",
        f"  timeouts     {timeouts or '-'}",
        f"  hooks        {hooks}",
        f"  instances    {plan.get('processes', 1)}, {plan.get('strategy', 'surge')}",
        "steps:",
        *_numbered(plan.get("steps")),
    ]
    return lines


def _numbered(steps: list[str] | None) -> list[str]:
    return [f"  {number}. {step}" for number, step in enumerate(steps or [], start=1)]


def _seconds(value: Any) -> str:
    return human_duration(value) if isinstance(value, (int, float)) else str(value)


def verdict_line(verdict: dict[str, Any]) -> str:
    """`promoted generation N in 2.1s`, `rolled back: REASON`, `refused: REASON`."""
    result = verdict.get("result")
    if result == "promoted":
        took = _total(verdict.get("timings"))
        return f"promoted generation {verdict.get('new_gen', '?')}" + (f" in {human_duration(took)}" if took else "")
    label = "rolled back" if result == "rolled-back" else str(result)
    return f"{label}: {verdict.get('reason') or 'no reason given'}"
