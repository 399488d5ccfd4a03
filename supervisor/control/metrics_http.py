"""The read-only metrics endpoint (--metrics-listen): GET /metrics and GET /status over TCP.

Prometheus and dashboards usually run elsewhere and cannot reach the control socket (a unix socket, our user
only). This serves them the control socket's own answers — metrics.render and views.status of one snapshot —
and nothing else: only those two paths are routed, for GET (and HEAD), so every other path is 404 and any other
method 405, and no control verb (upgrade, rollback, stop, signal, scale, event streams) is reachable over TCP
whoever connects. There is no authentication, so it is read-only by construction, not by a check.

Like the control server, the socket is bound at start-up (a port in use fails before any child starts) and
aiohttp is imported when the first connection arrives. Nobody on the network can make it cost the supervisor
much: at most _MAX_CONNECTIONS are open (the oldest idle one makes way for a new one, else the new one is
closed), a connection idle for _IDLE — one that never finished its request line included — is closed, request
lines and headers are capped and no body is read, and answers are rendered at most every _FRESH seconds
however often they are asked for. A slow client holds only its own connection, never the supervisor's loop.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ..errors import StartupError
from ..listeners import Listener, ListenSpec, bind
from ..snapshot import Snapshot
from . import views
from .metrics import CONTENT_TYPE, render

if TYPE_CHECKING:
    from aiohttp import web

_MAX_CONNECTIONS = 16  # a scraper or two and a dashboard need a few; more is someone else
_IDLE = 10.0  # seconds a connection may stay open without a request in progress (and before its first one)
_FRESH = 0.25  # seconds an answer is served again before a new snapshot is rendered
_BACKLOG = 64
_MAX_LINE = 2048  # bytes of a request line or header: these paths take no query worth more
_MAX_HEADERS = 32
_MAX_BODY = 1024  # no route reads a body; aiohttp rejects a larger declared one
_JSON = "application/json; charset=utf-8"


class ReadPort(Protocol):
    """What the endpoint needs of the supervisor: snapshots to read, nothing to ask. A ControlPort is one."""

    def snapshot(self, measure: bool = True) -> Snapshot:
        """Everything held and known, now; `measure` reads each process's memory and CPU too."""


@dataclass
class Connections:
    """The open connections (transport → when last active) and which of them have a request in progress."""

    limit: int = _MAX_CONNECTIONS
    idle: float = _IDLE
    opened: dict[asyncio.BaseTransport, float] = field(default_factory=dict)
    busy: Counter[asyncio.BaseTransport] = field(default_factory=Counter)

    def admit(self, transport: asyncio.BaseTransport, now: float) -> None:
        """Count a new connection; over the limit, the one idle the longest is closed, else the new one."""
        self._forget_closed()
        if len(self.opened) >= self.limit:
            idle = [other for other in self.opened if not self.busy[other]]
            victim = min(idle, key=self.opened.__getitem__) if idle else transport
            victim.close()
            if victim is transport:
                return
            del self.opened[victim]
        self.opened[transport] = now

    def expire(self, now: float) -> int:
        """Close every connection with no request in progress and none for `idle` seconds; how many."""
        self._forget_closed()
        stale = [transport for transport, since in self.opened.items()
                 if not self.busy[transport] and now - since >= self.idle]
        for transport in stale:
            transport.close()
            del self.opened[transport]
        return len(stale)

    def _forget_closed(self) -> None:
        for transport in [transport for transport in self.opened if transport.is_closing()]:
            del self.opened[transport]
            self.busy.pop(transport, None)

    @contextmanager
    def request(self, transport: asyncio.BaseTransport | None, now: Callable[[], float]) -> Iterator[None]:
        """Mark a connection busy while a request of it is handled; its idle time counts from the end."""
        if transport is None:
            yield
            return
        self.busy[transport] += 1
        try:
            yield
        finally:
            self.busy[transport] -= 1
            if self.busy[transport] <= 0:
                del self.busy[transport]
            if transport in self.opened:
                self.opened[transport] = now()


@dataclass
class _Rendered:
    """One answer kept for _FRESH seconds: a client asking in a loop costs a rendering per _FRESH, not per ask."""

    body: bytes = b""
    at: float = float("-inf")

    def get(self, now: float, make: Callable[[], bytes]) -> bytes:
        if now - self.at >= _FRESH:
            self.body, self.at = make(), now
        return self.body


@dataclass
class MetricsServer:
    """Owns the --metrics-listen socket and, once used, the aiohttp server behind it, which reads a ReadPort."""

    spec: ListenSpec
    listener: Listener | None = None
    connections: Connections = field(default_factory=Connections)
    _metrics: _Rendered = field(default_factory=_Rendered, repr=False)
    _status: _Rendered = field(default_factory=_Rendered, repr=False)

    def bind(self) -> str:
        """Bind and listen now, so a port in use is one line before anything starts; the address bound."""
        try:
            self.listener = bind(self.spec, _BACKLOG, nodelay=True, unix_mode=None)
        except StartupError as exc:
            raise StartupError(f"--metrics-listen: {exc}") from None
        return self.listener.address

    def adopt(self, fd: int) -> None:
        """After a re-exec of the supervisor: the socket the old image had bound, by its descriptor."""
        sock = socket.socket(fileno=fd)
        self.listener = Listener(self.spec.name, "tcp", sock, self.spec)

    def close(self) -> None:
        """Close the socket (the server, if it ran, was cleaned up when serve() ended)."""
        if self.listener is not None:
            self.listener.close()

    async def serve(self, port: ReadPort) -> None:
        """Wait for the first client, then answer /metrics and /status of `port` until cancelled."""
        assert self.listener is not None, "bind() comes first"
        sock = self.listener.sock
        sock.setblocking(False)
        await anyio.wait_socket_readable(sock)
        from aiohttp import web

        app = web.Application(client_max_size=_MAX_BODY, middlewares=[self._tracked])
        app.add_routes([web.get("/metrics", self._handler(port, self._metrics, _metrics_body, CONTENT_TYPE)),
                        web.get("/status", self._handler(port, self._status, _status_body, _JSON))])
        runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=_IDLE,
                               lingering_time=1.0, max_line_size=_MAX_LINE, max_field_size=_MAX_LINE,
                               max_headers=_MAX_HEADERS)
        await runner.setup()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._expire)
                await self._accept(runner.server)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await runner.cleanup()

    async def _accept(self, protocol: Callable[[], asyncio.Protocol]) -> None:
        """Accept connections for aiohttp ourselves, so that they are counted and bounded (Connections)."""
        assert self.listener is not None
        sock, loop = self.listener.sock, asyncio.get_running_loop()
        while True:
            await anyio.wait_socket_readable(sock)
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError:  # out of fds or buffers: the client waits in the backlog; never fatal to the supervisor
                self.connections.expire(anyio.current_time() + _IDLE)  # make room: every connection now idle goes
                await anyio.sleep(0.1)
                continue
            try:
                transport, _ = await loop.connect_accepted_socket(protocol, conn)
            except OSError:  # the client is gone already
                conn.close()
                continue
            self.connections.admit(transport, anyio.current_time())

    async def _expire(self) -> None:
        while True:
            await anyio.sleep(1.0)
            self.connections.expire(anyio.current_time())

    @property
    def _tracked(self) -> Callable[..., Any]:
        from aiohttp import web

        connections = self.connections

        @web.middleware
        async def tracked(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
            with connections.request(request.transport, anyio.current_time):
                return await handler(request)

        return tracked

    @staticmethod
    def _handler(port: ReadPort, kept: _Rendered, make: Callable[[ReadPort], bytes],
                 content_type: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            from aiohttp import web

            body = kept.get(anyio.current_time(), lambda: make(port))
            return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

        return handle


def _metrics_body(port: ReadPort) -> bytes:
    return render(port.snapshot())


def _status_body(port: ReadPort) -> bytes:
    return json.dumps(views.status(port.snapshot()), default=str).encode()
