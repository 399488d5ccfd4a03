"""The restart budget on a fake clock: backoff doubling, the window, per-index counting, crash loop or give up."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.restart_budget import FIRST_BACKOFF, MAX_BACKOFF, Decision, RestartBudget


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_from_the_first_delay_up_to_the_longest() -> None:
    budget = RestartBudget(Clock())
    delays = [budget.fail(0, max_restarts=100, window=3600, serving=1).delay for _ in range(12)]
    assert delays[:4] == [FIRST_BACKOFF, FIRST_BACKOFF * 2, FIRST_BACKOFF * 4, FIRST_BACKOFF * 8]
    assert delays[-1] == MAX_BACKOFF and max(delays) == MAX_BACKOFF


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    budget = RestartBudget(clock)
    assert budget.fail(0, 5, window=60, serving=1).count == 1
    clock.now += 30
    assert budget.fail(0, 5, window=60, serving=1).count == 2
    clock.now += 31  # the first failure is now 61 s old
    assert budget.fail(0, 5, window=60, serving=1) == Decision(2, FIRST_BACKOFF * 2)


def test_each_index_has_its_own_budget() -> None:
    budget = RestartBudget(Clock())
    for _ in range(3):
        budget.fail(0, 3, 60, serving=1)
    assert budget.fail(1, 3, 60, serving=1) == Decision(1, FIRST_BACKOFF)


def test_past_the_limit_it_is_a_crash_loop_while_others_serve_and_gives_up_when_none_do() -> None:
    budget = RestartBudget(Clock())
    for _ in range(3):
        assert not budget.fail(0, 3, 60, serving=2).crash_loop
    assert budget.fail(0, 3, 60, serving=2) == Decision(4, MAX_BACKOFF, crash_loop=True)
    assert budget.fail(0, 3, 60, serving=0) == Decision(5, MAX_BACKOFF, give_up=True)
