"""Who listens on a port: the census that steered cutover needs around its SO_REUSEPORT group.

Each generation gets its own socket in one SO_REUSEPORT group, and a BPF program picks a socket by its index in
the group. Any process of the same user can bind the same address with SO_REUSEPORT and silently join the
group: it then gets a share of the connections, and every index after it is off by one. `foreign_members` finds
such a socket so the supervisor stops steering; `in_use` says whether anything listens on an address before
the supervisor binds there.

What the kernel puts in one group (checked on Linux 6.18, see tests/test_sock_diag.py): sockets of the same
user, family, exact bound address, port, IPV6_V6ONLY setting and bound device. So 0.0.0.0:P and 127.0.0.1:P
are two groups, and so are a dual-stack [::]:P, a v6-only [::]:P and 0.0.0.0:P. Of several groups on a port
one takes all of a connection: the most specific address wins (127.0.0.1 over 0.0.0.0, ::1 over ::), then a
socket bound to the arriving device, then for IPv4 an AF_INET socket over a dual-stack [::]. Such a listener is
not a member (the BPF program's indices stay right, steering cannot help) but it can take every connection from
the whole group: `in_use` lists it with every other overlapping listener, `foreign_members` does not.

Every function answers None when the kernel cannot be asked (no netlink, no inet_diag, not Linux): the caller
must then assume the worst it can afford (not steer, or not refuse a port), never "nothing there".
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from . import sock_diag


@dataclass(frozen=True)
class ListeningSocket:
    """A socket that listens on a port: a TCP socket in LISTEN state, or a bound UDP socket not connected."""

    family: int
    address: str
    port: int
    inode: int  # os.fstat(sock.fileno()).st_ino of the socket, in whichever process holds it
    uid: int
    interface: int  # index of the device it is bound to (SO_BINDTODEVICE), 0 for none
    v6only: bool  # always False for IPv4; True for an IPv6 socket that takes no IPv4 connection
    queued: int  # TCP: connections waiting to be accepted; UDP: bytes of datagrams waiting to be read
    backlog: int | None  # TCP: the accept queue's limit; UDP: None (the kernel reports the send queue there)


def _census(family: int, port: int, protocol: int) -> list[ListeningSocket]:
    udp = protocol == socket.IPPROTO_UDP
    state = sock_diag.TCP_CLOSE if udp else sock_diag.TCP_LISTEN
    return [ListeningSocket(family=found.family, address=found.local[0], port=found.local[1], inode=found.inode,
                            uid=found.uid, interface=found.interface, v6only=bool(found.v6only),
                            queued=found.rqueue, backlog=None if udp else found.wqueue)
            for found in sock_diag.dump(family, protocol, 1 << state, port)]


def listening(family: int, port: int, protocol: int = socket.IPPROTO_TCP) -> list[ListeningSocket] | None:
    """The sockets of `family` listening on local `port` in this network namespace, whoever holds them; None
    when the kernel cannot be asked.

    One netlink dump, filtered by port in the kernel (inet_diag bytecode): the kernel still walks every
    listening socket of the host, but only the matching ones are copied and parsed.
    """
    try:
        return _census(family, port, protocol)
    except OSError:
        return None


def _same(family: int, one: str, other: str) -> bool:
    return socket.inet_pton(family, one) == socket.inet_pton(family, other)


def foreign_members(family: int, address: str, port: int, ours: set[int],
                    protocol: int = socket.IPPROTO_TCP) -> list[ListeningSocket] | None:
    """Sockets in the SO_REUSEPORT group of `address:port` that are not ours (`ours`: the inodes of the
    supervisor's own sockets); None when the kernel cannot be asked.

    A member has our family, exact address and port, and the IPV6_V6ONLY setting and bound device of our own
    sockets in the group (read from the same answer; while none of ours listens, any setting counts). The
    kernel admits only sockets of the same user, so a socket of another user is never a member.
    """
    found = listening(family, port, protocol)
    if found is None:
        return None
    group = [each for each in found if _same(family, each.address, address)]
    keys = {(each.v6only, each.interface, each.uid) for each in group if each.inode in ours}
    return [each for each in group
            if each.inode not in ours and (not keys or (each.v6only, each.interface, each.uid) in keys)]


_Claim = tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address]


def _claims(address: str, v6only: bool) -> set[_Claim]:
    """The (IP version, address) pairs a socket bound to `address` receives on; an unspecified address stands
    for all of its version. An IPv6 socket that is not v6-only also takes IPv4: all of it when bound to ::, one
    address when bound to a v4-mapped one."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return {(4, ip.ipv4_mapped)}
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_unspecified and not v6only:
        return {(6, ip), (4, ipaddress.IPv4Address(0))}
    return {(ip.version, ip)}


def _overlap(one: Iterable[_Claim], other: Iterable[_Claim]) -> bool:
    return any(version == version2 and (ip == ip2 or ip.is_unspecified or ip2.is_unspecified)
               for version, ip in one for version2, ip2 in other)


def in_use(family: int, address: str, port: int, protocol: int = socket.IPPROTO_TCP,
           dual_stack: bool = False) -> list[ListeningSocket] | None:
    """The sockets already listening where a socket bound to `address:port` would receive (empty: nothing
    does); None when the kernel cannot be asked. `dual_stack`: the socket would be a [::] that also takes IPv4.

    Overlapping means what the kernel refuses a bind without SO_REUSEPORT for: the same address, or a wildcard
    on either side (0.0.0.0 or :: of the same version, a dual-stack :: for IPv4 too), whatever the device.
    Only listeners count: a TCP socket bound but not listening, or a connected UDP socket, is not seen. Unlike a
    bind, this also sees a UDP holder when both sides set SO_REUSEADDR (the kernel lets those share a port).

    The answer can be stale by the time the caller binds. To refuse a port atomically, bind the first socket
    without SO_REUSEPORT and turn it on before listen(): later SO_REUSEPORT sockets still join its group (see
    tests/test_sock_diag.py). This census then names who holds the port, and catches the UDP case above.
    """
    wanted = _claims(address, not dual_stack)
    families = [socket.AF_INET, socket.AF_INET6] if any(version == 4 for version, _ in wanted) else [family]
    found: list[ListeningSocket] = []
    for each_family in families:
        listed = listening(each_family, port, protocol)
        if listed is None:
            return None
        found += [each for each in listed if _overlap(wanted, _claims(each.address, each.v6only))]
    return found
