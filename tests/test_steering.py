"""supervisor/steering.py against the kernel: real listening sockets in one SO_REUSEPORT group on 127.0.0.1, ::1
and a dual-stack `::`, real client connections, and which member accepted each of them. No mocks: every fact the
module's docstring states about the kernel is proved here."""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import struct
from collections import Counter
from collections.abc import Iterator

import pytest

from supervisor import steering
from supervisor.steering import Instruction, Program, ReuseportGroup, weighted

needs_kernel = pytest.mark.skipif(not steering.supported(),
                                  reason="this kernel cannot attach classic BPF to a reuseport group (Linux >= 4.6)")

LOOPBACKS = [pytest.param(socket.AF_INET, "127.0.0.1", id="ipv4"), pytest.param(socket.AF_INET6, "::1", id="ipv6")]


def new_member(host: str, port: int) -> socket.socket:
    """A non-blocking SO_REUSEPORT socket bound to host:port (0: a free port), not listening yet; on `::` it is
    dual-stack, so IPv4 clients reach it as v4-mapped."""
    member = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    member.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if host == "::":
        member.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    member.bind((host, port))
    member.setblocking(False)
    return member


@contextlib.contextmanager
def reuseport_group(count: int, host: str = "127.0.0.1", listen: bool = True) -> Iterator[list[socket.socket]]:
    """`count` members bound to one free port of `host`, listening in index order unless told not to."""
    members: list[socket.socket] = []
    try:
        for _ in range(count):
            members.append(new_member(host, port_of(members) if members else 0))
            if listen:
                members[-1].listen(512)
        yield members
    finally:
        for member in members:
            member.close()


def port_of(members: list[socket.socket]) -> int:
    return members[0].getsockname()[1]


def land(members: list[socket.socket], host: str, port: int, source: socket.socket | None = None) -> int:
    """Connect once to host:port (from `source`, a client socket already bound, if given) and return the index in
    `members` of the one that accepted the connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with source or socket.socket(family, socket.SOCK_STREAM) as client:
        client.connect((host, port))
        ready, _, _ = select.select(members, [], [], 2)
        assert len(ready) == 1, f"expected one member to have the connection, got {len(ready)}"
        accepted, _ = ready[0].accept()
        accepted.close()
        return members.index(ready[0])


def tally(members: list[socket.socket], host: str, connections: int) -> Counter[int]:
    """Which member got each of `connections` new connections."""
    return Counter(land(members, host, port_of(members)) for _ in range(connections))


def probe_client(host: str) -> tuple[socket.socket, int]:
    """A client socket bound to a free source port (to name that port in a program before it connects)."""
    client = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    client.bind((host, 0))
    return client, client.getsockname()[1]


@needs_kernel
@pytest.mark.parametrize(("family", "host"), LOOPBACKS)
def test_a_fixed_share_sends_every_connection_to_its_member(family: int, host: str) -> None:
    with reuseport_group(2, host) as members:
        steering.attach(members[0], weighted([0, 1]))
        assert tally(members, host, 200) == {1: 200}
        steering.attach(members[1], weighted([1, 0]))  # replaces the group's program, through any member
        assert tally(members, host, 200) == {0: 200}


@needs_kernel
def test_weighted_shares_split_the_connections() -> None:
    with reuseport_group(3) as members:
        steering.attach(members[0], weighted([1, 1, 0]))
        counts = tally(members, "127.0.0.1", 400)
        assert counts[2] == 0
        assert counts[0] > 80 and counts[1] > 80, counts  # expected 200 each; > 20 % cannot fail by chance


@needs_kernel
@pytest.mark.parametrize(("family", "host"), LOOPBACKS)
def test_a_probe_port_reaches_its_member_whatever_the_shares(family: int, host: str) -> None:
    with reuseport_group(3, host) as members:
        client, source_port = probe_client(host)
        steering.attach(members[0], weighted([1, 0, 0], {source_port: 2, 1: 1}))
        assert land(members, host, port_of(members), client) == 2
        assert tally(members, host, 100) == {0: 100}  # every other source port takes the shares


@needs_kernel
@pytest.mark.parametrize("client_host", ["127.0.0.1", "::1"])
def test_a_dual_stack_group_steers_ipv4_and_ipv6_clients(client_host: str) -> None:
    with reuseport_group(2, "::") as members:
        client, source_port = probe_client(client_host)
        steering.attach(members[0], weighted([1, 0], {source_port: 1}))
        assert land(members, client_host, port_of(members), client) == 1
        assert tally(members, client_host, 100) == {0: 100}
        steering.attach(members[0], weighted([0, 1]))
        assert tally(members, client_host, 100) == {1: 100}


@needs_kernel
def test_the_index_is_the_order_of_listen_not_of_bind() -> None:
    with reuseport_group(2, listen=False) as members:
        members[1].listen(512)
        members[0].listen(512)
        steering.attach(members[0], weighted([1, 0]))
        assert tally(members, "127.0.0.1", 100) == {1: 100}


@needs_kernel
def test_a_member_joining_after_the_program_gets_nothing_until_a_program_names_it() -> None:
    group: ReuseportGroup[int] = ReuseportGroup()
    with reuseport_group(3, listen=False) as members:
        for generation, member in enumerate(members[:2], start=1):
            member.listen(512)
            group.join(generation)
        steering.attach(members[0], group.program({1: 1, 2: 1}))
        members[2].listen(512)
        group.join(3)
        counts = tally(members, "127.0.0.1", 300)
        assert counts[2] == 0 and counts[0] > 0 and counts[1] > 0, counts
        steering.attach(members[0], group.program({3: 1}, {}))
        assert tally(members, "127.0.0.1", 100) == {2: 100}


@needs_kernel
@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_the_last_member_moves_into_the_hole_a_leaver_leaves(how: str) -> None:
    group: ReuseportGroup[int] = ReuseportGroup()
    with reuseport_group(4) as members:
        by_generation = dict(enumerate(members, start=1))
        for generation in by_generation:
            group.join(generation)
        leaver = by_generation.pop(2)
        if how == "close":
            leaver.close()
        else:
            leaver.shutdown(socket.SHUT_RDWR)  # the fd stays open, but the socket is out of the group
        group.leave(2)
        assert group.order() == (1, 4, 3)
        remaining = list(by_generation.values())
        for generation, member in by_generation.items():
            steering.attach(remaining[0], group.program({generation: 1}))
            assert tally(remaining, "127.0.0.1", 50) == {remaining.index(member): 50}, f"generation {generation}"


@needs_kernel
@pytest.mark.parametrize("program", [None, Program((Instruction(0x06, 0, 0, 2),), "return 2 of 2 members")])
def test_no_program_or_an_index_out_of_range_falls_back_to_the_hash(program: Program | None) -> None:
    with reuseport_group(2) as members:
        if program is not None:
            steering.attach(members[0], program)
        counts = tally(members, "127.0.0.1", 200)
        assert counts[0] > 20 and counts[1] > 20, counts  # hashed over the clients' ports: both get some


@needs_kernel
def test_a_placeholder_joined_before_a_leave_fills_the_hole_so_no_index_changes() -> None:
    with reuseport_group(3) as members:
        steering.attach(members[0], weighted([0, 0, 1]))  # the last member takes all; the middle one is passive
        with new_member("127.0.0.1", port_of(members)) as placeholder:
            placeholder.listen(512)
            members.pop(0).close()  # the placeholder, not the serving member, moves into the hole: no re-attach
            assert tally([*members, placeholder], "127.0.0.1", 200) == {1: 200}


@needs_kernel
def test_the_program_stays_with_the_group_when_the_socket_it_came_through_closes() -> None:
    with reuseport_group(3) as members:
        steering.attach(members[2], weighted([0, 1, 0]))
        members.pop().close()  # the last member: nobody moves
        assert tally(members, "127.0.0.1", 100) == {1: 100}


def test_the_group_keeps_the_kernels_order() -> None:
    group: ReuseportGroup[str] = ReuseportGroup()
    for key in "abcd":
        group.join(key)
    group.leave("b")
    assert group.order() == ("a", "d", "c") and group.index("c") == 2
    group.leave("c")  # the last: nothing moves
    assert group.order() == ("a", "d")
    with pytest.raises(ValueError):
        group.join("a")
    with pytest.raises(KeyError):
        group.leave("b")


def test_programs_name_what_they_do_and_encode_as_sock_filter() -> None:
    assert weighted([0, 3]).instructions == (Instruction(0x06, 0, 0, 1),)  # one member takes all: no random
    assert weighted([0, 3]).encode() == struct.pack("=HBBI", 0x06, 0, 0, 1)
    assert weighted([1, 3], {4000: 0}).description == "shares [1, 3], probe ports {4000: 0}"
    group: ReuseportGroup[int] = ReuseportGroup([7, 8])
    assert group.program({8: 1}, {4000: 7}).description == "shares {7: 0, 8: 1}, probe ports {4000 -> 7}"


@pytest.mark.parametrize(("shares", "probes"), [
    ([], {}), ([0, 0], {}), ([1, -1], {}), ([1, 0], {4000: 2}), ([1], {0: 0}), ([1], {70000: 0}),
    ([1], {port: 0 for port in range(1000, 1000 + steering.MAX_PROBE_PORTS + 1)}), ([2**32], {}),
])
def test_programs_refuse_what_the_kernel_would_hash_or_refuse(shares: list[int], probes: dict[int, int]) -> None:
    with pytest.raises(ValueError):
        weighted(shares, probes)


def test_a_group_refuses_keys_that_are_no_members() -> None:
    group: ReuseportGroup[int] = ReuseportGroup([1, 2])
    with pytest.raises(KeyError):
        group.program({3: 1})
    with pytest.raises(KeyError):
        group.program({1: 1}, {4000: 3})
    with pytest.raises(ValueError):
        Program((Instruction(0x06, 0, 0, 0),) * (steering.BPF_MAXINSNS + 1), "too long")


@needs_kernel
def test_the_longest_program_is_accepted_by_the_kernel() -> None:
    with reuseport_group(2) as members:
        probes = {port: 1 for port in range(1000, 1000 + steering.MAX_PROBE_PORTS - 1)}
        client, source_port = probe_client("127.0.0.1")
        steering.attach(members[0], weighted([1, 0], {**probes, source_port: 1}))
        assert land(members, "127.0.0.1", port_of(members), client) == 1


@needs_kernel
def test_a_probe_port_is_found_behind_ipv4_options() -> None:
    with reuseport_group(2) as members:
        client, source_port = probe_client("127.0.0.1")
        # Four NOP options make the IPv4 header 24 bytes: the port is read after the header's real length.
        client.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b"\x01\x01\x01\x01")
        steering.attach(members[0], weighted([1, 0], {source_port: 1}))
        assert land(members, "127.0.0.1", port_of(members), client) == 1


@needs_kernel
def test_udp_datagrams_are_steered_by_shares_and_probe_ports() -> None:
    members = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    with members[0], members[1], socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as prober:
        for member in members:
            member.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            member.bind(("127.0.0.1", port_of(members) if member is members[1] else 0))
            member.settimeout(2)
        prober.bind(("127.0.0.1", 0))
        steering.attach(members[0], weighted([1, 0], {prober.getsockname()[1]: 1}))
        prober.sendto(b"probe", ("127.0.0.1", port_of(members)))
        assert members[1].recv(16) == b"probe"
        for _ in range(20):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.sendto(b"user", ("127.0.0.1", port_of(members)))
                assert members[0].recv(16) == b"user"


@needs_kernel
def test_with_a_source_only_a_probe_from_that_address_is_steered_by_its_port() -> None:
    """Another client that happens to use a probe's port number, from another address, takes the shares."""
    with reuseport_group(2, "0.0.0.0") as members:
        port = port_of(members)
        client, source_port = probe_client("127.0.0.1")
        stranger = socket.socket()
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stranger.bind(("127.0.0.2", source_port))  # the same port number, from another address
        steering.attach(members[0], weighted([1, 0], {source_port: 1}, ipaddress.ip_address("127.0.0.1")))
        assert land(members, "127.0.0.1", port, client) == 1
        assert land(members, "127.0.0.1", port, stranger) == 0


@needs_kernel
def test_an_ipv6_probe_source_is_compared_word_by_word() -> None:
    with reuseport_group(2, "::1") as members:
        port = port_of(members)
        client, source_port = probe_client("::1")
        steering.attach(members[0], weighted([1, 0], {source_port: 1}, ipaddress.ip_address("::2")))
        assert land(members, "::1", port, client) == 0  # not from ::2: the shares
        again, source_port = probe_client("::1")
        steering.attach(members[0], weighted([1, 0], {source_port: 1}, ipaddress.ip_address("::1")))
        assert land(members, "::1", port, again) == 1
