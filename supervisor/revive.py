"""The live objects again, in the re-executed supervisor, from what carryover.py carried: the sockets (by the fd
numbers they kept across execve), the traffic groups in the kernel's order, every generation and instance with
its pids and notify socket, the counters and the restart budgets.

Nothing here binds, spawns or signals: the processes, sockets and reuseport programs never stopped existing. The
instances are revived inside the event loop (their exits are watched by pidfd and their notify sockets read on
it), before the reaper's first sweep, so a child that exited during the exec is reaped as ours and reported.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import psutil

from .capture import Capture
from .carryover import carried_fds, numbers
from .events import Events
from .fleet import Fleet
from .generation import Generation
from .identity import Identity
from .instance import Instance
from .listeners import Listener, ListenSpec
from .notify import NotifySocket
from .output_log import OutputLog
from .reaper import Reaper
from .release import Release
from .restart_budget import RestartBudget
from .states import InstanceState, TrafficState
from .tally import Histogram, Tally
from .traffic import Group, Traffic


def close_on_exec(state: dict[str, Any]) -> None:
    """The carried descriptors lost close-on-exec for the exec: they get it back (a child is given only its own)."""
    for fd in carried_fds(state):
        os.set_inheritable(fd, False)


def listeners(state: dict[str, Any]) -> dict[int, Listener]:
    """Every carried listener by its fd (the same number as before the exec)."""
    found: dict[int, Listener] = {}
    for entry in state["listeners"]:
        spec = entry["spec"]
        inode = entry["unix_inode"]
        found[entry["fd"]] = Listener(entry["name"], entry["kind"], socket.socket(fileno=entry["fd"]),
                                      ListenSpec(**spec) if spec is not None else None, entry["adopted"],
                                      (inode[0], inode[1]) if inode else None)
    return found


def release(data: dict[str, Any]) -> Release:
    return Release(tuple(data["argv"]), data["executable"], data["cwd"], data["logical_cwd"],
                   tuple((key, value) for key, value in data["env"]), data["version_file"])


def identity(data: dict[str, Any] | None) -> Identity | None:
    return Identity(**{**data, "argv": tuple(data["argv"])}) if data is not None else None


def traffic(into: Traffic, data: dict[str, Any], by_fd: dict[int, Listener]) -> None:
    """The groups in the kernel's member order (the program attached to each stays in the kernel as it was)."""
    for entry in data["groups"]:
        spec = ListenSpec(**entry["spec"])
        group = Group(entry["name"], program=entry["program"], foreign=entry["foreign"])
        for number in entry["members"]:
            group.members.join(number)
        group.sockets = {number: by_fd[fd] for number, fd in numbers(entry["sockets"]).items()}
        if entry["probe_source"] is not None:
            group.probe_source = ipaddress.ip_address(entry["probe_source"])
        into.groups[spec] = group
    into.states = {number: TrafficState(state) for number, state in numbers(data["states"]).items()}
    into.weights = numbers(data["weights"])
    into.quiet_since = numbers(data["quiet_since"])
    into.shared = dict(data["shared"])


def tally(into: Tally, data: dict[str, Any]) -> None:
    into.upgrades, into.rollbacks = Counter(data["upgrades"]), Counter(data["rollbacks"])
    into.restarts, into.revivals = data["restarts"], Counter(data["revivals"])
    into.probes_elsewhere = data["probes_elsewhere"]
    into.replacements = Counter(data.get("replacements", {}))  # absent when carried from a supervise before --max-rss
    into.phases = {name: _histogram(value) for name, value in data["phases"].items()}
    into.probes = {name: _histogram(value) for name, value in data["probes"].items()}


def _histogram(data: dict[str, Any]) -> Histogram:
    return Histogram(tuple(data["bounds"]), list(data["counts"]), data["total"], data["count"])


def budget(into: RestartBudget, data: dict[str, Any]) -> None:
    into.failures = {index: deque(times) for index, times in numbers(data).items()}


def fleet(into: Fleet, state: dict[str, Any], by_fd: dict[int, Listener], reaper: Reaper, events: Events) -> None:
    """The generations, their instances and which one serves. Runs on the event loop (pidfds, notify readers)."""
    data = state["fleet"]
    into.listeners = [by_fd[fd] for fd in data["listeners"]]
    into.next_number, into.scaled = data["next_number"], data["scaled"]
    if into.output is not None and data.get("output") is not None:  # absent when carried from before --child-output
        into.output.revive(data["output"])
    for entry in state["generations"]:
        generation = Generation(entry["number"], release(entry["release"]),
                                tuple(by_fd[fd] for fd in entry["listeners"]), into.launcher(entry["number"]),
                                state=InstanceState(entry["state"]), started_at=entry["started_at"],
                                ready_at=entry["ready_at"], identity=identity(entry["identity"]),
                                _spawned=entry["spawned"])
        if generation.ready_at is not None:
            generation.ready_signal.set()
        generation.instances = [_instance(generation, item, reaper, events, into.output) for item in entry["instances"]]
        into.generations.append(generation)
        into.watch(generation)
        if generation.number == data["serving"]:
            into.serving = generation


def _instance(generation: Generation, data: dict[str, Any], reaper: Reaper, events: Events,
              output: OutputLog | None) -> Instance:
    instance = Instance(generation.number, data["index"], data["seq"], generation.release, data["leader"],
                        reaper.watch(data["leader"]), events, state=InstanceState(data["state"]),
                        started_at=data["started_at"], ready_at=data["ready_at"], status_text=data["status_text"],
                        notified_ready=data["notified_ready"], notified_stopping=data["notified_stopping"],
                        last_watchdog=data["last_watchdog"], notified_ready_at=data["notified_ready_at"],
                        sick=data["sick"])
    for pid, created in data["members"]:
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - created) < 0.01:  # the same process, not a reused pid
                instance.members[pid] = process
        except psutil.Error:
            continue
    if instance.notified_ready:
        instance.ready_signal.set()
    if (notify := data["notify"]) is not None:
        owner = notify["owner"]
        instance.notify = NotifySocket(notify["path"], instance.notified, (owner[0], owner[1]) if owner else None,
                                       fd=notify["fd"])
        instance.notify.start()
    if (carried := data.get("output")) is not None:
        instance.output = Capture.revive(output or OutputLog(events), carried)
    return instance


@dataclass(frozen=True)
class Carried:
    """What the runner read back after a re-exec: the state, and its listeners (built before the supervisor)."""

    state: dict[str, Any]
    listeners: dict[int, Listener]
