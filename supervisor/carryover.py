"""What crosses a re-exec of the supervisor (reexec.py): everything held and known, as plain JSON data, with the
file descriptors that stay open across execve named by number.

One direction each: `dump` reads the live objects, `revive.py` builds them again from what `load` checked. Kept
out: what a re-exec is refused during (an upgrade, a scale, a stop: no rollout, no ticket, no probe in flight) and
what is computed again (settings, from the argv and config file as given; the history, from the state file).
Times are on CLOCK_MONOTONIC, which is the event loop's clock and the same in the new image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import psutil

from . import capture
from .fleet import Fleet
from .generation import Generation
from .identity import Identity
from .instance import Instance
from .listeners import Listener, ListenSpec
from .release import Release
from .restart_budget import RestartBudget
from .tally import Tally
from .traffic import Traffic

FORMAT = 1  # bumped when a field changes meaning: a new image refuses a state it cannot read (in the check)
MAX_BYTES = 16 << 20


class Unreadable(Exception):
    """The state file is not one this image can revive from: the check reports it and the re-exec is refused."""


def spec_data(spec: ListenSpec | None) -> dict[str, Any] | None:
    return asdict(spec) if spec is not None else None


def listener_data(listener: Listener) -> dict[str, Any]:
    return {"fd": listener.sock.fileno(), "name": listener.name, "kind": listener.kind,
            "spec": spec_data(listener.spec), "adopted": listener.adopted,
            "unix_inode": list(listener.unix_inode) if listener.unix_inode else None}


def release_data(release: Release) -> dict[str, Any]:
    return {"argv": list(release.argv), "executable": release.executable, "cwd": release.cwd,
            "logical_cwd": release.logical_cwd, "env": [list(pair) for pair in release.env],
            "version_file": release.version_file}


def identity_data(identity: Identity | None) -> dict[str, Any] | None:
    return {**asdict(identity), "argv": list(identity.argv)} if identity is not None else None


def instance_data(instance: Instance) -> dict[str, Any]:
    members = []
    for process in instance.living():
        try:
            members.append([process.pid, process.create_time()])
        except psutil.Error:  # gone since: it is simply not carried
            continue
    return {"index": instance.index, "seq": instance.seq, "leader": instance.leader, "state": str(instance.state),
            "started_at": instance.started_at, "ready_at": instance.ready_at, "status_text": instance.status_text,
            "notified_ready": instance.notified_ready, "notified_ready_at": instance.notified_ready_at,
            "notified_stopping": instance.notified_stopping, "last_watchdog": instance.last_watchdog,
            "sick": instance.sick, "members": members,
            "output": instance.output.carried() if instance.output is not None else None,
            "notify": {"fd": instance.notify.sock.fileno(), "path": instance.notify.path,
                       "owner": list(instance.notify.owner) if instance.notify.owner else None}
            if instance.notify is not None else None}


def generation_data(generation: Generation) -> dict[str, Any]:
    return {"number": generation.number, "release": release_data(generation.release),
            "listeners": [listener.sock.fileno() for listener in generation.listeners],
            "state": str(generation.state), "started_at": generation.started_at, "ready_at": generation.ready_at,
            "identity": identity_data(generation.identity), "spawned": generation.spawned,
            "instances": [instance_data(instance) for instance in generation.instances if instance.alive]}


def traffic_data(traffic: Traffic) -> dict[str, Any]:
    groups = [{"spec": spec_data(spec), "name": group.name, "members": list(group.members.order()),
               "sockets": {str(number): listener.sock.fileno() for number, listener in group.sockets.items()},
               "program": group.program, "foreign": group.foreign,
               "probe_source": str(group.probe_source) if group.probe_source is not None else None}
              for spec, group in traffic.groups.items()]
    return {"steer": traffic.steer, "groups": groups,
            "states": {str(number): str(state) for number, state in traffic.states.items()},
            "weights": {str(number): weight for number, weight in traffic.weights.items()},
            "quiet_since": {str(number): since for number, since in traffic.quiet_since.items()},
            "shared": dict(traffic.shared)}


def tally_data(tally: Tally) -> dict[str, Any]:
    return {"upgrades": dict(tally.upgrades), "rollbacks": dict(tally.rollbacks), "restarts": tally.restarts,
            "revivals": dict(tally.revivals), "probes_elsewhere": tally.probes_elsewhere,
            "replacements": dict(tally.replacements),
            "phases": {name: asdict(histogram) for name, histogram in tally.phases.items()},
            "probes": {name: asdict(histogram) for name, histogram in tally.probes.items()}}


def dump(fleet: Fleet, tally: Tally, budget: RestartBudget, previous: Release | None, supervisor: dict[str, Any],
         held: dict[str, int]) -> dict[str, Any]:
    """Everything to carry over: the fleet (listeners, generations, traffic), the counters, the restart budgets,
    the release served before, the supervisor's own fields, and the other held fds (`held`: control socket,
    runtime directory lock) by name."""
    listeners = {id(listener): listener for listener in fleet.all_listeners()}
    for group in fleet.traffic.groups.values():
        listeners.update((id(listener), listener) for listener in group.sockets.values())
    return {"format": FORMAT, "supervisor": supervisor, "held": held,
            "listeners": [listener_data(listener) for listener in listeners.values()],
            "fleet": {"listeners": [listener.sock.fileno() for listener in fleet.listeners],
                      "serving": fleet.serving.number if fleet.serving else None, "next_number": fleet.next_number,
                      "scaled": fleet.scaled, "cgroups": [str(fleet.cgroups.base), str(fleet.cgroups.home)]
                      if fleet.cgroups else None,
                      "output": fleet.output.carried() if fleet.output else None},
            "generations": [generation_data(generation) for generation in fleet.generations],
            "traffic": traffic_data(fleet.traffic), "tally": tally_data(tally),
            "budget": {str(index): list(times) for index, times in budget.failures.items()},
            "release": release_data(fleet.release),
            "previous": release_data(previous) if previous is not None else None}


def carried_fds(state: dict[str, Any]) -> list[int]:
    """Every descriptor the new image must find open: listeners, notify sockets, the held ones."""
    fds = [entry["fd"] for entry in state["listeners"]]
    fds += [instance["notify"]["fd"] for generation in state["generations"] for instance in generation["instances"]
            if instance["notify"] is not None]
    fds += [fd for generation in state["generations"] for instance in generation["instances"]
            for fd in capture.carried_fds(instance.get("output"))]
    return fds + list(state["held"].values())


def encode(state: dict[str, Any]) -> bytes:
    return json.dumps(state, separators=(",", ":")).encode()


def load(data: bytes) -> dict[str, Any]:
    """A state file's contents, checked for shape: raises Unreadable with one line when they cannot be revived."""
    if len(data) > MAX_BYTES:
        raise Unreadable(f"the state is {len(data)} bytes, more than {MAX_BYTES}")
    try:
        state = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise Unreadable(f"the state is not JSON: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise Unreadable(f"the state has format {found!r}; this supervise reads format {FORMAT}")
    _require(state, {"supervisor": dict, "held": dict, "listeners": list, "fleet": dict, "generations": list,
                     "traffic": dict, "tally": dict, "budget": dict, "release": dict})
    for fd in carried_fds(state):
        if not isinstance(fd, int) or fd < 0:
            raise Unreadable(f"the state names a file descriptor {fd!r}")
    return state


def _require(state: dict[str, Any], fields: dict[str, type]) -> None:
    for name, kind in fields.items():
        if not isinstance(state.get(name), kind):
            raise Unreadable(f"the state's {name!r} is missing or not a {kind.__name__}")


def numbers(mapping: dict[str, Any]) -> dict[int, Any]:
    """A JSON object keyed by generation numbers (or indexes) as an int-keyed dict."""
    return {int(key): value for key, value in mapping.items()}


def fds_of(entries: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {entry["fd"]: entry for entry in entries}
