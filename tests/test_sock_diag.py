"""sock_diag and the port census against the kernel: real sockets on loopback and a dual-stack [::], no mocks.

Besides our own functions, these tests pin the kernel behaviour census.py relies on (what one SO_REUSEPORT group
is, which listener takes a connection, when a bind is refused), so a kernel that differs fails here first.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from supervisor import attribution, census, sock_diag
from supervisor.testing.net import free_port

V4, V6 = socket.AF_INET, socket.AF_INET6
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP


def _netlink_available() -> bool:
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, sock_diag.NETLINK_SOCK_DIAG).close()
    except (OSError, AttributeError):
        return False
    return True


def _ipv6_available() -> bool:
    try:
        with socket.socket(V6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _netlink_available(), reason="no NETLINK_SOCK_DIAG here (not Linux, or sandboxed)")
needs_ipv6 = pytest.mark.skipif(not _ipv6_available(), reason="no IPv6 loopback")

# (family, bind address, IPV6_V6ONLY or None for IPv4, the address clients connect to)
PLACES = [pytest.param(V4, "127.0.0.1", None, "127.0.0.1", id="127.0.0.1"),
          pytest.param(V6, "::1", 1, "::1", id="::1", marks=needs_ipv6),
          pytest.param(V6, "::", 0, "127.0.0.1", id="dual-stack ::", marks=needs_ipv6)]

Bind = Callable[..., socket.socket]


@pytest.fixture
def bind() -> Iterator[Bind]:
    """Binds (and for TCP, listens on) a socket that is closed after the test."""
    opened: list[socket.socket] = []

    def bind(family: int, address: str, port: int = 0, *, reuseport: bool = True, v6only: int | None = None,
             udp: bool = False, backlog: int = 16) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
        opened.append(sock)
        if not udp:  # as listeners.py binds TCP; on UDP it would let plain binds share the port (see below)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        # Not port 0: a port from the kernel's ephemeral range is free only where this socket is bound, and a
        # concurrent test's client bound to another address may take it before a test binds it there too.
        sock.bind((address, port or free_port()))
        if not udp:
            sock.listen(backlog)
        return sock

    yield bind
    for sock in opened:
        sock.close()


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def connect(address: str, port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection((address, port), timeout=1) for _ in range(count)]


def census_when(family: int, port: int, done: Callable[[list[census.ListeningSocket]], bool],
                protocol: int = TCP) -> list[census.ListeningSocket]:
    """The census of the port once `done` holds: the kernel queues a connection when the client's last ACK
    arrives, just after connect() returned."""
    deadline = time.monotonic() + 1
    while True:
        found = census.listening(family, port, protocol)
        assert found is not None
        if done(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.001)


def accept_all(sock: socket.socket) -> int:
    sock.setblocking(False)
    accepted = 0
    while True:
        try:
            sock.accept()[0].close()
        except BlockingIOError:
            return accepted
        accepted += 1


@pytest.mark.parametrize(("family", "address", "v6only", "client"), PLACES)
def test_reuseport_listeners_are_found_with_inode_backlog_and_accept_queue(
        bind: Bind, family: int, address: str, v6only: int | None, client: str) -> None:
    first = bind(family, address, v6only=v6only, backlog=5)
    second = bind(family, address, port_of(first), v6only=v6only, backlog=7)
    bind(V4, "127.0.0.1")  # another port: never listed
    clients = connect(client, port_of(first), 3)
    found = census_when(family, port_of(first), lambda found: sum(each.queued for each in found) == 3)
    assert sorted((each.inode, each.backlog) for each in found) == sorted([(inode(first), 5), (inode(second), 7)])
    assert {(each.family, each.address, each.port, each.uid, each.v6only) for each in found} == {
        (family, address, port_of(first), os.getuid(), v6only == 1 or address == "::1")}
    # The kernel hashes the 3 connections over the group: each socket's count is what it can accept.
    queued = {each.inode: each.queued for each in found}
    assert queued == {inode(first): accept_all(first), inode(second): accept_all(second)}
    assert sum(queued.values()) == 3
    for each in clients:
        each.close()


def test_a_census_longer_than_one_netlink_message_is_read_to_its_end(bind: Bind) -> None:
    first = bind(V4, "127.0.0.1")
    group = [first] + [bind(V4, "127.0.0.1", port_of(first)) for _ in range(499)]  # about 45 KiB of answers
    found = census.listening(V4, port_of(first))
    assert sorted(each.inode for each in found or []) == sorted(inode(each) for each in group)


def test_one_listener_reports_its_whole_accept_queue(bind: Bind) -> None:
    listener = bind(V4, "127.0.0.1")
    clients = connect("127.0.0.1", port_of(listener), 3)
    found = census_when(V4, port_of(listener), lambda found: found[0].queued == 3)
    assert [(each.inode, each.queued) for each in found] == [(inode(listener), 3)]
    for each in clients:
        each.close()


@pytest.mark.parametrize(("family", "address", "v6only", "client"), PLACES)
def test_a_foreign_member_is_found_and_ours_are_not(
        bind: Bind, family: int, address: str, v6only: int | None, client: str) -> None:
    ours = [bind(family, address, v6only=v6only)]
    ours.append(bind(family, address, port_of(ours[0]), v6only=v6only))
    assert census.foreign_members(family, address, port_of(ours[0]), {inode(each) for each in ours}) == []
    foreign = bind(family, address, port_of(ours[0]), v6only=v6only)
    members = census.foreign_members(family, address, port_of(ours[0]), {inode(each) for each in ours})
    assert members is not None and [each.inode for each in members] == [inode(foreign)]


def test_a_more_specific_listener_is_no_member_but_takes_every_connection_to_its_address(bind: Bind) -> None:
    """0.0.0.0:P and 127.0.0.1:P are two groups, whatever the order they were bound in; the specific one gets
    all connections to 127.0.0.1 (so a BPF program on the wildcard group never sees them)."""
    wildcard = bind(V4, "0.0.0.0")
    specific = bind(V4, "127.0.0.1", port_of(wildcard))
    port = port_of(wildcard)
    assert census.foreign_members(V4, "0.0.0.0", port, {inode(wildcard)}) == []
    assert census.foreign_members(V4, "127.0.0.1", port, {inode(specific)}) == []
    clients = connect("127.0.0.1", port, 4)
    found = census_when(V4, port, lambda found: sum(each.queued for each in found) == 4)
    assert {each.inode: each.queued for each in found} == {inode(wildcard): 0, inode(specific): 4}
    for each in clients:
        each.close()


def test_a_listener_bound_to_the_device_is_no_member_but_takes_every_connection_on_it(bind: Bind) -> None:
    ours = bind(V4, "127.0.0.1")
    port = port_of(ours)
    on_device = socket.socket(V4, socket.SOCK_STREAM)
    with on_device:
        on_device.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            on_device.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
        except PermissionError:
            pytest.skip("SO_BINDTODEVICE needs CAP_NET_RAW before Linux 5.7")
        on_device.bind(("127.0.0.1", port))
        on_device.listen(16)
        assert census.foreign_members(V4, "127.0.0.1", port, {inode(ours)}) == []
        assert [each.inode for each in census.in_use(V4, "127.0.0.1", port) or []
                if each.inode != inode(ours)] == [inode(on_device)]
        clients = connect("127.0.0.1", port, 3)
        found = census_when(V4, port, lambda found: sum(each.queued for each in found) == 3)
        assert {(each.inode, each.interface, each.queued) for each in found} == {
            (inode(ours), 0, 0), (inode(on_device), socket.if_nametoindex("lo"), 3)}
        for each in clients:
            each.close()


@needs_ipv6
def test_dual_stack_v6only_and_ipv4_wildcards_are_three_groups(bind: Bind) -> None:
    """[::] dual-stack, [::] v6-only and 0.0.0.0 on one port, all with SO_REUSEPORT: three groups. IPv4
    connections go to the AF_INET wildcard, never to the dual-stack socket; IPv6 ones never split between the
    two [::] sockets."""
    dual = bind(V6, "::", v6only=0)
    port = port_of(dual)
    v6only = bind(V6, "::", port, v6only=1)
    ipv4 = bind(V4, "0.0.0.0", port)
    assert census.foreign_members(V6, "::", port, {inode(dual)}) == []
    assert census.foreign_members(V6, "::", port, {inode(v6only)}) == []
    assert census.foreign_members(V4, "0.0.0.0", port, {inode(ipv4)}) == []
    clients = connect("127.0.0.1", port, 3)
    found = census_when(V4, port, lambda found: sum(each.queued for each in found) == 3)
    assert [each.queued for each in found] == [3]
    clients += connect("::1", port, 6)
    found = census_when(V6, port, lambda found: sum(each.queued for each in found) == 6)
    assert sorted(each.queued for each in found) == [0, 6]
    for each in clients:
        each.close()


def test_nothing_listening_is_empty(bind: Bind) -> None:
    closed = bind(V4, "127.0.0.1")
    port = port_of(closed)
    closed.close()
    assert census.listening(V4, port) == []
    assert census.listening(V4, port, UDP) == []
    assert census.foreign_members(V4, "127.0.0.1", port, set()) == []
    assert census.in_use(V4, "127.0.0.1", port) == []


def test_udp_bound_sockets_are_listed_and_connected_ones_are_not(bind: Bind) -> None:
    first = bind(V4, "127.0.0.1", udp=True)
    port = port_of(first)
    second = bind(V4, "127.0.0.1", port, udp=True)
    connected = bind(V4, "127.0.0.1", port, udp=True)
    connected.connect(("127.0.0.1", 9))
    with socket.socket(V4, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"hello", ("127.0.0.1", port))
    found = census_when(V4, port, lambda found: any(each.queued for each in found), UDP)
    assert sorted(each.inode for each in found) == sorted([inode(first), inode(second)])
    assert all(each.backlog is None for each in found)
    assert sum(each.queued > 0 for each in found) == 1  # bytes of the one datagram, in the socket that got it
    assert not {inode(first), inode(second)} & {each.inode for each in census.listening(V4, port) or []}
    foreign = bind(V4, "127.0.0.1", port, udp=True)
    members = census.foreign_members(V4, "127.0.0.1", port, {inode(first), inode(second)}, UDP)
    assert [each.inode for each in members or []] == [inode(foreign)]


# (existing listener: family, address, IPV6_V6ONLY), (wanted: family, address, dual-stack)
OVERLAPS = [((V4, "127.0.0.1", None), (V4, "127.0.0.1", False)),
            ((V4, "0.0.0.0", None), (V4, "127.0.0.1", False)),
            ((V4, "127.0.0.1", None), (V4, "0.0.0.0", False)),
            ((V4, "127.0.0.2", None), (V4, "127.0.0.1", False)),
            ((V6, "::", 0), (V4, "127.0.0.1", False)),
            ((V6, "::", 1), (V4, "0.0.0.0", False)),
            ((V6, "::ffff:127.0.0.1", 0), (V4, "127.0.0.1", False)),
            ((V4, "127.0.0.1", None), (V6, "::", True)),
            ((V4, "127.0.0.1", None), (V6, "::", False)),
            ((V6, "::1", 1), (V6, "::", False)),
            ((V6, "::", 1), (V6, "::1", False)),
            ((V6, "::", 0), (V6, "::", False))]


@needs_ipv6
@pytest.mark.parametrize(("existing", "wanted"), OVERLAPS, ids=[f"{e[1]}(v6only={e[2]})-vs-{w[1]}(dual={w[2]})"
                                                                 for e, w in OVERLAPS])
@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_in_use_is_what_the_kernel_refuses_a_plain_bind_for(
        bind: Bind, existing: tuple[int, str, int | None], wanted: tuple[int, str, bool], udp: bool) -> None:
    held = bind(existing[0], existing[1], v6only=existing[2], udp=udp)
    family, address, dual = wanted
    found = census.in_use(family, address, port_of(held), UDP if udp else TCP, dual_stack=dual)
    assert found is not None
    try:
        bind(family, address, port_of(held), reuseport=False, v6only=None if family == V4 else int(not dual),
             udp=udp)
    except OSError as exc:
        assert exc.errno == errno.EADDRINUSE
        assert [each.inode for each in found] == [inode(held)]
    else:
        assert found == []


def test_a_first_socket_bound_without_reuseport_refuses_others_then_admits_members(bind: Bind) -> None:
    """The race-free port-in-use check: bind the first socket without SO_REUSEPORT (the kernel refuses the bind
    if anything is there), turn SO_REUSEPORT on, then listen: later sockets with SO_REUSEPORT join its group."""
    with pytest.raises(OSError) as refused:
        bind(V4, "127.0.0.1", port_of(bind(V4, "127.0.0.1")), reuseport=False)
    assert refused.value.errno == errno.EADDRINUSE
    first = socket.socket(V4, socket.SOCK_STREAM)
    with first:
        first.bind(("127.0.0.1", 0))
        with pytest.raises(OSError):
            bind(V4, "127.0.0.1", port_of(first))  # not yet: the first has no SO_REUSEPORT
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        first.listen(64)
        second = bind(V4, "127.0.0.1", port_of(first), backlog=64)
        clients = connect("127.0.0.1", port_of(first), 40)
        found = census_when(V4, port_of(first), lambda found: sum(each.queued for each in found) == 40)
        # One group: the kernel spreads the connections over both (all 40 on one: chance 2**-39).
        assert sorted(each.inode for each in found if each.queued) == sorted([inode(first), inode(second)])
        for each in clients:
            each.close()


@pytest.mark.parametrize(("family", "address", "v6only", "client"), PLACES)
def test_attribution_finds_the_server_side_inode_by_netlink(
        bind: Bind, family: int, address: str, v6only: int | None, client: str) -> None:
    listener = bind(family, address, v6only=v6only)
    with socket.create_connection((client, port_of(listener)), timeout=1) as probe:
        assert attribution.server_side_inode(probe) == 0  # queued: no process holds it yet
        accepted, _ = listener.accept()
        with accepted:
            server_side = (probe.getpeername()[:2], probe.getsockname()[:2])
            assert attribution.server_side_inode(probe) == inode(accepted)
            assert attribution._netlink_inode(probe.family, *server_side) == inode(accepted)


def test_a_dump_the_kernel_cannot_answer_raises_and_the_census_says_unknown() -> None:
    with pytest.raises(sock_diag.DiagError):
        sock_diag.dump(V4, socket.IPPROTO_ICMP, 1 << sock_diag.TCP_LISTEN)  # no inet_diag handler for ICMP
    assert census.listening(V4, 80, socket.IPPROTO_ICMP) is None


def test_udp_sockets_with_so_reuseaddr_share_a_port_so_only_the_census_sees_the_first(bind: Bind) -> None:
    """On UDP, SO_REUSEADDR on both sockets lets a plain bind share the port (no EADDRINUSE): a check by binding
    cannot see the holder then, the census can."""
    held = socket.socket(V4, socket.SOCK_DGRAM)
    second = socket.socket(V4, socket.SOCK_DGRAM)
    with held, second:
        for sock in (held, second):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        assert [each.inode for each in census.in_use(V4, "127.0.0.1", port_of(held), UDP) or []] == [inode(held)]
        second.bind(("127.0.0.1", port_of(held)))
