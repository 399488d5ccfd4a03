"""Which generations are lowered and when they are restored, on virtual time: at activation, or at the bound (5 s
or half the readiness timeout, whichever is shorter), once each; the kernel's side is in test_start_priority.py."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
import trio.testing

from fakes import release
from supervisor.events import Events
from supervisor.generation import Generation
from supervisor.instance import Launcher
from supervisor.priority import AUTOGROUP, Restored, StartPriority
from supervisor.reaper import Reaper
from supervisor.start_priority import StartPriorities

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}


@dataclass(frozen=True)
class Recorded(StartPriority):
    """The autogroup method, but restores are written down instead of done."""

    restores: list[float] = field(default_factory=list, compare=False)

    def restore(self, leaders: Iterable[int], members: Callable[[], Iterable[int]]) -> Restored:
        self.restores.append(anyio.current_time())
        return Restored(0, 0, None)


def _setup() -> tuple[StartPriorities, Recorded, list[Any], Generation]:
    caught: list[Any] = []
    events = Events(log_level="debug", stream=io.StringIO())
    events.subscribe(caught.append)
    recorded = Recorded(AUTOGROUP, "test")
    generation = Generation(2, release("v2"), (), Launcher("", Reaper(), events))
    return StartPriorities(events, recorded), recorded, caught, generation


def _causes(caught: list[Any]) -> list[str]:
    return [event.fields["cause"] for event in caught if event.fields.get("lowered") is False]


async def test_restored_once_at_activation_and_never_again() -> None:
    priorities, recorded, caught, generation = _setup()
    async with anyio.create_task_group() as group:
        group.start_soon(priorities.run)
        began = anyio.current_time()
        priorities.begin(generation, passive=True, wanted=True, ready_timeout=60.0)
        await anyio.sleep(2.0)
        priorities.activated(generation)
        await anyio.sleep(30.0)  # past any bound: nothing more happens
        group.cancel_scope.cancel()
    assert recorded.restores == [began + 2.0]
    assert _causes(caught) == ["active"]


@pytest.mark.parametrize(("ready_timeout", "bound"), [(60.0, 5.0), (4.0, 2.0)])
async def test_restored_at_the_bound_when_never_active(ready_timeout: float, bound: float) -> None:
    priorities, recorded, caught, generation = _setup()
    async with anyio.create_task_group() as group:
        group.start_soon(priorities.run)
        await anyio.sleep(1.0)  # the timer task is waiting with nothing to bound
        began = anyio.current_time()
        priorities.begin(generation, passive=True, wanted=True, ready_timeout=ready_timeout)
        await anyio.sleep(bound + 10.0)
        priorities.activated(generation)  # too late: already back to normal
        group.cancel_scope.cancel()
    assert recorded.restores == [began + bound]
    assert _causes(caught) == ["bound"]


async def test_not_lowered_unless_passive_and_wanted_and_forgotten_when_gone() -> None:
    priorities, recorded, caught, generation = _setup()
    priorities.begin(generation, passive=False, wanted=True, ready_timeout=60.0)
    priorities.begin(generation, passive=True, wanted=False, ready_timeout=60.0)
    assert priorities.lowering(generation) is None and caught == []
    priorities.begin(generation, passive=True, wanted=True, ready_timeout=60.0)
    priorities.forget(generation)  # retired while lowered: nothing to restore
    priorities.activated(generation)
    assert recorded.restores == []
