"""--max-rss: how much memory each instance of the serving generation holds, and which one stayed above the
limit for --health-threshold checks in a row (then it is replaced beside itself, as a sick one is: liveness.py).

An instance's memory is the sum of the RSS of every process of its tree (a prefork server's workers, grandchildren
that left its session), as `ps` would add it up: pages shared between them count in each, so the limit is a bound
on what the tree could hold, never less than it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil

from .generation import Generation
from .instance import Instance
from .units import mib


def tree_rss(instance: Instance) -> int:
    """Bytes resident in every living process of the instance's tree (rescanned for new forks first)."""
    instance.refresh()
    total = 0
    for process in instance.living():
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue  # it ended between the listing and the reading
    return total


@dataclass(frozen=True)
class Overuse:
    """An instance that stayed above the limit: what it held at the last check."""

    instance: Instance
    rss: int
    limit: int

    @property
    def reason(self) -> str:
        """`memory 612 MiB > 512 MiB`: why it is replaced, for the log, status and the upgrade's trigger."""
        return f"memory {mib(self.rss)} > {mib(self.limit)}"


@dataclass
class MemoryStrikes:
    """Consecutive checks each instance of one generation was above the limit, by its process (`seq`): a
    replacement at the same index starts from nothing."""

    generation: Generation
    counts: dict[int, int] = field(default_factory=dict)

    def check(self, limit: int, threshold: int) -> list[Overuse]:
        """Measure every ready instance once; those above `limit` for `threshold` checks in a row (their count
        starts again, so one not replaced in time is reported again after as many checks)."""
        found, counts = [], {}
        for instance in self.generation.ready():
            if instance.sick:
                continue  # already waiting for its replacement
            rss = tree_rss(instance)
            counts[instance.seq] = self.counts.get(instance.seq, 0) + 1 if rss > limit else 0
            if counts[instance.seq] >= threshold:
                counts[instance.seq] = 0
                found.append(Overuse(instance, rss, limit))
        self.counts = counts  # instances gone since are forgotten
        return found
