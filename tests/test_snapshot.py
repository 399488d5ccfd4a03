"""Fast layer: a snapshot is plain frozen data copied from the live objects (what the control API renders, what a
re-exec will serialize), and `ctl status` is a pure function of it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import anyio
import pytest
import trio.testing

from fakes import FakeFleet, Script, settings
from supervisor.control.views import status
from supervisor.snapshot import Snapshot, SupervisorView, of_generation, of_tally
from supervisor.tally import Tally

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}


def snapshot_of(fleet: FakeFleet, taken_at: float) -> Snapshot:
    supervisor = SupervisorView(1, "app-8080", "0", 0.0, 0.0, "idle", False, "/run/x/control.sock", None, 2, "surge", 0)
    generations = tuple(of_generation(generation, generation is fleet.serving, measure=False)
                        for generation in fleet.generations)
    return Snapshot(taken_at, supervisor, (), generations, None, (), None, None, None, (), of_tally(Tally(), 0))


async def test_a_snapshot_is_a_frozen_copy_that_serializes_as_it_is() -> None:
    async with FakeFleet(settings(2), Script()) as fleet:
        await anyio.sleep(3)
        snapshot = snapshot_of(fleet, anyio.current_time())
        generation = fleet.generations[0]
        await fleet.retire_instances(generation, [generation.instances[0]])  # the live state moves on
    shown = snapshot.generations[0]
    assert [instance.state for instance in shown.instances] == ["serving", "serving"], "taken before the drain"
    assert len(shown.ready()) == 2 and snapshot.serving is shown
    with pytest.raises(dataclasses.FrozenInstanceError):
        shown.state = "draining"  # type: ignore[misc]
    assert json.loads(json.dumps(snapshot.as_dict()))["generations"][0]["number"] == 1, "plain data, no default="


async def test_status_is_rendered_from_the_snapshot_alone() -> None:
    async with FakeFleet(settings(2), Script()) as fleet:
        await anyio.sleep(3)
        snapshot = snapshot_of(fleet, anyio.current_time() + 7)
    shown = status(snapshot)
    generation = shown["generations"][0]
    assert (generation["number"], generation["serving"], generation["ready_instances"]) == (1, True, 2)
    assert generation["age"] == pytest.approx(10, abs=0.01), "ages are taken_at minus the start"
    assert [(instance["index"], instance["ready"]) for instance in generation["instances"]] == [(0, True), (1, True)]
    assert [instance["ready_after"] for instance in generation["instances"]] == [0.0, 0.0], "one clock for all times"
    assert shown["supervisor"]["ready_instances"] == 2 and shown["supervisor"]["release"] is not None
