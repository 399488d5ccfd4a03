"""Units an operator types: durations (`250ms`, `5s`, `2m`) and signal names (`TERM`, `SIGUSR1`, `15`)."""

from __future__ import annotations

import math
import re
import signal

from .errors import UserError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds from `250ms`, `5s`, `2m`, `1h` or bare seconds (`1.5`)."""
    match = _DURATION.match(str(text))
    if not match:
        raise UserError(f"invalid {what} {text!r}: expected a number with an optional unit, like 250ms, 5s, 2m")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds):
        raise UserError(f"invalid {what} {str(text)[:40]!r}: too large")
    return seconds


def parse_signal(text: str) -> signal.Signals:
    """A signal from `TERM`, `SIGTERM`, `sigterm` or `15`."""
    name = str(text).strip().upper()
    try:
        if name.isdigit():
            return signal.Signals(int(name))
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise UserError(f"unknown signal {text!r}: use a name like TERM, INT, QUIT, USR1 or a number") from None
