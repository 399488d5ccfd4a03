"""The control API: HTTP/JSON over a unix socket, for our own user (or root) only.

The socket is bound at start-up — so a bad path fails early and clients can connect at once — but aiohttp is
imported and the server started only when the first connection arrives: a supervisor nobody queries stays
small and starts fast. The connection waits in the socket's backlog meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import struct
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ..counted import counted
from ..errors import UserError
from ..event_kinds import Kind
from ..events import LEVELS, Event, Events
from ..spawn import out_of_fds
from ..units import parse_signal
from . import views
from .admission import Admission
from .metrics import CONTENT_TYPE, render
from .plan import plan

if TYPE_CHECKING:
    from aiohttp import web

    from ..port import ControlPort
    from ..ticket import Ticket

_UCRED = struct.Struct("3i")
_MAX_BODY = 64 * 1024
_STREAM_BUFFER = 1000
NDJSON = "application/x-ndjson"
_FULL_PAUSE = 0.1  # accept() failed and no idle connection could be closed: try again after this long


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "0").lower() in ("1", "true", "yes")


def _number(request: web.Request, name: str) -> int | None:
    """A whole-number query parameter, None when absent; anything else is the client's error (400)."""
    text = request.query.get(name)
    if text is None:
        return None
    if not text.isdigit() or len(text) > 18:
        raise UserError(f"invalid {name} {text!r}: expected a whole number")
    return int(text)


def _default(value: int | None, default: int) -> int:
    return default if value is None else value


def _peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return None
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


@dataclass
class ControlServer:
    """Owns the control socket file and, once used, the aiohttp server behind it, which serves a ControlPort."""

    path: Path
    port: ControlPort | None = field(default=None, repr=False)  # given by serve()
    sock: socket.socket | None = None
    inode: tuple[int, int] | None = field(default=None, repr=False)
    admission: Admission = field(default_factory=Admission)
    _said_at: float = field(default=-1.0, repr=False)
    _unsaid: int = field(default=0, repr=False)

    def bind(self) -> None:
        """Create the socket, mode 0600 from the start (umask), refusing to steal a live supervisor's socket."""
        path = str(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.path.exists():
                self._remove_stale()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            previous = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(previous)
            sock.listen(64)
        except OSError as exc:
            raise UserError(f"cannot create control socket {path}: {exc.strerror or exc}") from None
        st = os.stat(path)
        self.sock, self.inode = sock, (st.st_dev, st.st_ino)

    def adopt(self, fd: int) -> None:
        """After a re-exec: the control socket the old image had bound and listened on, by its descriptor."""
        self.sock = socket.socket(fileno=fd)
        try:
            st = os.stat(self.path)
        except OSError:
            return  # removed meanwhile: the socket still serves whoever holds a path to it, and nothing is unlinked
        self.inode = (st.st_dev, st.st_ino)

    def _remove_stale(self) -> None:
        if not stat.S_ISSOCK(os.stat(self.path).st_mode):
            raise UserError(f"cannot create control socket {self.path}: the file exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(self.path))
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.path)
                return
        raise UserError(f"control socket {self.path} is in use by another supervisor: pass another --name or --control")

    async def serve(self, port: ControlPort) -> None:
        """Wait for the first client, then run the API of `port` until cancelled."""
        assert self.sock is not None
        self.port = port
        await anyio.wait_socket_readable(self.sock)
        from aiohttp import web

        app = web.Application(client_max_size=_MAX_BODY, middlewares=[self._guard])
        app.add_routes([
            web.get("/status", self._status),
            web.post("/upgrade", self._upgrade),
            web.post("/rollback", self._rollback),
            web.post("/stop", self._stop),
            web.post("/signal/{name}", self._signal),
            web.post("/scale/{count}", self._scale),
            web.post("/reexec", self._reexec),
            web.get("/events", self._events),
            web.get("/metrics", self._metrics),
            web.get("/logs", self._logs),
        ])
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await self._accept(runner.server)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await runner.cleanup()

    async def _accept(self, protocol: Callable[[], asyncio.Protocol]) -> None:
        """Accept connections for aiohttp ourselves, so that idle ones make way when fds run low (admission.py)."""
        assert self.sock is not None
        self.sock.setblocking(False)
        loop = asyncio.get_running_loop()
        while True:
            await anyio.wait_socket_readable(self.sock)
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:  # EMFILE/ENFILE, or a transient ENOBUFS/ENOMEM: never fatal to the supervisor
                if not (out_of_fds(exc) and self._shed(max(1, len(self.admission.opened) // 2), "no fd left to "
                                                       "accept a new one")):
                    await anyio.sleep(_FULL_PAUSE)  # the client waits in the backlog meanwhile
                continue
            try:
                transport, _ = await loop.connect_accepted_socket(protocol, conn)
            except OSError:  # the client is gone already
                conn.close()
                continue
            if closed := self.admission.admit(transport, conn.fileno()):
                self._said(closed, f"fds are running low (a new one got fd {conn.fileno()}, within the reserve kept "
                                   "for upgrades)")

    def _shed(self, count: int, why: str) -> int:
        closed = self.admission.shed(count)
        if closed:
            self._said(closed, why)
        return closed

    def _said(self, closed: int, why: str) -> None:
        """Say that connections were closed: at most once a second, with how many since it was last said."""
        self._unsaid += closed
        now = anyio.current_time()
        if now - self._said_at >= 1.0:
            self._port.events.emit(Kind.CONTROL_SHED,
                                   f"closed {counted(self._unsaid, 'idle control connection')}: {why}",
                                        level="warning", closed=self._unsaid, open=len(self.admission.opened))
            self._said_at, self._unsaid = now, 0

    @property
    def _port(self) -> ControlPort:
        assert self.port is not None, "serve() gives the port before any request can arrive"
        return self.port

    def close(self) -> None:
        """Remove the socket file (if it is still ours) and close the socket."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:
                os.unlink(self.path)
        except OSError:
            pass
        if self.sock is not None:
            self.sock.close()

    # -- middleware ---------------------------------------------------------------------------------------------

    @property
    def _guard(self) -> Callable[..., Any]:
        from aiohttp import web

        port, admission = self._port, self.admission

        @web.middleware
        async def guard(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
            uid = _peer_uid(request)
            if uid not in (os.getuid(), 0):
                port.events.emit(Kind.CONTROL_REFUSED, f"control request {request.method} {request.path} from uid "
                                       f"{uid} refused: only uid {os.getuid()} or root", level="warning", uid=uid)
                return _error(403, "permission denied: the control socket is for the supervisor's own user or root")
            if (request.content_length or 0) > _MAX_BODY:  # no handler reads a body: reject it before anything runs
                return _error(413, f"request body too large (limit {_MAX_BODY} bytes)")
            try:
                with admission.request(request.transport):
                    return await handler(request)
            except web.HTTPException as exc:
                return _error(exc.status, exc.reason)
            except UserError as exc:
                return _error(400, str(exc))

        return guard

    # -- handlers -----------------------------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.StreamResponse:
        return _json(views.status(self._port.snapshot()))

    async def _upgrade(self, request: web.Request) -> web.StreamResponse:
        force = _flag(request, "force")
        if _flag(request, "dry_run"):
            return _json({"plan": plan(await self._port.preview(force))})
        if request.query.get("wait", "1") in ("0", "false", "no"):
            ticket = self._port.request_upgrade("ctl upgrade", force=force)
            if ticket is None:
                return _error(409, "not accepted: the supervisor is stopping")
            return _json({"accepted": True, "coalesced": ticket.coalesced}, status=202)
        return await self._verdict_stream(request, lambda: self._port.request_upgrade("ctl upgrade", force=force),
                                          "not accepted: the supervisor is stopping")

    async def _rollback(self, request: web.Request) -> web.StreamResponse:
        return await self._verdict_stream(request, self._port.request_rollback, "nothing to roll back to")

    async def _stop(self, request: web.Request) -> web.StreamResponse:
        self._port.stop("ctl stop")
        return _json({"stopping": True}, status=202)

    async def _signal(self, request: web.Request) -> web.StreamResponse:
        signum = parse_signal(request.match_info["name"])
        target = self._port.send_signal(signum)
        if target is None:
            return _error(409, "no generation is serving")
        return _json({"signal": signum.name, "gen": target.number, "pids": list(target.pids)})

    async def _scale(self, request: web.Request) -> web.StreamResponse:
        text = request.match_info["count"]
        if not text.isdigit():
            raise UserError(f"invalid count {text!r}: expected a whole number of instances")
        port = self._port
        if port.snapshot(measure=False).supervisor.stopping:
            return _error(409, "not accepted: the supervisor is stopping")
        message = port.request_scale(int(text))
        if request.query.get("wait", "1") in ("0", "false", "no"):
            return _json({"accepted": True, "message": message}, status=202)
        await port.settled()
        snapshot = port.snapshot(measure=False)
        serving, wanted = snapshot.serving, snapshot.supervisor.processes
        ready = len(serving.ready()) if serving else 0
        return _json({"message": message, "processes": wanted, "ready": ready,
                      "done": ready == wanted and snapshot.supervisor.operation is None,
                      "gen": serving.number if serving else None, "pids": list(serving.pids) if serving else []})

    async def _reexec(self, request: web.Request) -> web.StreamResponse:
        """Answered with one line just before the exec (the connection then ends with the old image), or 409."""
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})

        async def answer(message: str) -> None:
            await response.prepare(request)
            await response.write(_line({"reexecuting": True, "message": message, "pid": os.getpid()}))
            await response.drain()

        why = await self._port.reexec(answer)
        if not response.prepared:
            return _error(409, why)
        await response.write(_line({"error": why}))  # execve itself failed: the old image goes on
        return response

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        return web.Response(body=render(self._port.snapshot()), headers={"Content-Type": CONTENT_TYPE})

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        """The children's last lines: ?gen=N&instance=I&lines=COUNT&after=SEQ (a follower polls with `after`)."""
        return _json(self._port.child_output(_number(request, "gen"), _number(request, "instance"),
                                             _default(_number(request, "lines"), 100), _number(request, "after") or 0))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        level = request.query.get("level", "info")
        if level not in LEVELS:
            raise UserError(f"unknown level {level!r}: use one of {', '.join(LEVELS)}")
        with self._subscription(LEVELS[level]) as received:
            response = await self._open_stream(request)
            with _client_may_leave():
                async for event in received:
                    await response.write(_line(event.as_dict()))
                    if event.kind == Kind.STOPPED:
                        break  # the last event there will be: end the stream properly, do not wait to be cut off
        return response

    # -- streaming ----------------------------------------------------------------------------------------------

    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
        await response.prepare(request)
        return response

    def _subscription(self, minimum: int) -> _Subscription:
        return _Subscription(self._port.events, minimum)

    async def _verdict_stream(self, request: web.Request, start: Callable[[], Ticket | None], refusal: str) -> web.StreamResponse:
        """Stream the operation's events as NDJSON, then its verdict as the last line."""
        with self._subscription(LEVELS["info"]) as received:
            ticket = start()
            if ticket is None:
                return _error(409, refusal)
            response = await self._open_stream(request)

            async def forward() -> None:
                with _client_may_leave():
                    async for event in received:
                        await response.write(_line(event.as_dict()))

            async with anyio.create_task_group() as group:
                group.start_soon(forward)
                await ticket.done.wait()
                await anyio.sleep(0)  # let the events of the verdict itself be forwarded first
                group.cancel_scope.cancel()
            with _client_may_leave():
                await response.write(_line(ticket.verdict()))
        return response


@dataclass
class _Subscription:
    """Events of at least `minimum` level, buffered for one streaming client (dropped if it cannot keep up)."""

    events: Events
    minimum: int
    unsubscribe: Callable[[], None] | None = None
    receive: Any = None
    send: Any = None

    def __enter__(self) -> Any:
        self.send, self.receive = anyio.create_memory_object_stream[Event](_STREAM_BUFFER)

        def deliver(event: Event) -> None:
            if LEVELS[event.level] >= self.minimum:
                try:
                    self.send.send_nowait(event)
                except anyio.WouldBlock:
                    pass

        self.unsubscribe = self.events.subscribe(deliver)
        return self.receive

    def __exit__(self, *exc_info: object) -> None:
        if self.unsubscribe:
            self.unsubscribe()
        self.send.close()
        self.receive.close()


def _client_may_leave() -> AbstractContextManager[None]:
    """Around writes to a stream: a client that went away (Ctrl-C, a killed script) ends its stream, quietly; what
    it started goes on."""
    return suppress(ConnectionError)


def _line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, default=str) + "\n").encode()


def _json(data: Any, status: int = 200) -> web.Response:
    from aiohttp import web

    return web.json_response(data, status=status, dumps=lambda value: json.dumps(value, default=str))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)
