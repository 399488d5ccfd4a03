"""Units an operator types: durations (`250ms`, `5s`, `2m`), sizes (`512M`, `2G`) and signal names (`TERM`, `SIGUSR1`,
`15`)."""

from __future__ import annotations

import math
import re
import signal

from .errors import UserError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNIT_BYTES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds from `250ms`, `5s`, `2m`, `1h` or bare seconds (`1.5`)."""
    match = _DURATION.match(str(text))
    if not match:
        raise UserError(f"invalid {what} {text!r}: expected a number with an optional unit, like 250ms, 5s, 2m")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds):
        raise UserError(f"invalid {what} {str(text)[:40]!r}: too large")
    return seconds


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from `512M`, `2G`, `1500000K`, `1.5G` or bare bytes; K, M, G, T are powers of 1024 (like `ps` and
    systemd's MemoryMax=), with an optional `B` or `iB` (`512MiB`)."""
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"invalid {what} {str(text)[:40]!r}: expected a number with an optional unit, like 512M, 2G")
    size = float(match.group(1)) * _UNIT_BYTES[match.group(2).lower()]
    if not math.isfinite(size):
        raise UserError(f"invalid {what} {str(text)[:40]!r}: too large")
    return int(size)


def mib(size: int) -> str:
    """A size for people: `612 MiB`, `1.5 GiB`, `16 TiB`."""
    if size >= 1 << 40:
        return f"{size / (1 << 40):.4g} TiB"
    if size >= 10 << 30:
        return f"{size / (1 << 30):.0f} GiB"
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f} GiB"
    return f"{size / (1 << 20):.0f} MiB"


def parse_signal(text: str) -> signal.Signals:
    """A signal from `TERM`, `SIGTERM`, `sigterm` or `15`."""
    name = str(text).strip().upper()
    try:
        if name.isdigit():
            return signal.Signals(int(name))
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise UserError(f"unknown signal {text!r}: use a name like TERM, INT, QUIT, USR1 or a number") from None
