"""`supervise ctl`: talk to a running supervisor through its control socket.

Standard library only (plus click, already loaded by the command line): a ctl command is often run in a
deploy script or a shell loop, so it must start fast and must not pull in the supervisor's runtime (aiohttp,
anyio). HTTP/1.1 over an AF_UNIX socket with http.client.

Exit codes: 0 done (upgrade promoted); 1 the supervisor answered with a failure (rolled back, refused, any
non-2xx answer such as an unknown signal or a stop in progress); 2 bad usage of ctl itself (unknown flag,
--name with --control, several supervisors and none chosen); 3 no supervisor to talk to (no socket, nothing
listening on it, permission denied, connection lost); 130 interrupted.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

import click

from ..counted import inflected
from ..errors import UserError
from ..names import check_name
from .logs import logs
from .render import describe_event, pid_list, plan_lines, status_lines, verdict_line
from .signal_outcome import outcome

CONNECT_TIMEOUT = 5.0  # a live supervisor accepts at once; a wedged one must not hang a deploy script
ANSWER_TIMEOUT = 30.0  # longest wait for a non-streamed answer
PROG = "supervise ctl"

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


class CtlError(UserError):
    """The supervisor refused or failed what was asked; reported as one line."""

    exit_code = EXIT_FAILED


class Unreachable(UserError):
    """There is no supervisor to talk to at the socket (or it went away mid-answer)."""

    exit_code = EXIT_UNREACHABLE


# -- transport ----------------------------------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a unix stream socket instead of a TCP host."""

    def __init__(self, socket_path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        """Connect with CONNECT_TIMEOUT, then read with the connection's own timeout (None for streams)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(self.socket_path)
            sock.settimeout(self.timeout)
        except OSError:
            sock.close()
            raise
        self.sock = sock


_UNREACHABLE_REASONS = {
    errno.ENOENT: "no such socket (is it running?)",
    errno.ECONNREFUSED: "connection refused (stale socket: the supervisor is gone)",
    errno.EACCES: "permission denied connecting (run as the supervisor's user or root)",
    errno.ENOTSOCK: "not a socket",
}


def _unreachable(path: Path, exc: OSError) -> Unreachable:
    """The one line that says why the socket at `path` cannot be used."""
    if isinstance(exc, TimeoutError):
        reason = "timed out (the supervisor does not answer)"
    else:
        reason = _UNREACHABLE_REASONS.get(exc.errno or 0) or exc.strerror or str(exc) or type(exc).__name__
    return Unreachable(f"cannot reach supervisor at {path}: {reason}")


@dataclass(frozen=True)
class Endpoint:
    """The control socket of one supervisor."""

    path: Path

    def request(self, method: str, target: str, *, stream: bool = False) -> http.client.HTTPResponse:
        """Send one request and return the response with its head read; a stream's body has no read timeout."""
        connection = UnixHTTPConnection(str(self.path), None if stream else ANSWER_TIMEOUT)
        try:
            connection.request(method, target, headers={"Accept": "application/json, application/x-ndjson, text/plain"})
            return connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise self.lost(exc) from None

    def lost(self, exc: Exception) -> Unreachable:
        """The error for a failed connection or an answer cut short."""
        if isinstance(exc, OSError) and not isinstance(exc, http.client.RemoteDisconnected):
            return _unreachable(self.path, exc)
        return Unreachable(f"connection to supervisor at {self.path} lost: {exc or type(exc).__name__}")

    def read(self, response: http.client.HTTPResponse) -> bytes:
        """The whole body of a non-streamed answer."""
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self.lost(exc) from None

    def json(self, response: http.client.HTTPResponse) -> dict[str, Any]:
        """The JSON object of an answer; a non-2xx answer becomes a CtlError with the server's message."""
        body = self.read(response)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not 200 <= response.status < 300:
            raise CtlError(_error_text(response, data, body))
        if not isinstance(data, dict):
            raise CtlError(f"unexpected answer from the supervisor (HTTP {response.status}): {_excerpt(body)}")
        return data

    def lines(self, response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
        """The objects of an NDJSON stream, each as soon as its line arrives."""
        try:
            for raw in response:
                line = raw.strip()
                if not line:
                    continue
                try:
                    item = json.loads(line)
                except ValueError:
                    raise CtlError(f"unexpected line from the supervisor: {_excerpt(line)}") from None
                if isinstance(item, dict):
                    yield item
        except (OSError, http.client.HTTPException) as exc:
            raise self.lost(exc) from None

    def check(self, response: http.client.HTTPResponse) -> None:
        """Fail with the server's message unless the answer is 2xx (for answers whose body is read later)."""
        if not 200 <= response.status < 300:
            self.json(response)


def _error_text(response: http.client.HTTPResponse, data: Any, body: bytes) -> str:
    """The server's `error` message, or the HTTP status line when the body has none."""
    if isinstance(data, dict) and data.get("error"):
        return str(data["error"])
    return f"HTTP {response.status} {response.reason}" + (f": {_excerpt(body)}" if body.strip() else "")


def _excerpt(body: bytes, limit: int = 200) -> str:
    text = body.decode(errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


SYSTEM_RUNTIME_DIR = Path("/run/supervise")

# -- finding the supervisor ---------------------------------------------------------------------------------


def find_socket(name: str | None, control: Path | None) -> Path:
    """The control socket: --control, else NAME.sock in the runtime dir, else the only socket there."""
    if control is not None:
        return control
    from ..config import default_runtime_dir  # not at module level: it imports the probes (asyncio)

    directories = [default_runtime_dir()]
    if os.geteuid() == 0 and SYSTEM_RUNTIME_DIR not in directories:
        directories.append(SYSTEM_RUNTIME_DIR)  # a root login shell with XDG_RUNTIME_DIR set, a system unit without
    if name is not None:
        check_name(name)  # a single safe file name: `--name ../x` must not reach outside the runtime dir
        return next((path for directory in directories if (path := directory / f"{name}.sock").exists()),
                    directories[0] / f"{name}.sock")
    found = sorted(path for directory in directories for path in directory.glob("*.sock"))
    where = " or ".join(map(str, directories))
    if len(found) == 1:
        return found[0]
    if not found:
        raise Unreachable(f"no supervisor found in {where}; pass --name or --control")
    raise UserError(f"several supervisors in {where} ({', '.join(path.stem for path in found)}); pass --name")


@dataclass(frozen=True)
class Target:
    """What the group options said; the socket is looked up only when a verb needs it."""

    name: str | None
    control: Path | None

    def endpoint(self) -> Endpoint:
        return Endpoint(find_socket(self.name, self.control))


# -- verbs --------------------------------------------------------------------------------------------------


def follow_rollout(endpoint: Endpoint, response: http.client.HTTPResponse) -> int:
    """Print a rollout's progress events as they arrive, then its verdict; 0 if it did what was asked (`ok`)."""
    endpoint.check(response)
    for event in endpoint.lines(response):
        if event.get("event") == "verdict":
            if event.get("blame"):
                click.echo(str(event["blame"]))
            if event.get("output"):
                click.echo("last output of the failed instance:")
                click.echo("\n".join(f"  {line}" for line in event["output"]))
            click.echo(verdict_line(event))
            return 0 if event.get("ok", event.get("result") == "promoted") is True else EXIT_FAILED
        if event.get("level") != "debug":
            click.echo(describe_event(event))
    raise CtlError("the supervisor ended the stream without a verdict (is it stopping?)")


class CtlGroup(click.Group):
    """A click group that reports errors as `supervise ctl: error: ...` and exits with the verb's code."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> NoReturn:  # type: ignore[override]
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args=args, prog_name=prog_name or PROG, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except UserError as exc:
            _fail(str(exc), exc.exit_code)
        sys.exit(code or 0)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"{PROG}: error: {message}", err=True)
    sys.exit(code)


@click.group(cls=CtlGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--name", metavar="NAME", help="The supervisor started with --name NAME (its socket in the runtime dir).")
@click.option("--control", type=click.Path(path_type=Path, readable=False), metavar="PATH",
              help="The supervisor's control socket. Default: the only socket in $XDG_RUNTIME_DIR/supervise "
                   "(/run/supervise as root).")
@click.pass_context
def ctl(context: click.Context, name: str | None, control: Path | None) -> None:
    """Ask a running supervisor what is running, or tell it to upgrade, roll back, stop or signal.

    Exit codes: 0 done; 1 refused or failed (upgrade rolled back, error from the supervisor);
    2 bad usage; 3 no supervisor reachable.
    """
    if name is not None and control is not None:
        raise click.UsageError("pass --name or --control, not both")
    context.obj = Target(name, control)


@ctl.command()
@click.option("--json", "as_json", is_flag=True, help="The status as the API returns it, for scripts.")
@click.pass_obj
def status(target: Target, as_json: bool) -> int:
    """What is running: the supervisor, each generation, the current rollout, recent history, workers."""
    endpoint = target.endpoint()
    data = endpoint.json(endpoint.request("GET", "/status"))
    click.echo(json.dumps(data, indent=2) if as_json else "\n".join(status_lines(data)))
    return 0


@ctl.command()
@click.option("--no-wait", is_flag=True, help="Return as soon as the supervisor accepted the request.")
@click.option("--dry-run", is_flag=True, help="Print what the upgrade would do, and do nothing.")
@click.option("--force", is_flag=True, help="Upgrade even to a release that is known bad (it failed before).")
@click.pass_obj
def upgrade(target: Target, no_wait: bool, dry_run: bool, force: bool) -> int:
    """Start a new generation and replace the serving one if it proves ready (like SIGHUP).

    Progress is printed as it happens; exit 0 when the new generation is promoted, 1 when it was rolled back
    or refused, with the reason.
    """
    endpoint = target.endpoint()
    query: dict[str, str] = {"wait": "0" if no_wait or dry_run else "1"}
    if dry_run:
        query["dry_run"] = "1"
    if force:
        query["force"] = "1"
    response = endpoint.request("POST", "/upgrade?" + urlencode(query), stream=not (no_wait or dry_run))
    if dry_run:
        return _show_plan(endpoint.json(response).get("plan") or {}, force)
    if no_wait:
        return _show_accepted(endpoint.json(response))
    return follow_rollout(endpoint, response)


def _show_plan(plan: dict[str, Any], force: bool) -> int:
    click.echo("\n".join(plan_lines(plan)))
    if plan.get("error"):
        return EXIT_FAILED
    if plan.get("known_bad") and not force:
        click.echo("this release is known bad: the upgrade would be refused (pass --force to run it anyway)")
        return EXIT_FAILED
    return 0


def _show_accepted(answer: dict[str, Any]) -> int:
    click.echo("upgrade accepted" + (" (coalesced with the one already pending)" if answer.get("coalesced") else ""))
    return 0


@ctl.command()
@click.pass_obj
def rollback(target: Target) -> int:
    """Undo the last upgrade: drop the new generation during its watch window, or re-deploy the previous one.

    Exit 0 when the previous release is serving again, 1 when that was refused or failed.
    """
    endpoint = target.endpoint()
    code = follow_rollout(endpoint, endpoint.request("POST", "/rollback", stream=True))
    if code:
        click.echo("rollback failed: the previous release is not serving")
    return code


@ctl.command()
@click.option("--timeout", type=click.FloatRange(1, 600), default=60.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the new image to answer.")
@click.pass_obj
def reexec(target: Target, timeout: float) -> int:
    """Replace the running supervisor with the supervise installed now, in the same pid: the children, their
    sockets and every generation carry over (after a package upgrade; no restart of the service).

    The new supervise is first run in a check mode; a broken install is refused and the old one goes on.
    Exit 0 once the new image answers, 1 when refused.
    """
    endpoint = target.endpoint()
    before = endpoint.json(endpoint.request("GET", "/status")).get("supervisor") or {}
    response = endpoint.request("POST", "/reexec", stream=True)
    endpoint.check(response)
    try:
        for line in endpoint.lines(response):  # one line, then the old image's end of the connection
            if line.get("error"):
                raise CtlError(str(line["error"]))
            click.echo(str(line.get("message")))
    except Unreachable:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            now = endpoint.json(endpoint.request("GET", "/status")).get("supervisor") or {}
        except (Unreachable, CtlError):
            now = {}
        if len(now.get("reexecs") or ()) > len(before.get("reexecs") or ()):
            click.echo(f"re-executed: supervise {before.get('version')} → {now.get('version')} "
                       f"in pid {now.get('pid')}")
            return 0
        time.sleep(0.1)
    raise CtlError(f"the supervisor did not answer as the new image within {timeout:g}s")


@ctl.command()
@click.pass_obj
def stop(target: Target) -> int:
    """Drain every generation and make the supervisor exit (like SIGTERM); returns at once."""
    endpoint = target.endpoint()
    endpoint.json(endpoint.request("POST", "/stop"))
    click.echo("stopping")
    return 0


@ctl.command(name="signal")
@click.argument("sig", metavar="SIG")
@click.pass_obj
def send_signal(target: Target, sig: str) -> int:
    """Send SIG (USR1, SIGUSR1 or a number) to the serving generation's process group, and say whether it ended
    them (waiting half a second at most)."""
    endpoint = target.endpoint()
    answer = endpoint.json(endpoint.request("POST", "/signal/" + quote(sig, safe="")))
    pids = [pid for pid in answer.get("pids") or [] if isinstance(pid, int)]
    click.echo(f"sent {answer.get('signal', sig)} to generation {answer.get('gen', '?')} (pids {pid_list(pids)}); "
               + outcome(pids))
    return 0


@ctl.command()
@click.argument("count", type=click.IntRange(min=1), metavar="N")
@click.option("--no-wait", is_flag=True, help="Return as soon as the supervisor accepted the request.")
@click.pass_obj
def scale(target: Target, count: int, no_wait: bool) -> int:
    """Run N instances of the serving generation: new ones start and must become ready, extra ones drain.

    Exit 0 once N instances are ready, 1 if they are not (see `supervise ctl status` and the log for why). The
    number holds until the supervisor exits; --processes (or the config file) applies again after a restart.
    """
    endpoint = target.endpoint()
    answer = endpoint.json(endpoint.request("POST", f"/scale/{count}" + ("?wait=0" if no_wait else "")))
    click.echo(answer.get("message", f"scaling to {count}"))
    if no_wait:
        return 0
    wanted = answer.get("processes", count)
    instances = inflected("instance", wanted if isinstance(wanted, int) else 0)
    click.echo(f"generation {answer.get('gen', '?')}: {answer.get('ready', '?')} of {wanted} {instances} ready (pids "
               f"{pid_list(answer.get('pids'))})")
    return 0 if answer.get("done") else EXIT_FAILED


@ctl.command()
@click.option("--json", "as_json", is_flag=True, help="Print the events as NDJSON, every level included.")
@click.pass_obj
def events(target: Target, as_json: bool) -> int:
    """Follow the supervisor's events live until Ctrl-C (or until the supervisor stops)."""
    endpoint = target.endpoint()
    response = endpoint.request("GET", "/events", stream=True)
    endpoint.check(response)
    try:
        for event in endpoint.lines(response):
            if as_json:
                click.echo(json.dumps(event))
            elif event.get("level") != "debug":
                click.echo(describe_event(event))
    except KeyboardInterrupt:
        return 0
    return 0


@ctl.command()
@click.pass_obj
def metrics(target: Target) -> int:
    """The Prometheus text exposition, as a scraper would see it."""
    endpoint = target.endpoint()
    response = endpoint.request("GET", "/metrics")
    endpoint.check(response)
    click.echo(endpoint.read(response).decode(errors="replace"), nl=False)
    return 0


ctl.add_command(logs)
