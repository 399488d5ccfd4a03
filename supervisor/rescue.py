"""Connections left in a retired generation's own socket, relayed to the active generation instead of reset.

With steered cutover each generation accepts from its own socket. A generation that stops accepting while it is
active (it closed its copy of the socket, or hangs) leaves connections in that socket's accept queue, and closing
the supervisor's copy — the last one — would reset them. So once the generation's processes are gone, the
supervisor accepts what is left itself and relays each connection, byte for byte, to a connection of its own to
the listener's address, steered to an active generation. It is the exception (a release that broke while taking
traffic), not the data path: a handful of connections, each bounded in time.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .counted import counted
from .event_kinds import Kind
from .events import Events

_CHUNK = 1 << 16
Steer = Callable[[socket.socket], AbstractContextManager[None]]  # binds a socket to a port steered to a generation


@dataclass(frozen=True)
class Stranded:
    """One connection taken from a retired generation's socket, and where it goes now."""

    conn: socket.socket
    target: tuple[str, int]
    steer: Steer
    number: int  # the generation it was left by


@dataclass
class Rescue:
    """Relays stranded connections; `run` owns the relays (the fleet runs it for the supervisor's life)."""

    events: Events
    timeout: float = 30.0  # the longest one relay may last: a request and its answer, not a session
    _jobs: MemoryObjectSendStream[Stranded] = field(init=False)
    _to_relay: MemoryObjectReceiveStream[Stranded] = field(init=False)

    def __post_init__(self) -> None:
        self._jobs, self._to_relay = anyio.create_memory_object_stream[Stranded](float("inf"))

    def take(self, sock: socket.socket, number: int, target: tuple[str, int], steer: Steer) -> int:
        """Accept every connection waiting in `sock` (no process of its generation holds it any more, so nothing
        else accepts from it) and relay each; how many there were."""
        taken, poller = 0, select.poll()  # not select(): our fds may be numbered above FD_SETSIZE
        poller.register(sock.fileno(), select.POLLIN)
        while poller.poll(0):
            try:
                conn, _ = sock.accept()
            except OSError:
                break
            taken += 1
            self._jobs.send_nowait(Stranded(conn, target, steer, number))
        if taken:
            self.events.emit(Kind.CONNECTIONS_RESCUED, f"generation {number} left {counted(taken, 'connection')} it "
                             "never accepted: relayed to the generation now serving", gen=number, count=taken)
        return taken

    async def run(self) -> None:
        with self._jobs, self._to_relay:
            async with anyio.create_task_group() as group:
                async for job in self._to_relay:
                    group.start_soon(self._relay, job)

    async def _relay(self, job: Stranded) -> None:
        conn, upstream = job.conn, None
        try:
            upstream = socket.socket(socket.AF_INET6 if ":" in job.target[0] else socket.AF_INET)  # EMFILE: said
            conn.setblocking(False)
            upstream.setblocking(False)
            with anyio.move_on_after(self.timeout):
                with job.steer(upstream):
                    await asyncio.get_running_loop().sock_connect(upstream, job.target)
                async with anyio.create_task_group() as group:
                    group.start_soon(_pipe, conn, upstream, group.cancel_scope)
                    group.start_soon(_pipe, upstream, conn, group.cancel_scope)
        except OSError as exc:
            self.events.emit(Kind.CONNECTIONS_RESCUED, f"a connection generation {job.number} left could not be "
                             f"relayed: {exc.strerror or exc}", level="warning", gen=job.number, count=0)
        except Exception as exc:  # noqa: BLE001 - a relay is one client's; a bug in it must never stop the fleet
            self.events.emit(Kind.CONNECTIONS_RESCUED, f"a connection generation {job.number} left could not be "
                             f"relayed: internal error ({type(exc).__name__}: {exc})", level="error", gen=job.number,
                             count=0)
        finally:
            conn.close()
            if upstream is not None:
                upstream.close()

    def close(self) -> None:
        self._jobs.close()
        self._to_relay.close()


async def _pipe(source: socket.socket, sink: socket.socket, relay: anyio.CancelScope) -> None:
    """Copy until `source` ends, then end `sink`'s sending side (a half-close the other side may still answer);
    a broken side ends the whole relay."""
    loop = asyncio.get_running_loop()
    try:
        while data := await loop.sock_recv(source, _CHUNK):
            await loop.sock_sendall(sink, data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        relay.cancel()
