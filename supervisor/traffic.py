"""Who gets new connections: each generation's own socket on a listener's address, all in one SO_REUSEPORT group,
and the classic BPF program on the group (steering.py) that picks the socket of every new connection.

A generation's traffic state: passive (started; only the supervisor's probe connections reach it, steered by
their source port) → active (proven ready: new connections, in proportion to its ready instances) → drained (a
newer generation is active: no new connection, but it keeps running and finishing what it has, warm, and can be
made active again at once) → retiring (its accept queue is empty and has stayed empty: now it may be signalled).

TCP listeners are steered: those supervise binds itself, and one systemd passed in with SO_REUSEPORT that is ours.
A unix socket (no reuseport groups), another socket from systemd, UDP (not steered yet: a datagram is not a
connection, so "drained" would mean something else there) and `--cutover shared` keep one socket shared by every
generation, as before steering; each is said once. A group that a socket not ours joins is no longer steered.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio

from . import census, steering
from .event_kinds import Kind
from .events import Events
from .listener_guard import accept_queue, listening
from .listeners import Listener, ListenSpec
from .rescue import Rescue
from .states import TrafficState

_QUIET_POLL = 0.02  # seconds between looks at a drained socket's accept queue
_PASSIVE_GRACE = 1.0  # seconds a failed generation that never got a connection but probes may take to exit


@dataclass(eq=False)
class Group:
    """One steered listener: the kernel's order of its members (generation numbers), each member's socket, and the
    probe source ports steered to a member."""

    name: str
    members: steering.ReuseportGroup[int] = field(default_factory=steering.ReuseportGroup)
    sockets: dict[int, Listener] = field(default_factory=dict)
    probes: dict[int, int] = field(default_factory=dict)
    program: str = ""  # the attached program's description, for the log and status
    foreign: str = ""  # a socket not ours joined the group: it is no longer steered (what joined)
    probe_source: steering.Address | None = None  # where our probes connect from: only they are steered by port


@dataclass
class Traffic:
    """The steered listeners' groups and every generation's traffic state; it attaches the program whenever
    either changes. `steer` False (shared cutover, or a kernel without reuseport BPF) steers nothing."""

    events: Events
    steer: bool
    groups: dict[ListenSpec, Group] = field(default_factory=dict)
    states: dict[int, TrafficState] = field(default_factory=dict)
    weights: dict[int, int] = field(default_factory=dict)  # an active generation's ready instances
    quiet_since: dict[int, float] = field(default_factory=dict)  # when a generation stopped getting new connections
    shared: dict[str, str] = field(default_factory=dict)  # listener name → why it is shared by every generation
    rescue: Rescue = field(init=False)  # relays what a retired generation left in its socket (run by the fleet)
    stopping: bool = False  # the supervisor is stopping: nothing takes over a generation's connections

    def __post_init__(self) -> None:
        self.rescue = Rescue(self.events)

    def steerable(self, spec: ListenSpec | None, adopted: bool) -> bool:
        """Whether a listener gets a socket per generation (see unsteered for why not)."""
        return self.unsteered(spec, adopted) is None

    def unsteered(self, spec: ListenSpec | None, adopted: bool, sock: socket.socket | None = None) -> str | None:
        """Why a listener is shared by every generation; None when it is steered."""
        if not self.steer:
            return "steering is off (--cutover shared, or this kernel cannot attach a reuseport program)"
        if spec is None:
            return "it was passed in by systemd socket activation, and no --listen names it"
        if adopted:
            return _adopted_unsteered(sock)
        if spec.kind == "unix":
            return "unix sockets have no SO_REUSEPORT groups"
        if spec.kind == "udp":
            return "UDP is not steered"
        return None

    def _say_shared(self, listener: Listener, reason: str) -> None:
        """Once per listener, when a generation first uses it: it is shared, and why."""
        if listener.name not in self.shared:
            self.shared[listener.name] = reason
            self.events.emit(Kind.STEERING_FALLBACK, f"listener {listener.name} ({listener.address}) is shared by "
                             f"every generation: {reason} (a new generation gets connections as soon as it accepts, "
                             "the old one until it is signalled)", name=listener.name, reason=reason)

    def steered(self, listener: Listener) -> bool:
        return listener.spec is not None and listener.spec in self.groups

    def join(self, number: int, listeners: tuple[Listener, ...], backlog: int, state: TrafficState) -> None:
        """Generation `number` joins the groups of its steered listeners in `state`. The program that leaves it out
        is attached before its socket listens, so not one connection reaches it by the kernel's hash."""
        self.states[number] = state
        for listener in listeners:
            reason = self.unsteered(listener.spec, listener.adopted, listener.sock)
            if reason is not None or listener.spec is None:
                self._say_shared(listener, reason or "")
                continue
            group = self.groups.setdefault(listener.spec, Group(listener.name))
            if group.sockets:
                self.check_members()
                self._attach(group)
            if not listening(listener.sock):
                listener.sock.listen(backlog)
            group.members.join(number)
            group.sockets[number] = listener
            self._attach(group)

    def set(self, changes: Mapping[int, tuple[TrafficState, int]]) -> None:
        """Generations are now in these states (active ones share in proportion to their weight), all at once:
        one program per group, so no connection sees a moment between two of the changes."""
        previous = {number: self.states.get(number) for number in changes}
        for number, (state, weight) in changes.items():
            self.states[number], self.weights[number] = state, weight
            if state != TrafficState.ACTIVE and previous[number] == TrafficState.ACTIVE:
                self.quiet_since[number] = anyio.current_time()
        for group in self.groups.values():
            if any(number in group.sockets for number in changes):
                self._attach(group)
        for number, (state, _) in changes.items():
            if previous[number] != state and self.steers(number):
                self.events.emit(Kind.TRAFFIC, f"generation {number}: {state} ({self.describe(number)})", gen=number,
                                 state=state, previous=previous[number], share=self.share(number))

    def leave(self, listener: Listener) -> bool:
        """Close a generation's socket (the supervisor's copy: the generation is gone) and take it out of its
        group; False when it is not a steered member (the caller closes it)."""
        group, number = self._member(listener)
        if group is None:
            return False
        if number is None:  # prepared for a generation that never started: it never listened
            listener.close()
            return True
        self.states[number] = TrafficState.RETIRING
        self._attach(group)  # it gets nothing from here on: the kernel renumbers at the close
        heir = next((other for other in group.members.order() if self.states.get(other) == TrafficState.ACTIVE), None)
        if heir is not None:
            host, port = listener.probe_address()
            self.rescue.take(listener.sock, number, (host, port),
                             lambda sock: self.probe_port(sock, host, port, heir))
        listener.close()
        group.members.leave(number)
        del group.sockets[number]
        group.probes = {port: key for port, key in group.probes.items() if key != number}
        if group.sockets:
            self._attach(group)
        if not self.steers(number):
            self.states.pop(number, None)
            self.weights.pop(number, None)
            self.quiet_since.pop(number, None)
        return True

    def held(self, listener: Listener) -> bool:
        """Whether a generation's socket is still open on a steered listener's address."""
        group, _ = self._member(listener)
        return group is not None and bool(group.sockets)

    def rejoined(self, listener: Listener) -> None:
        """A member a child shut down listens again (listener_guard revived it): it left the group and joined at
        the end, so the kernel's order changed."""
        group, number = self._member(listener)
        if group is not None and number is not None:
            group.members.leave(number)
            group.members.join(number)
            self._attach(group)

    def steers(self, number: int) -> bool:
        """Whether generation `number` has a socket in any steered group."""
        return any(number in group.sockets for group in self.groups.values())

    def _member(self, listener: Listener) -> tuple[Group | None, int | None]:
        """The steered group of a listener's address, and the generation whose socket `listener` is in it."""
        group = self.groups.get(listener.spec) if listener.spec is not None else None
        number = next((number for number, sock in group.sockets.items() if sock is listener), None) if group else None
        return group, number

    def exclusive(self, listeners: tuple[Listener, ...]) -> bool:
        """Whether every connection listener of a generation is steered: then while passive it got nothing but
        probes, and can be removed at once when it fails."""
        connections = [listener for listener in listeners if listener.kind != "udp"]
        return bool(connections) and all(self.steered(listener) for listener in connections)

    def elsewhere(self, number: int) -> bool:
        """Whether another generation is active: then `number`'s new connections go there."""
        return any(state == TrafficState.ACTIVE for other, state in self.states.items() if other != number)

    def ever_active(self, number: int) -> bool:
        return self.states.get(number, TrafficState.PASSIVE) != TrafficState.PASSIVE

    # -- what a probe and a drain need ------------------------------------------------------------------------

    @contextmanager
    def probe_port(self, sock: socket.socket, host: str, port: int, number: int) -> Iterator[None]:
        """Bind a probe's client socket to a source port steered to generation `number`'s socket on the listener
        at host:port (nothing when that listener is not steered): the probe reaches the generation under test,
        whoever else is active. The port is steered only until the connection is set up (the kernel picks the
        socket at the handshake) and is released at once: later, another client may get that port."""
        group = self._group_at(host, port)
        if (group is None or group.foreign or number not in group.sockets
                or len(group.probes) >= steering.MAX_PROBE_PORTS):
            yield
            return
        sock.bind((host, 0))
        group.probe_source = ipaddress.ip_address(host)
        source = int(sock.getsockname()[1])
        group.probes[source] = number
        self._attach(group, probing=True)
        try:
            yield
        finally:
            group.probes.pop(source, None)
            if group.sockets:
                self._attach(group, probing=True)

    def drain_timeout(self, number: int, listeners: tuple[Listener, ...], configured: float) -> float:
        """How long a generation may take to exit once signalled: --drain-timeout, but a short grace for one that
        only ever got probes (it failed while passive: nothing of a user's is in flight there)."""
        passive = not self.ever_active(number) and self.elsewhere(number) and not self.stopping
        return min(configured, _PASSIVE_GRACE) if passive and self.exclusive(listeners) else configured

    async def settle(self, number: int, delay: float, timeout: float) -> None:
        """Before a generation is signalled: if another is active now, wait until this one's sockets are quiet."""
        if self.stopping or not self.ever_active(number) or not self.elsewhere(number):
            return
        if not await self.quiet(number, delay, timeout):
            self.events.emit(Kind.DRAIN_UNQUIET, f"generation {number} still has connections waiting in its socket "
                             "that it does not accept; draining it anyway (they are relayed to the serving generation "
                             "once it is gone)", level="warning", gen=number)

    async def quiet(self, number: int, delay: float, timeout: float) -> bool:
        """Wait until no new connection has reached generation `number`'s sockets for `delay` seconds and their
        accept queues are empty (then nothing it accepted is unread when it is signalled); False on `timeout`,
        or when connections wait there for `delay` and none is taken (it no longer accepts)."""
        sockets = [group.sockets[number] for group in self.groups.values() if number in group.sockets]
        if not sockets:
            return True
        last_busy = self.quiet_since.get(number, anyio.current_time())
        waiting, moved = -1, anyio.current_time()
        with anyio.move_on_after(timeout):
            while True:
                now = anyio.current_time()
                queued = sum((accept_queue(listener.sock) or (0, 0))[0] for listener in sockets)
                if queued != waiting:
                    waiting, moved = queued, now
                if queued and now - moved >= delay:
                    return False  # it takes none of them: its exit hands them on (rescue.py)
                if queued:
                    last_busy = now
                elif now - last_busy >= delay:
                    return True
                await anyio.sleep(_QUIET_POLL)
        return False

    # -- what status shows --------------------------------------------------------------------------------------

    def share(self, number: int) -> float:
        """The fraction of new connections generation `number` gets (0..1)."""
        shares = self._shares(self.states.keys())
        total = sum(shares.values())
        return round(shares.get(number, 0) / total, 4) if total else 0.0

    def describe(self, number: int) -> str:
        return f"{self.share(number):.0%} of new connections"

    def queued(self, number: int) -> dict[str, int]:
        """Connections waiting in each of generation `number`'s steered sockets, by listener name."""
        found: dict[str, int] = {}
        for group in self.groups.values():
            listener = group.sockets.get(number)
            queue = accept_queue(listener.sock) if listener is not None else None
            if queue is not None:
                found[group.name] = queue[0]
        return found

    # -- the program ----------------------------------------------------------------------------------------------

    def _shares(self, members: Iterable[int]) -> dict[int, int]:
        """Active generations by their weight; when none is active (a moment at start, or every generation
        drained), every member gets an equal part rather than none at all."""
        members = list(members)
        active = {number: max(1, self.weights.get(number, 1)) for number in members
                  if self.states.get(number) == TrafficState.ACTIVE}
        return active or {number: 1 for number in members if self.states.get(number) != TrafficState.RETIRING}

    def check_members(self) -> None:
        """Stop steering a group that a socket not ours has joined (a process of our user bound the address with
        SO_REUSEPORT): it shifts the kernel's order under the program, which would then misroute. The kernel
        hashes over every member again, as it would without supervise."""
        for group in self.groups.values():
            if group.foreign or not group.sockets:
                continue
            sock = next(iter(group.sockets.values())).sock
            ours = {os.fstat(listener.sock.fileno()).st_ino for listener in group.sockets.values()}
            found = census.foreign_members(sock.family, sock.getsockname()[0], sock.getsockname()[1], ours)
            if found:
                group.foreign = ", ".join(f"socket inode {member.inode} of uid {member.uid}" for member in found)
                group.program = ""
                steering.detach(sock)
                self.events.emit(Kind.STEERING_FALLBACK, f"listener {group.name}: a socket that is not ours joined "
                                 f"its SO_REUSEPORT group ({group.foreign}): no longer steered, every member gets "
                                 "connections by the kernel's hash (another server of this user on the same port?)",
                                 level="warning", name=group.name, reason="foreign member", foreign=group.foreign)

    def _attach(self, group: Group, probing: bool = False) -> None:
        """Attach the program for the group's members, shares and probe ports (through any member: the program
        belongs to the group); a change of the shares is logged, a probe's port coming and going is not."""
        shares = self._shares(group.members.order())
        if not shares or group.foreign:  # only a retiring member is left, or the group is not ours alone
            return
        members = set(group.members.order())  # a probe still in flight to a generation that has left: not steered
        probes = {port: key for port, key in group.probes.items() if key in members}
        program = group.members.program(shares, probes, group.probe_source)
        through = next(iter(group.sockets.values()))
        steering.attach(through.sock, program)
        if not probing and program.description != group.program:
            group.program = program.description
            self.events.emit(Kind.STEERING, f"listener {group.name}: {program.description}", level="debug",
                             name=group.name, program=program.description)

    def _group_at(self, host: str, port: int) -> Group | None:
        """The group a probe to host:port reaches."""
        for group in self.groups.values():
            if any(listener.probe_address() == (host, port) for listener in group.sockets.values()):
                return group
        return None


def _adopted_unsteered(sock: socket.socket | None) -> str | None:
    """A socket systemd passed in can be steered only if more can join its group: it is TCP, carries SO_REUSEPORT
    (ReusePort=yes in the .socket unit) and belongs to our user (the kernel admits only the same user's sockets)."""
    passed = "it was passed in by systemd socket activation"
    if sock is None or sock.family == socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        return passed
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        return f"{passed} without SO_REUSEPORT (ReusePort=yes in its .socket unit lets supervise steer it)"
    found = census.listening(sock.family, sock.getsockname()[1])
    if found is None:
        return f"{passed}, and the kernel cannot tell whose it is"
    inode = os.fstat(sock.fileno()).st_ino
    owner = next((each.uid for each in found if each.inode == inode), None)
    if owner != os.geteuid():
        return f"{passed}, and it belongs to uid {owner}: only its owner's sockets can join its group"
    return None
