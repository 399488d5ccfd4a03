"""A load run's requests split by time window (steady, upgrading, control), and the figures of a window."""

from __future__ import annotations

import bisect
import statistics
from collections import Counter
from typing import Any

from supervisor.testing.loadgen import KEEPALIVE_RESET, LoadStats


def percentile_ms(ordered: list[float], percent: float) -> float | None:
    """Nearest-rank percentile of sorted seconds, in ms (as loadgen does)."""
    if not ordered:
        return None
    rank = max(1, min(len(ordered), int(-(-len(ordered) * percent // 100))))
    return round(ordered[rank - 1] * 1000, 3)


class Samples:
    """A load run's requests sorted by start time, to select the ones started inside time windows."""

    def __init__(self, stats: LoadStats) -> None:
        order = sorted(range(len(stats.samples)), key=lambda i: stats.samples[i][0])
        self.starts = [stats.samples[i][0] for i in order]
        self.latencies = [stats.samples[i][1] for i in order]
        self.kinds = [stats.kinds[i] for i in order]
        self.done_ok = sorted(s + lat for s, lat, ok in stats.samples if ok)
        self.stats = stats

    def indexes(self, windows: list[tuple[float, float]]) -> list[int]:
        found: list[int] = []
        for begin, end in windows:
            found.extend(range(bisect.bisect_left(self.starts, begin), bisect.bisect_left(self.starts, end)))
        return found

    def longest_gap(self, windows: list[tuple[float, float]]) -> float:
        """Longest time inside the windows during which no request completed successfully (seconds)."""
        longest = 0.0
        for begin, end in windows:
            inside = self.done_ok[bisect.bisect_left(self.done_ok, begin): bisect.bisect_right(self.done_ok, end)]
            points = [begin, *inside, end]
            longest = max(longest, max(b - a for a, b in zip(points, points[1:])))
        return longest

    def summary(self, windows: list[tuple[float, float]]) -> dict[str, Any]:
        picked = self.indexes(windows)
        seconds = sum(end - begin for begin, end in windows)
        latencies = sorted(self.latencies[i] for i in picked if self.kinds[i] is None)
        errors = Counter(self.kinds[i] for i in picked if self.kinds[i] is not None)
        resets = errors.pop(KEEPALIVE_RESET, 0)
        return {
            "requests": len(picked),
            "ok": len(latencies),
            "failed": sum(errors.values()),
            "errors": dict(sorted(errors.items())),
            "keepalive_resets": resets,
            "seconds": round(seconds, 3),
            "rps": round(len(picked) / seconds, 1) if seconds > 0 else None,
            "p50_ms": percentile_ms(latencies, 50),
            "p90_ms": percentile_ms(latencies, 90),
            "p99_ms": percentile_ms(latencies, 99),
            "max_ms": percentile_ms(latencies, 100),
            "longest_gap_ms": round(self.longest_gap(windows) * 1000, 3) if windows else None,
        }


def spread(values: list[float | None], scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
    present = sorted(v * scale for v in values if v is not None)
    if not present:
        return {"n": 0, "median": None, "p90": None, "max": None, "min": None}
    return {"n": len(present), "min": round(present[0], digits), "median": round(statistics.median(present), digits),
            "p90": round(present[max(0, -(-len(present) * 9 // 10) - 1)], digits), "max": round(present[-1], digits)}


def divided(a: float | None, b: float | None) -> float | None:
    """a / b to 3 decimals (a ratio of two figures); None when either is missing or b is 0."""
    return None if a is None or not b else round(a / b, 3)
