"""Readiness and health probes: one small class per kind, one parser.

A verdict must be about the generation under test. The http and tcp probes therefore only count a connection
that a process of that generation accepted (see attribution.py); one taken by the old generation through the
shared socket is INCONCLUSIVE, never READY. Where connections are steered (traffic.py), a probe's connection is
sent to the socket of the generation under test by its source port, and the attribution only confirms it.
"""

from __future__ import annotations

import asyncio
import enum
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from . import attribution
from .errors import UserError
from .probe_spec import ProbeSpec

_HTTP_STATUS = re.compile(rb"^HTTP/\d(?:\.\d)? (\d{3})")


class Verdict(enum.Enum):
    READY = "ready"
    NOT_READY = "not-ready"
    INCONCLUSIVE = "inconclusive"  # answered by someone else: says nothing about this generation


@dataclass(frozen=True)
class Result:
    """One probe attempt's outcome and a short human detail (`HTTP 200`, `connection refused`); `pid` is the
    process that accepted the probe's connection, when a connection probe could tell."""

    verdict: Verdict
    detail: str
    pid: int | None = None

    @property
    def ready(self) -> bool:
        return self.verdict is Verdict.READY


_NOTHING_YET = {
    "http": "no answer yet",
    "tcp": "no connection accepted yet",
    "notify": "no READY=1 received",
    "exec": "the command has not succeeded yet",
    "delay": "not alive long enough yet",
}


def nothing_yet(spec: ProbeSpec) -> Result:
    """The verdict to report when not a single attempt has completed."""
    return Result(Verdict.NOT_READY, _NOTHING_YET[spec.kind])


class Subject(Protocol):
    """What a probe needs to know about the generation under test."""

    number: int
    started_at: float
    ready_signal: anyio.Event

    def pids(self, fresh: bool = False) -> Sequence[int]: ...
    @property
    def notified_ready(self) -> bool: ...
    @property
    def notified_stopping(self) -> bool: ...
    @property
    def leader(self) -> int: ...


class Probe(Protocol):
    @property
    def spec(self) -> ProbeSpec: ...

    async def check(self, subject: Subject) -> Result: ...


class Route(Protocol):
    """Steers a probe's connection to the socket of the generation under test (traffic.py)."""

    def probe_port(self, sock: socket.socket, host: str, port: int, number: int) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class Target:
    """Where a network probe connects, whether that address is one of our listeners (which any generation may
    answer), and how its connections are steered to the generation under test, if they can be."""

    host: str
    port: int
    shared: bool
    route: Route | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Accepted:
    """A probe connection a process of the subject accepted (`pid`, if attributed); the caller closes it."""

    sock: socket.socket
    pid: int | None = None


async def _connect(target: Target, subject: Subject, timeout: float) -> Accepted | Result:
    """A connection accepted by `subject`, or the Result saying why there is none.

    The socket is closed on every way out but success, cancellation included: a probe cancelled because its
    cohort settled must not leave the server holding an accepted connection that never sends a request
    (a server waits for that request while draining, so the leak would cost a whole drain timeout)."""
    family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        with target.route.probe_port(sock, target.host, target.port, subject.number) if target.route else nullcontext():
            outcome = await _accepted_by(sock, target, subject, timeout)
    except BaseException:
        sock.close()
        raise
    if isinstance(outcome, Result):
        sock.close()
        return outcome
    return Accepted(sock, outcome)


async def _accepted_by(sock: socket.socket, target: Target, subject: Subject, timeout: float) -> int | None | Result:
    """Connect `sock`; the pid of the subject's process that accepted it (None: not attributable), or the
    Result saying why the connection proves nothing about the subject."""
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (target.host, target.port))
    except OSError as exc:
        return Result(Verdict.NOT_READY, f"cannot connect to {target}: {exc.strerror or exc}")
    if not target.shared or not attribution.available():
        return None
    inode = await _accepted_inode(sock, timeout)
    if not inode:
        return Result(Verdict.NOT_READY, f"connection to {target} not accepted by any process")
    try:
        owner = attribution.owner(inode, subject.pids())
        if owner is None:
            await anyio.sleep(0.001)  # the fd is installed just after the socket gets its inode; workers may be new
            owner = attribution.owner(inode, subject.pids(fresh=True))
    except PermissionError as exc:
        return Result(Verdict.NOT_READY, f"cannot tell which process accepted the probe: {exc.filename}: permission "
                                         "denied (needs CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH)")
    if owner is None:
        return Result(Verdict.INCONCLUSIVE, f"connection to {target} was accepted by another generation (or by "
                                            "an instance not under test)")
    return owner


async def _accepted_inode(sock: socket.socket, timeout: float) -> int | None:
    """Wait until some process accepts our connection; the server-side socket's inode, or None on timeout."""
    delay = 0.0005
    with anyio.move_on_after(timeout):
        while True:
            inode = attribution.server_side_inode(sock)
            if inode:
                return inode
            if inode is None:
                return None
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.01)
    return None


async def _http_status(sock: socket.socket, host: str, path: str) -> int | None:
    """Send one GET and return the response's status code (None if the reply is not HTTP)."""
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: supervise-probe\r\nConnection: close\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    received = b""
    while b"\r\n" not in received and len(received) < 8192:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            break
        received += chunk
    match = _HTTP_STATUS.match(received)
    return int(match.group(1)) if match else None


@dataclass
class HttpProbe:
    """GET a path; 2xx/3xx is ready. The default (non-strict) probe takes 404 as "no endpoint, but serving"."""

    spec: ProbeSpec
    target: Target
    timeout: float
    on_lenient: Callable[[int], None] | None = None

    async def check(self, subject: Subject) -> Result:
        with anyio.move_on_after(self.timeout):
            accepted = await _connect(self.target, subject, self.timeout)
            if isinstance(accepted, Result):
                return accepted
            pid = accepted.pid
            try:
                status = await _http_status(accepted.sock, self.target.host, self.spec.path)
            except OSError as exc:
                return Result(Verdict.NOT_READY, f"GET {self.spec.path}: {exc.strerror or exc}", pid)
            finally:
                accepted.sock.close()
            if status is None:
                return Result(Verdict.NOT_READY, f"GET {self.spec.path}: no HTTP response", pid)
            if 200 <= status < 400:
                return Result(Verdict.READY, f"HTTP {status}", pid)
            if status == 404 and not self.spec.strict:
                if self.on_lenient:
                    self.on_lenient(subject.number)
                return Result(Verdict.READY, "HTTP 404 (no readiness endpoint; serving)", pid)
            return Result(Verdict.NOT_READY, f"HTTP {status}", pid)
        return Result(Verdict.NOT_READY, f"GET {self.spec.path}: no answer within {self.timeout:g}s")


@dataclass
class TcpProbe:
    """A connection accepted by the generation is ready."""

    spec: ProbeSpec
    target: Target
    timeout: float

    async def check(self, subject: Subject) -> Result:
        with anyio.move_on_after(self.timeout):
            accepted = await _connect(self.target, subject, self.timeout)
            if isinstance(accepted, Result):
                return accepted
            accepted.sock.close()
            return Result(Verdict.READY, f"accepted on {self.target}", accepted.pid)
        return Result(Verdict.NOT_READY, f"connection to {self.target} not accepted within {self.timeout:g}s")


@dataclass
class NotifyProbe:
    """READY=1 from a process of the generation on its private NOTIFY_SOCKET; healthy until STOPPING=1."""

    spec: ProbeSpec
    timeout: float

    async def check(self, subject: Subject) -> Result:
        if not subject.notified_ready:
            with anyio.move_on_after(self.timeout):
                await subject.ready_signal.wait()  # wakes the moment READY=1 arrives: no polling delay
        if subject.notified_stopping:
            return Result(Verdict.NOT_READY, "sent STOPPING=1")
        if subject.notified_ready:
            return Result(Verdict.READY, "READY=1")
        return Result(Verdict.NOT_READY, "no READY=1 yet")


CommandRunner = Callable[[str, dict[str, str], float], Awaitable[str | None]]


@dataclass
class ExecProbe:
    """A command that exits 0 when the generation is ready; it gets SUPERVISE_PID and SUPERVISE_GENERATION."""

    spec: ProbeSpec
    timeout: float
    run: CommandRunner

    async def check(self, subject: Subject) -> Result:
        assert self.spec.command is not None
        env = {"SUPERVISE_PID": str(subject.leader), "SUPERVISE_GENERATION": str(subject.number)}
        failure = await self.run(self.spec.command, env, self.timeout)
        if failure is None:
            return Result(Verdict.READY, "exit 0")
        return Result(Verdict.NOT_READY, failure)


@dataclass
class DelayProbe:
    """Ready once the generation has stayed alive for a while (for servers that can signal nothing else)."""

    spec: ProbeSpec

    async def check(self, subject: Subject) -> Result:
        await anyio.sleep(max(0.0, subject.started_at + self.spec.seconds - anyio.current_time()))
        return Result(Verdict.READY, f"alive for {self.spec.seconds:g}s")


def build_probe(
    spec: ProbeSpec,
    default_target: tuple[str, int] | None,
    shared_ports: set[int],
    timeout: float,
    run: CommandRunner,
    on_lenient: Callable[[int], None] | None = None,
    route: Route | None = None,
) -> Probe:
    """A probe object for `spec`. `default_target` is the first TCP listener (as a local probe reaches it)."""
    if spec.kind in ("http", "tcp"):
        host, port = probe_target(spec, default_target)
        shared = port in shared_ports
        target = Target(_numeric_host(host), port, shared, route if shared else None)
        if spec.kind == "http":
            return HttpProbe(spec, target, timeout, on_lenient)
        return TcpProbe(spec, target, timeout)
    if spec.kind == "notify":
        return NotifyProbe(spec, timeout)
    if spec.kind == "exec":
        return ExecProbe(spec, timeout, run)
    return DelayProbe(spec)


def probe_target(spec: ProbeSpec, default_target: tuple[str, int] | None) -> tuple[str, int]:
    """Where an http or tcp probe connects: its own HOST:PORT, else the first TCP listener's (UserError if none)."""
    if spec.host is not None and spec.port is not None:
        return spec.host, spec.port
    if default_target is None:
        raise UserError(f"--ready {spec.text}: needs a TCP --listen to probe, or an explicit http://HOST:PORT/PATH")
    return spec.host or default_target[0], spec.port or default_target[1]


def _numeric_host(host: str) -> str:
    """Resolve a probe host once, at start-up, so no probe ever waits on DNS (or a resolver thread)."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return host
    except OSError:
        pass
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except socket.gaierror as exc:
        raise UserError(f"--ready: cannot resolve host {host!r}: {exc.strerror}") from None
