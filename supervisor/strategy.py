"""How an upgrade replaces a generation of N instances: all at once (`surge`) or batch by batch (`rolling`).

Either way no old instance is told to drain before a new one is ready to take its place, so the number of
ready instances never drops below N; `rolling` trades a longer upgrade for at most N + max-surge processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .counted import counted
from .errors import UserError

SURGE, ROLLING = "surge", "rolling"
STRATEGIES = (SURGE, ROLLING)


@dataclass(frozen=True)
class Amount:
    """A count of instances, or a percentage of N (rounded up, never less than one)."""

    value: int
    percent: bool = False

    def of(self, total: int) -> int:
        if self.percent:
            return max(1, math.ceil(total * self.value / 100))
        return self.value

    def __str__(self) -> str:
        return f"{self.value}%" if self.percent else str(self.value)


def parse_amount(text: str, option: str) -> Amount:
    """`2` or `25%`: a whole number of at least 1, or a percentage from 1 to 100."""
    value = str(text).strip()
    percent = value.endswith("%")
    digits = value[:-1].strip() if percent else value
    if not digits.isdigit():
        raise UserError(f"invalid {option} {text!r}: expected a count like 2 or a percentage like 25%")
    number = int(digits)
    if number < 1 or (percent and number > 100):
        raise UserError(f"invalid {option} {text!r}: " + ("a percentage from 1% to 100%" if percent else "at least 1")
                        + (" (supervise never drains an old instance before a new one is ready, so a batch needs room "
                           "above --processes)" if option == "--max-surge" else ""))
    return Amount(number, percent)


@dataclass(frozen=True)
class Strategy:
    """--strategy, --batch, --max-surge and --success-percent, validated together."""

    kind: str = SURGE
    batch: Amount | None = None
    max_surge: Amount | None = None
    success_percent: int = 100

    def step(self, processes: int) -> int:
        """How many new instances one batch starts (surge: all of them)."""
        if self.kind == SURGE:
            return processes
        size = (self.batch or Amount(1)).of(processes)
        if self.max_surge is not None:
            size = min(size, self.max_surge.of(processes))
        return max(1, min(size, processes))

    def required(self, size: int) -> int:
        """How many instances of a batch of `size` must become ready for the rollout to go on."""
        return max(1, math.ceil(size * self.success_percent / 100))

    def batches(self, processes: int) -> list[int]:
        """The batch sizes of an upgrade in which every instance becomes ready at its first try."""
        step, left, sizes = self.step(processes), processes, []
        while left > 0:
            sizes.append(min(step, left))
            left -= sizes[-1]
        return sizes

    def describe(self, processes: int) -> str:
        if self.kind == SURGE:
            return f"surge: all {counted(processes, 'new instance')} at once"
        most = counted(processes + self.step(processes), "process")
        return (f"rolling: batches of {self.step(processes)} (at most {most}), "
                f"{self.success_percent}% of each batch must become ready")


def drain_count(batch: int, new_ready: int, old_current: int, processes: int) -> int:
    """How many old instances a finished batch of `batch` ready instances replaces: as many, but only those
    above `processes` — an old generation that was short (an instance it could not restart) is filled first."""
    return max(0, min(batch, new_ready + old_current - processes))


def build_strategy(kind: str | None, batch: str | None, max_surge: str | None, success_percent: object) -> Strategy:
    """A Strategy from option values; --batch and --max-surge only make sense with rolling."""
    kind = kind or SURGE
    if kind not in STRATEGIES:
        raise UserError(f"invalid --strategy {kind!r}: use surge or rolling")
    if kind == SURGE and (batch is not None or max_surge is not None):
        raise UserError("--batch and --max-surge apply to --strategy rolling (surge starts all instances at once)")
    try:
        percent = int(str(success_percent).rstrip("%"))
    except ValueError:
        raise UserError(f"invalid --success-percent {success_percent!r}: expected a percentage from 1 to 100") from None
    if not 1 <= percent <= 100:
        raise UserError(f"invalid --success-percent {success_percent!r}: expected a percentage from 1 to 100")
    return Strategy(kind, parse_amount(batch, "--batch") if batch is not None else None,
                    parse_amount(max_surge, "--max-surge") if max_surge is not None else None, percent)
