"""`supervise ctl logs`: the last lines each instance wrote (--child-output prefix), and new ones as they come.

The supervisor keeps the last lines of every living instance and of the most recent failed ones; `GET /logs`
answers them with a number for each line. Following (-f) asks again every FOLLOW_INTERVAL for the lines after
the last one seen: simple, and it carries on across a re-exec of the supervisor (its socket stays; a request cut
by the exec is asked again). A follower sees what is kept from one poll to the next: an instance that writes
more than its ring holds within FOLLOW_INTERVAL has its older lines on the log only.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any, Protocol
from urllib.parse import urlencode

import click

from ..errors import UserError
from ..events import text_stamp

FOLLOW_INTERVAL = 0.25  # seconds between two polls of -f
LOST_GRACE = 10.0  # -f keeps asking this long when the supervisor does not answer (a re-exec takes about a second)


class _Endpoint(Protocol):
    """What this verb needs of client.Endpoint (not imported: client imports this module)."""

    def request(self, method: str, target: str, *, stream: bool = False) -> http.client.HTTPResponse: ...
    def json(self, response: http.client.HTTPResponse) -> dict[str, Any]: ...


class _Target(Protocol):
    def endpoint(self) -> _Endpoint: ...


class NotCaptured(UserError):
    """The supervisor passes the children's output through (--child-output inherit): it keeps no lines."""

    exit_code = 1


def line_text(line: dict[str, Any]) -> str:
    """`12:00:01.234 [gen 2 #0 pid 4242] text`, as the supervisor logs it."""
    stamp = text_stamp(float(line.get("ts") or 0))
    return f"{stamp} [gen {line.get('gen')} #{line.get('instance')} pid {line.get('pid')}] {line.get('msg', '')}"


def _fetch(endpoint: _Endpoint, query: dict[str, int | None]) -> dict[str, Any]:
    given = {name: value for name, value in query.items() if value is not None}
    answer = endpoint.json(endpoint.request("GET", "/logs?" + urlencode(given)))
    if not answer.get("capture", True):
        raise NotCaptured("the supervisor does not capture the children's output (--child-output inherit): their "
                          "lines went to its own stdout and stderr")
    return answer


def _show(lines: list[dict[str, Any]], as_json: bool, after: int) -> int:
    """Print lines newer than `after`; the number of the last one printed."""
    for line in lines:
        seq = int(line.get("seq") or 0)
        if seq > after:
            click.echo(json.dumps(line) if as_json else line_text(line))
            after = seq
    return after


def _follow(target: _Target, query: dict[str, int | None], as_json: bool, after: int) -> int:
    lost_since: float | None = None
    while True:
        time.sleep(FOLLOW_INTERVAL)
        try:
            answer = _fetch(target.endpoint(), {**query, "after": after, "lines": 10000})
        except NotCaptured:
            raise
        except UserError:  # unreachable for a moment (a re-exec), or an answer cut short
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > LOST_GRACE:
                raise
            continue
        lost_since = None
        after = _show(answer.get("lines") or [], as_json, after)


@click.command()
@click.option("--gen", type=click.IntRange(min=1), metavar="N", help="Only generation N.")
@click.option("--instance", type=click.IntRange(min=0), metavar="I", help="Only instance I (SUPERVISE_INSTANCE).")
@click.option("-n", "--lines", "count", type=click.IntRange(min=0), default=50, show_default=True, metavar="LINES",
              help="How many of the last lines to print.")
@click.option("-f", "--follow", is_flag=True, help="Then print new lines as they come, until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: seq, ts, gen, instance, pid, "
              "stream, msg.")
@click.pass_obj
def logs(target: _Target, gen: int | None, instance: int | None, count: int, follow: bool, as_json: bool) -> int:
    """The last lines the server's instances wrote to stdout and stderr (--child-output prefix): those of every
    living generation and of the most recent failed instances, oldest first.
    """
    query: dict[str, int | None] = {"gen": gen, "instance": instance}
    answer = _fetch(target.endpoint(), {**query, "lines": count})
    after = _show(answer.get("lines") or [], as_json, 0)
    if not follow:
        return 0
    try:
        _follow(target, query, as_json, max(after, int(answer.get("seq") or 0)))
    except KeyboardInterrupt:
        return 0
    return 0
