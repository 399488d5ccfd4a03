"""Fast layer: the dry run (`ctl upgrade --dry-run`) is the real upgrade's first steps taken without effects —
the same prepare(), refusal and batch-size decision as the rollout — so it says what the rollout then does.
Run against the fake fleet (tests/fakes.py) on trio's virtual clock."""

from __future__ import annotations

from typing import Any

import pytest
import trio.testing

from fakes import FakeFleet, Script, settings
from supervisor.control.plan import plan
from supervisor.errors import UserError
from supervisor.preview import Preview, preview
from supervisor.spawn import SpawnError
from supervisor.states import RolloutResult

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}


async def dry_run(fleet: FakeFleet, force: bool = False) -> Preview:
    return await preview(fleet, fleet.serving, len(fleet.generations) + 1, (), force)


@pytest.mark.parametrize("script, force, result", [
    (Script(), False, RolloutResult.PROMOTED),
    (Script(refusal="release v2 is known bad"), False, RolloutResult.REFUSED),
    (Script(refusal="release v2 is known bad"), True, RolloutResult.PROMOTED),
])
async def test_the_dry_run_refuses_exactly_what_the_upgrade_refuses(script: Script, force: bool, result: str) -> None:
    async with FakeFleet(settings(2), script) as fleet:
        seen = await dry_run(fleet, force)
        assert fleet.actions == [], "a dry run starts, drains and discards nothing"
        outcome = await fleet.upgrade(force=force)
    assert outcome.result == result
    assert (seen.refusal is not None) == (result == RolloutResult.REFUSED)
    assert seen.known_bad == (script.refusal is not None), "known bad is said even when forced"
    steps = plan(seen)["steps"]
    assert steps[0].startswith("refuse: ") == (result == RolloutResult.REFUSED), steps


@pytest.mark.parametrize("error, exec_failed, result", [
    (UserError("invalid config /etc/app.toml: unknown key 'procs'"), False, RolloutResult.REFUSED),
    (SpawnError("no such file: ./app"), True, RolloutResult.ROLLED_BACK),
])
async def test_a_dry_run_that_cannot_prepare_says_what_the_upgrade_does(error: Exception, exec_failed: bool,
                                                                      result: str) -> None:
    async with FakeFleet(settings(), Script(prepare_error=error)) as fleet:
        seen = await dry_run(fleet)
        outcome = await fleet.upgrade()
    assert outcome.result == result
    assert (seen.error, seen.exec_failed) == (str(error), exec_failed)
    assert plan(seen) == {"error": str(error), "steps": [("roll back at once: exec failed: " if exec_failed else
                                                          "refuse: ") + str(error)]}


@pytest.mark.parametrize("changed", [None, "the files of generation 1 changed in place"])
async def test_the_dry_run_falls_back_to_surge_when_the_upgrade_would(changed: str | None) -> None:
    async with FakeFleet(settings(4, "rolling", batch="1"), Script(changed=changed)) as fleet:
        seen = await dry_run(fleet)
        rollout = fleet.rollout()
        await rollout.run()
    described = plan(seen)
    assert seen.surge == changed
    assert [batch["start"] for batch in described["batches"]] == ([[0, 1, 2, 3]] if changed else [[0], [1], [2], [3]])
    assert rollout.batches == [len(batch["start"]) for batch in described["batches"]], "as the rollout did"
    assert [batch["drain"] for batch in described["batches"]][-1] == ([0, 1, 2, 3] if changed else [3])
    assert any("(surge)" in step for step in described["steps"]) == bool(changed)
