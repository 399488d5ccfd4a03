"""Fast layer: every path of the upgrade state machine — the real Rollout, readiness and watch code — against a
fake fleet of scripted instances (tests/fakes.py) on trio's virtual clock. A 60 s ready timeout takes
milliseconds. Each test checks the outcome, the events, which instances were drained and started in what
order, and that no drain ever left fewer than N instances ready.

Not here (they live in the operations loop or need real processes): coalescing of upgrade requests, the
end-of-window proof that each instance accepts connections itself, the known-bad book."""

from __future__ import annotations

import errno
import os
import time
from typing import Any

import anyio
import pytest
import trio.testing

from fakes import FakeFleet, Life, Script, settings
from supervisor.config import Hooks, Settings
from supervisor.errors import UserError
from supervisor.rollout import Outcome
from supervisor.spawn import OutOfFds, SpawnError
from supervisor.states import Phase, RolloutResult

pytestmark = pytest.mark.anyio

EMFILE = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
NEVER = Life(ready=None)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """trio with a clock that jumps to the next deadline whenever every task waits: sleeps cost no real time."""
    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}


async def upgrade(config: Settings, script: Script | None = None, **options: Any) -> tuple[Outcome, FakeFleet]:
    async with FakeFleet(config, script or Script()) as fleet:
        outcome = await fleet.upgrade(**options)
    return outcome, fleet


def assert_capacity_kept(fleet: FakeFleet) -> None:
    """Never fewer ready instances than N (or than the old generation had, if it was short)."""
    assert fleet.drains_below == []
    assert min(fleet.ready_counts) >= fleet.floor


def told(fleet: FakeFleet) -> list[str]:
    """What the fleet was asked to do and saw, without the exits of drained instances (concurrent: any order)."""
    return [action for action in fleet.actions if not action.startswith("gone")]


def serving(fleet: FakeFleet) -> tuple[int, list[int]]:
    """The serving generation and the indexes of its ready instances."""
    assert fleet.serving is not None
    return fleet.serving.number, sorted(instance.index for instance in fleet.serving.ready())


# -- promotion ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("probe_kind", ["http", "exec"])  # a cohort probed together; each instance alone
async def test_surge_starts_all_new_instances_then_drains_the_old_generation(probe_kind: str) -> None:
    outcome, fleet = await upgrade(settings(3), Script(probe_kind=probe_kind))
    assert (outcome.result, outcome.kind, outcome.reason) == (RolloutResult.PROMOTED, None, "")
    assert (outcome.old_gen, outcome.new_gen) == (1, 2)
    assert fleet.kinds() == ["watching", "promoted"]
    assert fleet.states() == [Phase.SPAWNING, Phase.SPAWNING, Phase.WAITING_READY, Phase.WATCHING, Phase.DRAINING, Phase.IDLE]
    assert told(fleet)[:3] == ["spawn 2#0", "spawn 2#1", "spawn 2#2"]
    assert sorted(told(fleet)[3:6]) == ["ready 2#0", "ready 2#1", "ready 2#2"]
    assert told(fleet)[6:] == ["promote 2", "retire 1", "drain 1#0", "drain 1#1", "drain 1#2"]
    timings = outcome.timings
    assert timings["spawned"] == 0 and 0.5 <= timings["ready"] < 1.0  # ready at 0.5 s, seen by the backoff
    assert timings["promoted"] == pytest.approx(timings["ready"] + 5.0)  # the whole watch window, no longer
    assert timings["old_gone"] == pytest.approx(timings["promoted"] + 0.1)
    assert serving(fleet) == (2, [0, 1, 2])
    assert_capacity_kept(fleet)


async def test_rolling_replaces_one_old_instance_for_each_new_one_batch_by_batch() -> None:
    outcome, fleet = await upgrade(settings(4, "rolling", batch="2"))
    assert (outcome.result, outcome.kind) == (RolloutResult.PROMOTED, None)
    assert fleet.kinds() == ["watching", "batch", "watching", "promoted"]
    batch = fleet.event("batch").fields
    assert (batch["batch"], batch["ready"], batch["draining"]) == (1, [0, 1], [0, 1])
    steps = [action for action in told(fleet) if not action.startswith("ready")]
    assert steps == ["changed-in-place? 1", "spawn 2#0", "spawn 2#1", "drain 1#0", "drain 1#1", "spawn 2#2",
                     "spawn 2#3", "promote 2", "retire 1", "drain 1#2", "drain 1#3"]
    assert fleet.ready_counts[-1] == 4 and max(fleet.ready_counts) == 6  # N + one batch at most
    assert serving(fleet) == (2, [0, 1, 2, 3])
    assert_capacity_kept(fleet)


async def test_rolling_fills_a_short_old_generation_before_draining_any_of_it() -> None:
    outcome, fleet = await upgrade(settings(3, "rolling"), Script(old=2))
    assert outcome.result == RolloutResult.PROMOTED
    assert fleet.kinds() == ["watching", "batch", "watching", "batch", "watching", "promoted"]
    batches = [event.fields for event in fleet.log if event.kind == "batch"]
    assert [batch["draining"] for batch in batches] == [[], [0]]
    assert "nothing drained: generation 1 had fewer than 3" in fleet.event("batch").message
    assert fleet.only("drain") == ["drain 1#0", "drain 1#1"]  # the second at promotion
    assert fleet.floor == 2
    assert_capacity_kept(fleet)


# -- failures of the new generation: each rolls back -------------------------------------------------------------


async def test_exec_failure_at_spawn_drains_what_started_and_leaves_the_old_generation_alone() -> None:
    error = SpawnError("cannot exec /srv/app/bin/app: No such file or directory")
    outcome, fleet = await upgrade(settings(2), Script(lives={(2, 1): Life(spawn_error=error)}))
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "exec-failed")
    assert outcome.reason == "exec failed: cannot exec /srv/app/bin/app: No such file or directory"
    assert fleet.kinds() == ["rolled-back"]
    assert fleet.states() == [Phase.SPAWNING, Phase.SPAWNING, Phase.ROLLING_BACK, Phase.IDLE]
    assert told(fleet) == ["spawn 2#0", "spawn-failed 2#1", "drain 2#0", "retire 2", "discard"]
    assert fleet.event("rolled-back").fields["restored"] == 0
    assert serving(fleet) == (1, [0, 1])
    assert_capacity_kept(fleet)


async def test_exec_failure_resolving_the_release_starts_nothing() -> None:
    outcome, fleet = await upgrade(settings(2), Script(prepare_error=SpawnError("app: command not found")))
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "exec-failed")
    assert outcome.reason == "exec failed: app: command not found"
    assert outcome.new_gen is None
    assert fleet.kinds() == ["rolled-back"]
    assert told(fleet) == []  # no plan: nothing to discard
    assert serving(fleet) == (1, [0, 1])


async def test_instance_exiting_before_it_is_ready_fails_its_batch_at_once() -> None:
    outcome, fleet = await upgrade(settings(2), Script(lives={(2, 1): Life(ready=3.0, dies=1.0, code=3)}))
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "exited")
    assert outcome.reason == "instance 1 exited with status 3 during readiness (1 of 2 ready, 2 needed)"
    assert 1.0 <= outcome.timings["rolled_back"] < 2.0  # not the 60 s ready timeout
    assert fleet.kinds() == ["rolled-back"]
    assert told(fleet) == ["spawn 2#0", "spawn 2#1", "ready 2#0", "died 2#1", "clear 2#1", "drain 2#0", "retire 2",
                           "discard"]  # the dead one is only cleared away
    assert serving(fleet) == (1, [0, 1])
    assert_capacity_kept(fleet)


async def test_ready_timeout_of_60s_takes_milliseconds() -> None:
    began = time.perf_counter()
    outcome, fleet = await upgrade(settings(1), Script(lives={(2, 0): NEVER}))
    real = time.perf_counter() - began
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "not-ready")
    assert outcome.reason == "not ready after 60s: last probe HTTP 503"
    assert 60.0 <= outcome.timings["rolled_back"] < 61.0
    assert real < 1.0
    assert fleet.states() == [Phase.SPAWNING, Phase.SPAWNING, Phase.WAITING_READY, Phase.ROLLING_BACK, Phase.IDLE]
    assert fleet.only("drain") == ["drain 2#0"]
    assert_capacity_kept(fleet)


async def test_instance_dying_in_the_watch_window_is_a_casualty() -> None:
    outcome, fleet = await upgrade(settings(1), Script(lives={(2, 0): Life(dies=2.0)}))
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "exited")
    assert outcome.reason == "exited with status 1 in watch window"
    assert fleet.kinds() == ["watching", "rolled-back"]
    assert outcome.timings["rolled_back"] == pytest.approx(2.0)
    assert fleet.only("drain", "clear", "retire") == ["clear 2#0", "retire 2"]
    assert serving(fleet) == (1, [0])
    assert fleet.drains_below == []


async def test_instance_dying_after_ready_in_a_later_batch_fails_the_upgrade() -> None:
    """Without a watch window, instance 0 dies while batch 2 waits: the rollback can put an old instance back only
    in place of a ready new one, and none is left — the old generation stays short (the supervisor's repair,
    not the rollout, starts it again)."""
    script = Script(lives={(2, 0): Life(dies=2.0), (2, 1): NEVER})
    outcome, fleet = await upgrade(settings(2, "rolling", watch=0), script)
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "exited")
    assert outcome.reason == "instance 0 exited with status 1 after becoming ready"
    assert fleet.kinds() == ["batch", "rolled-back"]
    assert fleet.only("drain", "clear", "restore") == ["drain 1#0", "clear 2#0", "drain 2#1"]
    assert serving(fleet) == (1, [1])
    assert fleet.drains_below == []


async def test_instance_failing_health_checks_in_the_watch_window_rolls_back() -> None:
    """Checks go round the 3 instances: instance 1 fails every third one, and its 3 strikes need 9 checks."""
    outcome, fleet = await upgrade(settings(3, watch=10), Script(lives={(2, 1): Life(sick=1.0)}))
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "unhealthy")
    assert outcome.reason == "unhealthy in watch window: instance 1: 3 consecutive failures (last: HTTP 500)"
    assert fleet.kinds() == ["watching", "rolled-back"]
    assert outcome.timings["rolled_back"] == pytest.approx(outcome.timings["ready"] + 8.0, abs=0.5)  # 3rd strike at 8 s
    assert sorted(fleet.only("drain")) == ["drain 2#0", "drain 2#1", "drain 2#2"]
    assert serving(fleet) == (1, [0, 1, 2])
    assert_capacity_kept(fleet)


async def abort_in(fleet: FakeFleet, state: str, delay: float = 0.0) -> tuple[Outcome, int]:
    """Run an upgrade and abort it `delay` seconds after it enters `state`, as `ctl rollback` would; the outcome,
    and how many actions the fleet had seen when the abort was asked for."""
    rollout = fleet.rollout()
    assert not rollout.abort("too early")  # not running yet
    entered = anyio.Event()
    fleet.events.subscribe(lambda event: entered.set() if event.fields.get("state") == state else None)
    outcomes: list[Outcome] = []

    async def run() -> None:
        outcomes.append(await rollout.run())

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        await entered.wait()
        await anyio.sleep(delay)
        assert rollout.abort("rolled back by operator")
        aborted = len(fleet.actions)
    assert not rollout.abort("again")  # it is over
    return outcomes[0], aborted


async def test_operator_abort_in_the_watch_window_rolls_back() -> None:
    async with FakeFleet(settings(2), Script()) as fleet:
        outcome, _ = await abort_in(fleet, Phase.WATCHING, delay=1.0)
    assert (outcome.result, outcome.kind, outcome.reason) == (RolloutResult.ROLLED_BACK, "operator", "rolled back by operator")
    assert outcome.timings["rolled_back"] == pytest.approx(outcome.timings["ready"] + 1.0 + 0.1)  # + their drain
    assert fleet.kinds() == ["watching", "rolled-back"]
    assert fleet.only("drain") == ["drain 2#0", "drain 2#1"]
    assert serving(fleet) == (1, [0, 1])
    assert_capacity_kept(fleet)


async def test_operator_abort_during_a_batch_drain_waits_for_it_then_restores() -> None:
    async with FakeFleet(settings(2, "rolling"), Script(lives={(1, 0): Life(drain=3.0)})) as fleet:
        outcome, _ = await abort_in(fleet, Phase.DRAINING)
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "operator")
    steps = fleet.actions
    assert steps.index("gone 1#0") < steps.index("restore 1 x1") < steps.index("ready 1#0") < steps.index("drain 2#0")
    assert outcome.timings["rolled_back"] > 3.0  # the shielded drain of 1#0 ran to its end first
    assert fleet.event("rolled-back").fields["restored"] == 1
    assert serving(fleet) == (1, [0, 1])
    assert_capacity_kept(fleet)


async def test_nothing_is_started_after_an_operator_abort() -> None:
    async with FakeFleet(settings(2, "rolling"), Script(lives={(1, 0): Life(drain=3.0)})) as fleet:
        _, aborted = await abort_in(fleet, Phase.DRAINING)
    assert [action for action in fleet.actions[aborted:] if action.startswith("spawn 2")] == []


# -- refusals: nothing starts ------------------------------------------------------------------------------------


async def test_refused_release_starts_nothing_unless_forced() -> None:
    outcome, fleet = await upgrade(settings(2), Script(refusal="release v2 is known bad"))
    assert (outcome.result, outcome.kind, outcome.reason) == (RolloutResult.REFUSED, None, "release v2 is known bad")
    assert fleet.kinds() == ["upgrade-refused"]
    assert fleet.states() == [Phase.SPAWNING, Phase.IDLE]
    assert told(fleet) == ["discard"]  # listeners the plan bound for nothing
    forced, _ = await upgrade(settings(2), Script(refusal="release v2 is known bad"), force=True)
    assert forced.result == RolloutResult.PROMOTED


async def test_invalid_config_is_refused() -> None:
    outcome, fleet = await upgrade(settings(2), Script(prepare_error=UserError("invalid config: unknown probe kind")))
    assert (outcome.result, outcome.reason) == (RolloutResult.REFUSED, "invalid config: unknown probe kind")
    assert fleet.kinds() == ["upgrade-refused"]
    assert told(fleet) == []  # prepare bound nothing


async def test_failing_pre_upgrade_hook_refuses_the_upgrade() -> None:
    script = Script(hooks={"pre-upgrade": "exited with status 1"})
    outcome, fleet = await upgrade(settings(2, hooks=Hooks(pre_upgrade="check")), script)
    assert (outcome.result, outcome.reason) == (RolloutResult.REFUSED, "pre-upgrade hook exited with status 1")
    assert fleet.kinds() == ["hook", "upgrade-refused"]
    assert told(fleet) == ["discard"]


async def test_hooks_are_told_both_generations_and_the_reason() -> None:
    hooks = Hooks(pre_upgrade="pre", post_upgrade="post", on_rollback="undo")
    promoted, fleet = await upgrade(settings(2, hooks=hooks))
    assert promoted.result == RolloutResult.PROMOTED
    calls = dict(fleet.commands.calls)
    assert list(calls) == ["pre-upgrade", "post-upgrade"]
    post = calls["post-upgrade"]
    assert (post["SUPERVISE_OLD_GENERATION"], post["SUPERVISE_NEW_GENERATION"]) == ("1", "2")
    assert (post["SUPERVISE_OLD_RELEASE"], post["SUPERVISE_NEW_RELEASE"]) == ("v1", "v2")
    assert len(post["SUPERVISE_OLD_PIDS"].split()) == 2  # taken before the old generation drains
    rolled_back, fleet = await upgrade(settings(2, hooks=hooks), Script(lives={(2, 0): NEVER}))
    calls = dict(fleet.commands.calls)
    assert list(calls) == ["pre-upgrade", "on-rollback"]
    assert calls["on-rollback"]["SUPERVISE_REASON"] == rolled_back.reason
    assert fleet.kinds() == ["hook", "rolled-back", "hook"]


# -- out of file descriptors: not the release's fault ------------------------------------------------------------


async def test_out_of_fds_while_preparing_refuses_the_upgrade() -> None:
    outcome, fleet = await upgrade(settings(2), Script(prepare_error=EMFILE))
    assert outcome.result == RolloutResult.REFUSED
    assert outcome.reason == "the supervisor is out of file descriptors (Too many open files)"
    assert fleet.kinds() == ["upgrade-refused"]


async def test_out_of_fds_at_spawn_rolls_back_as_resources() -> None:
    error = OutOfFds("cannot create the notify socket for generation 2: Too many open files")
    outcome, fleet = await upgrade(settings(2), Script(lives={(2, 0): Life(spawn_error=error)}))
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "resources")
    assert outcome.reason == "cannot create the notify socket for generation 2: Too many open files"
    assert fleet.kinds() == ["rolled-back"]
    assert told(fleet) == ["spawn-failed 2#0", "retire 2", "discard"]


async def test_out_of_fds_in_a_probe_rolls_back_as_resources() -> None:
    outcome, fleet = await upgrade(settings(1), Script(lives={(2, 0): Life(probe_error=EMFILE)}))
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "resources")
    assert outcome.reason == "the supervisor ran out of file descriptors (Too many open files)"
    assert fleet.kinds() == ["rolled-back"]
    assert told(fleet) == ["spawn 2#0", "drain 2#0", "retire 2", "discard"]
    assert serving(fleet) == (1, [0])


async def test_out_of_fds_in_a_cohort_probe_rolls_back_as_resources() -> None:
    outcome, _ = await upgrade(settings(2), Script(lives={(2, 0): Life(probe_error=EMFILE)}))
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "resources")


# -- rolling rollback, fallback, success percent -----------------------------------------------------------------


async def test_rolling_rollback_restores_each_old_instance_before_draining_a_new_one() -> None:
    outcome, fleet = await upgrade(settings(3, "rolling"), Script(lives={(2, 2): NEVER}))
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "not-ready")
    assert outcome.reason == "instance 2 not ready after 60s: last probe HTTP 503"
    assert fleet.kinds() == ["watching", "batch", "watching", "batch", "restoring", "restoring", "rolled-back"]
    steps = told(fleet)
    rollback = steps[steps.index("drain 2#2"):]
    assert rollback == ["drain 2#2", "restore 1 x1", "spawn 1#0", "ready 1#0", "drain 2#0",
                        "restore 1 x1", "spawn 1#1", "ready 1#1", "drain 2#1", "retire 2", "discard"]
    assert fleet.event("rolled-back").fields["restored"] == 2
    assert serving(fleet) == (1, [0, 1, 2])
    assert_capacity_kept(fleet)


async def test_rolling_rollback_puts_back_only_old_instances_that_served() -> None:
    """Old instance 1 was dead (not yet replaced): the first batch drains it first and it is not restored."""
    outcome, fleet = await upgrade(settings(3, "rolling"), Script(old_dead=(1,), lives={(2, 2): NEVER}))
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "not-ready")
    assert fleet.kinds() == ["watching", "batch", "watching", "batch", "restoring", "rolled-back"]
    assert [event.fields["draining"] for event in fleet.log if event.kind == "batch"] == [[1], [0]]
    assert fleet.only("clear", "drain", "restore") == ["clear 1#1", "drain 1#0", "drain 2#2", "drain 2#0",
                                                      "restore 1 x1", "drain 2#1"]
    assert fleet.event("rolled-back").fields["restored"] == 1
    assert serving(fleet) == (1, [0, 2])
    assert fleet.floor == 2
    assert_capacity_kept(fleet)


async def test_rolling_falls_back_to_surge_when_the_old_release_changed_in_place() -> None:
    changed = "the files of generation 1 changed in place"
    outcome, fleet = await upgrade(settings(3, "rolling"), Script(changed=changed))
    assert outcome.result == RolloutResult.PROMOTED
    assert fleet.kinds() == ["strategy-fallback", "watching", "promoted"]
    assert fleet.event("strategy-fallback").fields["reason"] == changed
    assert told(fleet)[:4] == ["changed-in-place? 1", "spawn 2#0", "spawn 2#1", "spawn 2#2"]
    assert fleet.only("drain") == ["drain 1#0", "drain 1#1", "drain 1#2"]  # all at promotion
    assert_capacity_kept(fleet)


@pytest.mark.parametrize(("strategy", "asked"), [("rolling", True), ("surge", False)])
async def test_batches_when_the_old_release_is_unchanged(strategy: str, asked: bool) -> None:
    async with FakeFleet(settings(3, strategy), Script()) as fleet:
        rollout = fleet.rollout()
        outcome = await rollout.run()
    assert outcome.result == RolloutResult.PROMOTED
    assert rollout.batches == ([1, 1, 1] if strategy == "rolling" else [3])
    assert fleet.kinds() == (["watching", "batch"] * 2 if strategy == "rolling" else []) + ["watching", "promoted"]
    assert ("changed-in-place? 1" in fleet.actions) is asked  # surge never needs to know
    assert_capacity_kept(fleet)


async def test_a_batch_with_enough_ready_instances_goes_on() -> None:
    """50% of a batch of 2 must be ready: instance 1 is not, so it is drained and its index started again."""
    script = Script(lives={(2, 1): (NEVER, Life())})
    async with FakeFleet(settings(4, "rolling", batch="2", success=50), script) as fleet:
        rollout = fleet.rollout()
        outcome = await rollout.run()
    assert (outcome.result, outcome.kind) == (RolloutResult.PROMOTED, None)
    assert rollout.batches == [2, 2, 1]
    assert fleet.kinds() == ["watching", "batch"] * 2 + ["watching", "promoted"]
    assert [event.fields["draining"] for event in fleet.log if event.kind == "batch"] == [[0], [1, 2]]
    assert fleet.only("spawn") == ["spawn 2#0", "spawn 2#1", "spawn 2#1", "spawn 2#2", "spawn 2#3"]
    assert serving(fleet) == (2, [0, 1, 2, 3])
    assert_capacity_kept(fleet)


async def test_a_batch_with_too_few_ready_instances_rolls_back() -> None:
    script = Script(lives={(2, 1): NEVER})
    outcome, fleet = await upgrade(settings(4, "rolling", batch="2", success=60), script)
    assert (outcome.result, outcome.kind) == (RolloutResult.ROLLED_BACK, "not-ready")
    assert outcome.reason == "instance 1 not ready after 60s: last probe HTTP 503 (1 of 2 ready, 2 needed)"
    assert fleet.kinds() == ["rolled-back"]
    assert fleet.only("drain", "restore") == ["drain 2#1", "drain 2#0"]  # nothing old was replaced yet
    assert serving(fleet) == (1, [0, 1, 2, 3])
    assert_capacity_kept(fleet)
