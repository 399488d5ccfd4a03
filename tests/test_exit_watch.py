"""A generation's exit watch on virtual time: every exit is reported once, and ending the watch (the generation
retires) ends its watchers — the exits already known reported first, the rest cancelled after the grace."""

from __future__ import annotations

import io
from typing import Any

import anyio
import pytest
import trio.testing

from fakes import release
from supervisor.events import Events
from supervisor.exit_watch import ExitWatch
from supervisor.generation import Generation
from supervisor.instance import Instance, Launcher
from supervisor.reaper import ChildExit, ExitStatus, Reaper

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}


def _generation() -> tuple[Generation, Events]:
    events = Events(log_level="error", stream=io.StringIO())
    return Generation(1, release("v1"), (), Launcher("", Reaper(), events)), events


def _instance(generation: Generation, events: Events, index: int) -> Instance:
    pid = 5_000_000 + index  # above any pid_max: nothing real
    instance = Instance(generation.number, index, index + 1, generation.release, pid, ChildExit(pid), events)
    generation.instances.append(instance)
    return instance


def _exit(instance: Instance, code: int) -> None:
    instance.exit.status = ExitStatus(code=code)
    instance.exit.done.set()


async def test_each_exit_is_reported_and_ending_the_watch_cancels_the_watchers_left() -> None:
    generation, events = _generation()
    reported: list[tuple[int, int | None]] = []
    watch = ExitWatch(generation, lambda _, instance, status: reported.append((instance.index, status.code)))
    dies, stuck = _instance(generation, events, 0), _instance(generation, events, 1)
    watch.add(dies)
    watch.add(stuck)
    async with anyio.create_task_group() as group:
        group.start_soon(watch.run)
        await anyio.sleep(1)
        _exit(dies, 3)
        await anyio.sleep(1)
        assert reported == [(0, 3)]
        began = anyio.current_time()
        await watch.end(grace=2.0)  # `stuck` never exits: its watcher waits out the grace, then is cancelled
        assert anyio.current_time() - began == pytest.approx(2.0)
    assert reported == [(0, 3)]  # the task group ended: no watcher outlived the watch


async def test_exits_known_when_the_generation_retires_are_reported_before_the_watch_ends() -> None:
    generation, events = _generation()
    reported: list[int] = []
    watch = ExitWatch(generation, lambda _, instance, status: reported.append(instance.index))
    instances = [_instance(generation, events, index) for index in range(3)]
    for instance in instances:
        watch.add(instance)
    async with anyio.create_task_group() as group:
        group.start_soon(watch.run)
        await anyio.sleep(1)
        for instance in instances:
            _exit(instance, 0)  # drained: they exit together, as the reaper reaps them in one sweep
        began = anyio.current_time()
        await watch.end(grace=2.0)
        assert anyio.current_time() == began  # nothing to wait for
    assert sorted(reported) == [0, 1, 2]


async def test_a_watch_with_nothing_to_report_ends_at_once() -> None:
    generation, _ = _generation()
    watch = ExitWatch(generation, lambda *_: pytest.fail("nothing exited"))
    async with anyio.create_task_group() as group:
        group.start_soon(watch.run)
        began = anyio.current_time()
        await watch.end(grace=2.0)
        assert anyio.current_time() == began


async def test_a_watch_ended_before_it_ran_never_watches() -> None:
    generation, events = _generation()
    watch = ExitWatch(generation, lambda *_: pytest.fail("ended: nothing is reported"))
    watch.add(_instance(generation, events, 0))
    with anyio.move_on_after(5.0):
        await watch.end(grace=1.0)  # the instance never exits: the grace is waited out
    await watch.run()  # the fleet runs it late: it returns at once, its scope cancelled
