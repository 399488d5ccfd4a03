"""The kernel's socket tables over netlink (NETLINK_SOCK_DIAG, inet_diag): one exact lookup or one dump.

Reading /proc/net/tcp means reading every socket of the host; sock_diag asks the kernel for one socket by its
4-tuple, or for the sockets in some states on one local port, and gets them with their inode, owner and queue
lengths. This module only builds the requests, does the netlink round trip and parses the answers; what the
answers mean is up to attribution.py (who accepted a connection) and census.py (who listens on a port).

Linux only. Every function raises OSError where netlink or the inet_diag module is unavailable (other systems,
seccomp sandboxes, a kernel without CONFIG_INET_DIAG / CONFIG_INET_UDP_DIAG): callers fall back or say
"unknown", each as documented there.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4  # NETLINK_INET_DIAG in older headers
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NLMSG_ERRNO = struct.Struct("=i")
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid (shared with inet_diag_msg)
_REQUEST = struct.Struct("=BBBBI")
_SOCKID = struct.Struct("!HH16s16s")  # source port, destination port, source and destination address
_SOCKID_TAIL = struct.Struct("=III")  # interface, cookie[2]
_DIAG_MSG = struct.Struct("=BBBB")  # family, state, timer, retransmits
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_MSG_SIZE = _DIAG_MSG.size + _SOCKID.size + _SOCKID_TAIL.size + _MSG_TAIL.size
_RTATTR = struct.Struct("=HH")  # length, type
_INET_DIAG_REQ_BYTECODE = 1
_INET_DIAG_SKV6ONLY = 11  # sent for IPv6 sockets in LISTEN or CLOSE state without being asked
_BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, yes (jump if true), no (jump if false)
_BC_S_GE = 2
_BC_S_LE = 3
_NO_COOKIE = 0xFFFFFFFF
_RECEIVE_BUFFER = 65536  # the kernel fills dump messages up to 32 KiB: one recv() never truncates one

TCP_ESTABLISHED = 1
TCP_CLOSE = 7  # also: a UDP socket that is bound but not connected
TCP_LISTEN = 10
ALL_STATES = 0xFFFFFFFF


class DiagError(OSError):
    """The kernel answered a request with an error: its errno (ENOENT for an exact lookup that found nothing,
    EINVAL for a request it does not understand, ...)."""


@dataclass(frozen=True)
class DiagSocket:
    """One socket as inet_diag reports it.

    For a listening TCP socket `rqueue` is the number of connections waiting to be accepted and `wqueue` the
    accept queue's limit (the backlog); for other sockets they are the bytes in the receive and send queues.
    """

    family: int
    state: int
    local: tuple[str, int]
    remote: tuple[str, int]
    interface: int  # the bound device's index, 0 for none (SO_BINDTODEVICE)
    rqueue: int
    wqueue: int
    uid: int
    inode: int  # 0 while a connection waits in an accept queue: no file holds it yet
    v6only: bool | None  # IPV6_V6ONLY of an IPv6 socket in LISTEN or CLOSE state; None where not reported


def _packed(family: int, address: str) -> bytes:
    return socket.inet_pton(family, address).ljust(16, b"\0")


def _sockid(family: int, local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    return (_SOCKID.pack(local[1], remote[1], _packed(family, local[0]), _packed(family, remote[0]))
            + _SOCKID_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE))


def _port_filter(port: int) -> bytes:
    """inet_diag bytecode accepting only sockets whose local port is `port`: `sport >= port && sport <= port`.

    Each comparison is two ops (the second carries the port in its `no`); a false comparison jumps 4 bytes past
    the end, which rejects, and running off the exact end accepts. INET_DIAG_BC_S_EQ would be one op, but only
    kernels from 4.16 have it.
    """
    length = 4 * _BC_OP.size
    return (_BC_OP.pack(_BC_S_GE, 8, length + 4) + _BC_OP.pack(0, 0, port)
            + _BC_OP.pack(_BC_S_LE, 8, length - 8 + 4) + _BC_OP.pack(0, 0, port))


def _message(family: int, protocol: int, states: int, sockid: bytes, flags: int, bytecode: bytes = b"") -> bytes:
    body = _REQUEST.pack(family, protocol, 0, 0, states) + sockid
    if bytecode:
        body += _RTATTR.pack(_RTATTR.size + len(bytecode), _INET_DIAG_REQ_BYTECODE) + bytecode
    return _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, flags, 1, 0) + body


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:16 if family == socket.AF_INET6 else 4])


def _v6only(payload: bytes, offset: int, end: int) -> bool | None:
    """The INET_DIAG_SKV6ONLY attribute among the attributes from `offset` to `end`, if there."""
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            break
        if kind == _INET_DIAG_SKV6ONLY and length > _RTATTR.size:
            return bool(payload[offset + _RTATTR.size])
        offset += (length + 3) & ~3
    return None


def _parsed(payload: bytes, offset: int, end: int) -> DiagSocket:
    """The inet_diag_msg at `offset` (its attributes run to `end`)."""
    family, state = _DIAG_MSG.unpack_from(payload, offset)[:2]
    sport, dport, source, destination = _SOCKID.unpack_from(payload, offset + _DIAG_MSG.size)
    interface = _SOCKID_TAIL.unpack_from(payload, offset + _DIAG_MSG.size + _SOCKID.size)[0]
    rqueue, wqueue, uid, inode = _MSG_TAIL.unpack_from(payload, offset + _MSG_SIZE - _MSG_TAIL.size)[1:]
    return DiagSocket(family=family, state=state, local=(_address(family, source), sport),
                      remote=(_address(family, destination), dport), interface=interface, rqueue=rqueue,
                      wqueue=wqueue, uid=uid, inode=inode, v6only=_v6only(payload, offset + _MSG_SIZE, end))


def _exchange(message: bytes, dump: bool) -> list[DiagSocket]:
    """Send one request and collect the sockets of its answer: one message, or a dump's until NLMSG_DONE.

    Raises DiagError when the kernel answers with an error, OSError on any other netlink failure.
    """
    found: list[DiagSocket] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.sendto(message, (0, 0))
        while True:
            reply = nl.recv(_RECEIVE_BUFFER)
            offset = 0
            while offset + _NLMSG_HEADER.size <= len(reply):
                length, kind = _NLMSG_HEADER.unpack_from(reply, offset)[:2]
                if length < _NLMSG_HEADER.size or offset + length > len(reply):
                    raise OSError(errno.EBADMSG, "sock_diag: malformed netlink message")
                body = offset + _NLMSG_HEADER.size
                if kind in (_NLMSG_DONE, _NLMSG_ERROR):
                    # Both carry an errno: a dump that fails (no handler for the protocol) ends in a DONE with it.
                    code = -_NLMSG_ERRNO.unpack_from(reply, body)[0] if length >= _NLMSG_HEADER.size + _NLMSG_ERRNO.size else 0
                    if code:
                        raise DiagError(code, f"sock_diag: {errno.errorcode.get(code, code)}")
                    return found
                if length < _NLMSG_HEADER.size + _MSG_SIZE:
                    raise OSError(errno.EBADMSG, "sock_diag: short inet_diag_msg")
                found.append(_parsed(reply, body, offset + length))
                offset += (length + 3) & ~3
            if not dump:
                return found


def lookup(family: int, protocol: int, local: tuple[str, int], remote: tuple[str, int]) -> DiagSocket | None:
    """The one socket with this local and remote address (any state), or None when the kernel answers with an
    error instead (ENOENT: there is no such socket). The kernel looks the pair up as it would an arriving
    packet: with no connection of that pair it answers with the socket listening on `local`, if any.

    Raises OSError when the question cannot be asked (no netlink, no inet_diag).
    """
    message = _message(family, protocol, ALL_STATES, _sockid(family, local, remote), _NLM_F_REQUEST)
    try:
        found = _exchange(message, dump=False)
    except DiagError:
        return None
    return found[0] if found else None


def dump(family: int, protocol: int, states: int, port: int | None = None) -> list[DiagSocket]:
    """Every socket of `family` and `protocol` in one of `states` (a bit mask: 1 << TCP_LISTEN, ...) in this
    network namespace, only those on local `port` if given (filtered by the kernel).

    Raises OSError when the kernel cannot answer (no netlink, no inet_diag for this protocol).
    """
    any_address = "::" if family == socket.AF_INET6 else "0.0.0.0"
    sockid = _sockid(family, (any_address, 0), (any_address, 0))
    bytecode = b"" if port is None else _port_filter(port)
    return _exchange(_message(family, protocol, states, sockid, _NLM_F_REQUEST | _NLM_F_DUMP, bytecode), dump=True)
