"""What a --ready value says: the probe's kind and where it points, parsed and checked without starting anything
(config.py and schema.py read it; probes.py runs it)."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from .errors import UserError
from .units import parse_duration

_URL = re.compile(r"^(?P<scheme>https?|tcp)://(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/\[\]]*))(?::(?P<port>\d+))?(?P<path>/.*)?$")
KINDS = ("http", "tcp", "notify", "exec", "delay")
_FORMS = "http, http/PATH, http://HOST:PORT/PATH, tcp, tcp://HOST:PORT, notify, exec:COMMAND, delay:DURATION"
_NEAR_MISS = re.compile(r"(?P<kind>[A-Za-z]+)[\s:=/]*(?P<rest>.*)", re.DOTALL)


@dataclass(frozen=True)
class ProbeSpec:
    """A parsed --ready value. `strict` is False only for the default probe (a 404 then means "no endpoint")."""

    kind: str
    text: str
    host: str | None = None
    port: int | None = None
    path: str = "/readyz"
    command: str | None = None
    seconds: float = 0.0
    strict: bool = True


DEFAULT_PROBE = ProbeSpec("http", "http (default: /readyz on the first TCP listener)", strict=False)
NO_LISTENER_PROBE = ProbeSpec("delay", "delay:1s (default without a TCP listener)", seconds=1.0)


def parse_probe(text: str) -> ProbeSpec:
    """Parse `http[://HOST:PORT][/PATH]`, `tcp[://HOST:PORT]`, `notify`, `exec:COMMAND`, `delay:DURATION`."""
    value = text.strip()
    if value in ("http", "tcp", "notify"):
        return ProbeSpec(value, value)
    if value.startswith("exec:"):
        command = value[5:].strip()
        if not command:
            raise UserError(f"invalid --ready {text!r}: exec: needs a command, like exec:/usr/local/bin/check")
        return ProbeSpec("exec", value, command=command)
    if value.startswith("delay:"):
        return ProbeSpec("delay", value, seconds=parse_duration(value[6:], "--ready delay"))
    if value.startswith(("http:/", "http/")) and not value.startswith("http://"):
        return ProbeSpec("http", value, path="/" + value.split("/", 1)[1].lstrip("/"))
    match = _URL.match(value)
    if match:
        if match.group("scheme") == "https":
            raise UserError(f"invalid --ready {text!r}: https probes are not supported; probe the plain listener")
        host = match.group("v6") or match.group("host") or None
        port = int(match.group("port")) if match.group("port") else None
        if port is not None and not 0 < port < 65536:
            raise UserError(f"invalid --ready {text!r}: port {port} is out of range")
        kind = match.group("scheme")
        if kind == "tcp" and match.group("path"):
            raise UserError(f"invalid --ready {text!r}: a tcp probe takes no path")
        return ProbeSpec(kind, value, host=host, port=port, path=match.group("path") or "/readyz")
    kind = value.split(":", 1)[0]
    hint = spelling(value)
    why = (f"did you mean {hint!r}?" if hint else f"not a form of the {kind} probe" if kind in KINDS
           else f"unknown probe kind {kind!r}")
    raise UserError(f"invalid --ready {text!r}: {why} (forms: {_FORMS})")


def spelling(value: str) -> str | None:
    """The --ready value a near miss meant: `http:healthz` → `http/healthz`, `tcp:8080` → `tcp://127.0.0.1:8080`,
    `exec ./check` → `exec:./check`, `/healthz` → `http/healthz`, `htp/readyz` → `http/readyz`; None when nothing
    close is known."""
    if value.startswith("/"):
        return "http" + value
    match = _NEAR_MISS.fullmatch(value)
    close = difflib.get_close_matches(match.group("kind").lower(), KINDS, n=1, cutoff=0.6) if match else []
    if not match or not close:
        return None
    kind, rest = close[0], match.group("rest").strip()
    if kind == "notify" or not rest:
        return kind if kind in ("notify", "http", "tcp") else None
    if kind in ("exec", "delay"):
        return f"{kind}:{rest}"
    if re.fullmatch(r"\d+(/.*)?", rest):  # a port: `tcp:8080`, `http:8080/healthz`
        return f"{kind}://127.0.0.1:{rest}"
    if re.fullmatch(r"[\w.-]+:\d+(/.*)?", rest):  # a host and port
        return f"{kind}://{rest}"
    return f"http/{rest}" if kind == "http" else None
