#!/usr/bin/env python3
"""Demo aiohttp server for `supervise`: serves on the socket it is handed and drains on SIGTERM.

    supervise --listen :8080 -- python examples/app.py
    python examples/app.py --port 8080            # standalone: binds the port itself

Under `supervise` the listening socket is inherited (systemd convention: fd 3.., LISTEN_FDS, LISTEN_PID)
and shared with the next generation during an upgrade. On SIGTERM this server stops accepting by closing
its own fd of that socket (never shutdown(), which would stop the new generation too), answers every
connection it already accepted, tells keep-alive clients to reconnect, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

LISTEN_FDS_START = 3
DRAIN_TIMEOUT = 30.0  # longest wait for in-flight requests once accepting stopped
FIRST_REQUEST_GRACE = 1.0  # how long just-accepted connections get to deliver their request
BACKLOG = 4096  # asyncio calls listen() again on the inherited socket; do not shrink the shared queue


@dataclass
class State:
    """What the handlers need to know about this process."""

    generation: int
    draining: bool = False


STATE = web.AppKey("state", State)


async def hello(request: web.Request) -> web.Response:
    """Which generation and process answered: lets you watch an upgrade move traffic."""
    return web.Response(text=f"hello from generation {request.app[STATE].generation} pid {os.getpid()}\n")


async def readyz(request: web.Request) -> web.Response:
    """200 once serving, 503 while draining: a probe must not pick a generation that is leaving."""
    if request.app[STATE].draining:
        return web.Response(status=503, text="draining\n")
    return web.Response(text="ready\n")


async def slow(request: web.Request) -> web.Response:
    """/slow?t=SECONDS answers after that long: a request that must survive the drain."""
    try:
        seconds = min(max(float(request.query.get("t", "1")), 0.0), 300.0)
    except ValueError:
        raise web.HTTPBadRequest(text="t must be a number of seconds\n") from None
    await asyncio.sleep(seconds)
    return web.Response(text=f"slept {seconds}\n")


async def env(request: web.Request) -> web.Response:
    """The contract with the supervisor as this process sees it."""
    names = os.environ.get("LISTEN_FDNAMES")
    return web.json_response({
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "listen_pid": env_int("LISTEN_PID"),
        "listen_fds": env_int("LISTEN_FDS"),
        "listen_fdnames": names.split(":") if names is not None else None,
        "generation": request.app[STATE].generation,
        "notify_socket": os.environ.get("NOTIFY_SOCKET"),
        "argv": sys.argv,
    })


@web.middleware
async def close_when_draining(request: web.Request, handler: Handler) -> web.StreamResponse:
    """While draining, answer with Connection: close so keep-alive clients move to the new generation."""
    response = await handler(request)
    if request.app[STATE].draining:
        response.force_close()
    return response


def make_app(state: State) -> web.Application:
    """The routes, with `state` shared by the handlers."""
    app = web.Application(middlewares=[close_when_draining])
    app[STATE] = state
    app.add_routes([web.get("/", hello), web.get("/readyz", readyz), web.get("/slow", slow), web.get("/env", env)])
    return app


def env_int(name: str) -> int | None:
    """An integer environment variable, None when unset or not a number."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def inherited_socket(name: str | None) -> socket.socket | None:
    """The listening socket passed by the supervisor, or None when not socket-activated.

    Like sd_listen_fds(3), LISTEN_* count only when LISTEN_PID is our pid (they may have leaked from a
    parent); fd 3 is used unless `name` picks another one through LISTEN_FDNAMES.
    """
    count = env_int("LISTEN_FDS")
    if env_int("LISTEN_PID") != os.getpid() or not count:
        return None
    index = 0
    if name is not None:
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")[:count]
        if name not in names:
            raise SystemExit(f"app: no inherited socket named {name!r} (LISTEN_FDNAMES={':'.join(names)})")
        index = names.index(name)
    sock = socket.socket(fileno=LISTEN_FDS_START + index)  # family and type are read from the fd
    sock.set_inheritable(False)
    return sock


def open_listener(args: argparse.Namespace) -> socket.socket:
    """The inherited socket, or one bound to --host/--port for standalone runs."""
    sock = inherited_socket(args.socket_name)
    if sock is not None:
        return sock
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    return socket.create_server((args.host, args.port), family=family, backlog=BACKLOG)


def sd_notify(message: str) -> None:
    """Send one sd_notify(3) datagram to NOTIFY_SOCKET (a path, or '@name' for the abstract namespace)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log(f"cannot notify {address!r}: {exc}")


def log(message: str) -> None:
    """One write per line: stderr is shared with the supervisor, whose log lines must not be split by ours."""
    os.write(2, f"app: pid {os.getpid()} {message}\n".encode())


def watch_signals(*signals: signal.Signals) -> asyncio.Future[signal.Signals]:
    """A future resolved with the first of `signals` to arrive (handled from now on, not fatal)."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def deliver(signum: signal.Signals) -> None:
        if not received.done():
            received.set_result(signum)

    for signum in signals:
        loop.add_signal_handler(signum, deliver, signum)
    return received


async def stop_accepting(site: web.SockSite, listener: socket.socket) -> None:
    """Close our fd of the listening socket without dropping a connection accepted a moment ago.

    asyncio's Server.close() right after an accept makes the pending transport fail to attach, and the
    accepted connection is silently closed (CPython gh-109564). So stop watching the socket first, let
    the already accepted connections attach, then close it.
    """
    asyncio.get_running_loop().remove_reader(listener.fileno())
    for _ in range(2):  # accept tasks created in this loop turn run in the next one
        await asyncio.sleep(0)
    await site.stop()


async def let_new_connections_send(server: web.Server) -> None:
    """Give just-accepted connections (bounded) time to deliver their request before aiohttp's cleanup.

    The cleanup closes every connection that is idle at that moment, and a connection accepted just
    before the listener closed is idle only because its request is still on the way.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FIRST_REQUEST_GRACE
    while server.connections and loop.time() < deadline:
        await asyncio.sleep(0.05)


async def serve(listener: socket.socket, state: State) -> None:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, answer what was accepted, exit."""
    stop_signal = watch_signals(signal.SIGTERM, signal.SIGINT)
    runner = web.AppRunner(make_app(state), access_log=None, shutdown_timeout=DRAIN_TIMEOUT)
    await runner.setup()
    site = web.SockSite(runner, listener, backlog=BACKLOG)
    await site.start()
    sd_notify("READY=1")
    log(f"generation {state.generation} serving on {listener.getsockname()!r}")

    signum = await stop_signal
    log(f"got {signum.name}, draining")
    state.draining = True
    sd_notify("STOPPING=1")
    await stop_accepting(site, listener)
    assert runner.server is not None
    await let_new_connections_send(runner.server)
    await runner.cleanup()  # closes idle connections, waits up to DRAIN_TIMEOUT for running handlers
    log("drained")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Demo HTTP server for supervise.")
    parser.add_argument("--host", default="127.0.0.1", help="bind here when no socket is inherited")
    parser.add_argument("--port", type=int, default=8080, help="bind here when no socket is inherited")
    parser.add_argument("--socket-name", help="use the inherited socket with this LISTEN_FDNAMES name")
    args = parser.parse_args(argv)
    state = State(generation=env_int("SUPERVISE_GENERATION") or 0)
    asyncio.run(serve(open_listener(args), state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
