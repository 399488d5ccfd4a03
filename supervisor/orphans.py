"""Processes re-parented to the supervisor: it is their subreaper, so a server's grandchild whose parent died
becomes our child. It goes back to the generation its environment names, or, if that generation is finished, it
is killed: nothing a generation started outlives it.
"""

from __future__ import annotations

from collections.abc import Sequence

import psutil

from .event_kinds import Kind
from .events import Events
from .generation import Generation
from .proctree import children, descendants


def adopt(generations: Sequence[Generation], known: set[int], next_number: int, events: Events) -> None:
    """Give each unknown child of ours to the instance its SUPERVISE_GENERATION/SUPERVISE_INSTANCE name; kill those
    of a generation numbered below `next_number` that is no longer held."""
    known = set(known)
    for generation in generations:
        known.update(generation.members)
    try:
        ours = children(psutil.Process())
    except OSError:  # out of fds: /proc cannot be read now; the next sweep looks again
        return
    for process in ours:
        if process.pid in known:
            continue
        try:
            environ = process.environ()
        except psutil.Error:
            continue
        number, index = environ.get("SUPERVISE_GENERATION", ""), environ.get("SUPERVISE_INSTANCE", "0")
        owner = next((instance for generation in generations if str(generation.number) == number
                      for instance in sorted(generation.instances, key=lambda item: item.alive)
                      if str(instance.index) == index), None)  # a dead instance's first: its orphans outlived it
        if owner is not None:
            owner.remember(process.pid)
            owner.refresh()
        elif number.isdigit() and int(number) < next_number:
            _kill_leftover(process, int(number), events)


def kill_descendants(events: Events) -> None:
    """At exit, every generation gone: any process still below us is a leftover, killed and named."""
    for process in descendants(psutil.Process()):
        try:
            process.kill()
        except psutil.Error:
            continue
        events.emit(Kind.LEFTOVER_KILLED, f"killed pid {process.pid}: still running after every generation was stopped",
                    level="warning", pids=(process.pid,))


def _kill_leftover(process: psutil.Process, number: int, events: Events) -> None:
    try:
        for member in [*process.children(recursive=True), process]:
            member.kill()
    except psutil.Error:
        return
    events.emit(Kind.LEFTOVER_KILLED, f"killed pid {process.pid}: left over from finished generation {number}",
                level="warning", gen=number, pids=(process.pid,))
