"""Fast layer: who the rollout gives new connections to, and when (steered cutover), against the fake fleet on
virtual time — surge and rolling, a ramp, an undrain after a failed watch, a release that never became ready.
What the kernel then does with it is tests/test_steering.py's and test_steered_cutover.py's."""

from __future__ import annotations

import re
from typing import Any

import pytest
import trio.testing

from fakes import FakeFleet, Life, Script, settings
from supervisor.config import Settings
from supervisor.states import RolloutResult, TrafficState

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}


async def upgrade(config: Settings, script: Script | None = None) -> tuple[RolloutResult, FakeFleet]:
    async with FakeFleet(config, script or Script()) as fleet:
        outcome = await fleet.upgrade()
    return outcome.result, fleet


async def test_surge_gives_the_new_generation_everything_at_readiness_and_drains_the_old() -> None:
    result, fleet = await upgrade(settings(3))
    assert result == RolloutResult.PROMOTED
    assert fleet.steering == ["2 active ×3, 1 drained ×3"]  # at once, in one program; then watched, then promoted


async def test_rolling_shares_by_ready_instances_until_the_last_batch() -> None:
    result, fleet = await upgrade(settings(3, "rolling", batch="1"))
    assert result == RolloutResult.PROMOTED
    assert fleet.steering == [
        "2 active ×1, 1 active ×3",  # batch 1 ready: 1 new beside 3 old
        "1 active ×2",  # an old instance drained
        "2 active ×2, 1 active ×2",
        "1 active ×1",
        "2 active ×3, 1 drained ×1",  # the last batch: the old generation gets nothing more
    ]


async def test_a_ramp_grows_the_new_share_before_the_old_generation_is_drained() -> None:
    result, fleet = await upgrade(settings(2, ramp=2.0, watch=1.0))
    assert result == RolloutResult.PROMOTED
    found = [re.search(r"2 active ×2 part ([\d.]+)", step) for step in fleet.steering]
    parts = [float(match.group(1)) for match in found if match]
    assert len(parts) >= 30 and parts[0] == 0.0 and parts == sorted(parts) and parts[-1] <= 1.0, parts
    assert all("1 active ×2" in step for step in fleet.steering[:-1])
    assert fleet.steering[-1] == "2 active ×2, 1 drained ×2"  # after 2 s, though the watch was 1 s


async def test_a_failed_watch_undrains_the_old_generation_at_once() -> None:
    result, fleet = await upgrade(settings(2, watch=10), Script(lives={(2, 1): Life(sick=1.0)}))
    assert result == RolloutResult.ROLLED_BACK
    assert fleet.steering == ["2 active ×2, 1 drained ×2", "1 active ×2, 2 drained ×2"]
    assert fleet.traffic == {1: TrafficState.ACTIVE, 2: TrafficState.DRAINED}


async def test_a_release_that_never_became_ready_never_gets_a_connection() -> None:
    result, fleet = await upgrade(settings(2, ready_timeout=3.0), Script(lives={(2, 0): Life(ready=None)}))
    assert result == RolloutResult.ROLLED_BACK
    assert fleet.steering == []  # passive from start to end: the old generation kept everything
