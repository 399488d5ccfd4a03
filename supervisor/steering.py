"""Who gets each new connection of a SO_REUSEPORT group: the classic BPF program on the group, and the member order
its answers index into.

Every generation gets its own listening socket on the same address; together they form one reuseport group, and a
classic BPF program attached to the group (`SO_ATTACH_REUSEPORT_CBPF`, unprivileged, Linux >= 4.6) returns, for
each new connection (TCP SYN or UDP datagram), the index of the member that gets it. Facts checked on Linux 6.18
(tests/test_steering.py proves all but the last two with real sockets; the re-attach was measured under a connect
storm; the last is the kernel's documented rule):

- the index is the order in which the members called listen(), not bind();
- when a member leaves (its last reference is closed, or shutdown()) the LAST member moves into its slot;
- an index out of range makes the kernel fall back to its hash over all members; so does a group with no program;
- the program belongs to the group: it stays when the socket it was attached through is closed, and attaching
  again replaces it atomically (measured: 126,000 re-attaches under 39,000 connections lost none and sent none to
  a member no program named);
- the kernel admits to a group only sockets of the same user (and the same address and SO_REUSEPORT).

Rules for the caller, which follow from these facts:

- **join**: have a program attached BEFORE the newcomer calls listen(). A program returns only the indexes it was
  built for, so a member that joins after it gets nothing until a new program names it; with no program at all
  the kernel hashes over every member, the newcomer included.
- **leave**: first attach a program that gives the leaver nothing. The kernel renumbers at the leave, the program
  changes only at the next attach: in between, the old program's last index falls to the hash over all members
  (measured: ~0.1 ms; in 300 leaves under a connect storm, 16 to 138 connections reached a passive member). So a
  leave is clean only when the leaver is the last member, or when the last member gets nothing from the current
  program (then attach the new order's program right after). Otherwise first join a placeholder (a listening
  socket the supervisor holds, never accepts on and no program names): being last, it is what moves into the
  hole, every other index stays, and no connection can go astray. A placeholder leaves cleanly once it is last,
  or under the rule above.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h; Python's socket module does not name it
SO_DETACH_REUSEPORT_BPF = 68
BPF_MAXINSNS = 4096  # the kernel refuses a longer classic program
# Each probe port costs two instructions, tested one after another on every new connection, and the jump past all
# of them must fit a cBPF jump offset (one byte: 255 instructions). 64 keeps that in reach, the program cheap and
# far below BPF_MAXINSNS, and is many more probes than a rollout keeps in flight at once.
MAX_PROBE_PORTS = 64

# Classic BPF opcodes (linux/bpf_common.h, linux/filter.h).
_LD, _LDX, _ALU, _JMP, _RET = 0x00, 0x01, 0x04, 0x05, 0x06
_W, _H, _B = 0x00, 0x08, 0x10
_ABS, _IND, _MSH = 0x20, 0x40, 0xA0
_RSH, _MOD = 0x70, 0x90
_JA, _JEQ, _JGE = 0x00, 0x10, 0x30
# Offsets the kernel reads specially: SKF_NET_OFF is relative to the network (IP) header, because a reuseport
# program's packet data starts after the transport header; SKF_AD_OFF + SKF_AD_RANDOM reads a fresh random u32.
_SKF_NET_OFF = -0x100000
_SKF_AD_RANDOM = -0x1000 + 56
_IPV6_HEADER = 40
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPPROTO_TCP, _IPPROTO_UDP = 6, 17


@dataclass(frozen=True)
class Instruction:
    """One `struct sock_filter`: opcode, jump offsets when true and when false, and the constant `k`."""

    code: int
    jt: int
    jf: int
    k: int

    def encode(self) -> bytes:
        # k is a u32; negative offsets (SKF_NET_OFF, SKF_AD_OFF) are their two's complement.
        return struct.pack("=HBBI", self.code, self.jt, self.jf, self.k & 0xFFFFFFFF)


@dataclass(frozen=True)
class Program:
    """A classic BPF program for a reuseport group, and what it does in words (for logs and events)."""

    instructions: tuple[Instruction, ...]
    description: str

    def __post_init__(self) -> None:
        if not 0 < len(self.instructions) <= BPF_MAXINSNS:
            raise ValueError(f"a classic BPF program has 1 to {BPF_MAXINSNS} instructions, not {len(self.instructions)}")

    def encode(self) -> bytes:
        """The instructions as the kernel's `struct sock_filter` array."""
        return b"".join(instruction.encode() for instruction in self.instructions)


class _SockFprog(ctypes.Structure):
    """`struct sock_fprog`: the instruction count and a POINTER to them, so the instructions must sit in memory
    that ctypes owns; the struct itself is passed to setsockopt as bytes."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach(sock: socket.socket, program: Program) -> None:
    """Attach `program` to the reuseport group of `sock` (a bound member with SO_REUSEPORT), replacing the group's
    program atomically. Raises OSError when the kernel refuses it (ENOPROTOOPT: not supported here)."""
    instructions = ctypes.create_string_buffer(program.encode())
    fprog = _SockFprog(len(program.instructions), ctypes.addressof(instructions))
    # The kernel copies the instructions during the call; `instructions` is referenced until it returns.
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def detach(sock: socket.socket) -> None:
    """Take the program off the reuseport group of `sock`: the kernel hashes over every member again."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)


def supported() -> bool:
    """Whether this kernel steers reuseport groups with classic BPF: tried on a throwaway UDP socket."""
    if not hasattr(socket, "SO_REUSEPORT"):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind(("127.0.0.1", 0))
            attach(probe, weighted([1]))
        except OSError:
            return False
    return True


@dataclass
class _Assembler:
    """Instructions with jumps to named labels, resolved to the relative offsets cBPF wants once all are emitted:
    so the program below reads as its branches, and an offset cannot be miscounted."""

    lines: list[tuple[int, int | str, str | None, str | None]] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def op(self, code: int, k: int | str = 0, jt: str | None = None, jf: str | None = None) -> None:
        """One instruction; a label as `k` is an unconditional jump's target (`ja` keeps its offset in k)."""
        self.lines.append((code, k, jt, jf))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.lines)

    def assemble(self) -> tuple[Instruction, ...]:
        def offset(at: int, target: str | None, reach: int) -> int:
            # A jump goes forward by its offset from the next instruction; None is "the next instruction".
            distance = 0 if target is None else self.labels[target] - at - 1
            if not 0 <= distance <= reach:
                raise ValueError(f"jump to {target} out of reach ({distance})")  # a bug here, not bad input
            return distance

        return tuple(
            Instruction(code, offset(at, jt, 255), offset(at, jf, 255),
                        offset(at, k, 0xFFFFFFFF) if isinstance(k, str) else k)
            for at, (code, k, jt, jf) in enumerate(self.lines))


def weighted(shares: Sequence[int], probes: Mapping[int, int] | None = None,
             source: Address | None = None) -> Program:
    """The program that gives member i a new connection with probability shares[i] / sum(shares) (a share of 0:
    never), except that a connection from a client source port in `probes` goes to member probes[port] whatever the
    shares: that is how readiness probes reach a member that gets no other traffic. With `source`, only a
    connection from that address is a probe's (another host's client that happens to use the same port number
    takes the shares). IPv4, IPv6, and IPv4 reaching a dual-stack IPv6 socket are all read. Raises ValueError for
    shares that choose no member, or for an index out of range (the kernel would silently hash it)."""
    shares, probes = tuple(shares), dict(probes or {})
    if not shares or any(not isinstance(share, int) or share < 0 for share in shares) or sum(shares) == 0:
        raise ValueError(f"shares must be non-negative integers, at least one of them positive: {list(shares)}")
    if sum(shares) > 0xFFFFFFFF:
        raise ValueError(f"shares must add up to at most 2**32 - 1, not {sum(shares)}")
    if len(probes) > MAX_PROBE_PORTS:
        raise ValueError(f"at most {MAX_PROBE_PORTS} probe ports, not {len(probes)}")
    for port, member in probes.items():
        if not 0 < port < 65536 or not 0 <= member < len(shares):
            raise ValueError(f"probe port {port} -> member {member}: port 1-65535 and member 0-{len(shares) - 1}")
    code = _Assembler()
    if probes:
        _probe_section(code, probes, source)
    code.label("shares")
    _share_section(code, shares)
    description = f"shares {list(shares)}" + (f", probe ports {dict(sorted(probes.items()))}" if probes else "")
    description += f" from {source}" if probes and source is not None else ""
    return Program(code.assemble(), description)


def _probe_section(code: _Assembler, probes: Mapping[int, int], source: Address | None) -> None:
    """Load the client's source port into A, then return probes[port] if it is there; else go on to "shares".
    With `source`, a packet from any other address goes on to "shares" at once."""
    code.op(_LD | _B | _ABS, _SKF_NET_OFF)  # IP version nibble: a dual-stack IPv6 socket receives IPv4 too
    code.op(_ALU | _RSH, 4)
    code.op(_JMP | _JEQ, 4, jf="not-ipv4")
    if source is not None:
        _source_check(code, source, 4, _SKF_NET_OFF + 12)  # IPv4: the source address after 12 bytes
    code.op(_LDX | _B | _MSH, _SKF_NET_OFF)  # X = IPv4 header length (IHL * 4): it may carry options
    code.op(_LD | _H | _IND, _SKF_NET_OFF)  # A = source port, the first field of the TCP or UDP header
    code.op(_JMP | _JA, "ports")
    code.label("not-ipv4")
    code.op(_JMP | _JEQ, 6, jf="shares")
    # An IPv6 header with extension headers puts the port elsewhere: reading offset 40 there could match a probe
    # port by chance and send a user's connection to a passive member, so such packets take the shares.
    code.op(_LD | _B | _ABS, _SKF_NET_OFF + 6)
    code.op(_JMP | _JEQ, _IPPROTO_TCP, jt="ipv6-port")
    code.op(_JMP | _JEQ, _IPPROTO_UDP, jf="shares")
    code.label("ipv6-port")
    if source is not None:
        _source_check(code, source, 6, _SKF_NET_OFF + 8)  # IPv6: the source address after 8 bytes
    code.op(_LD | _H | _ABS, _SKF_NET_OFF + _IPV6_HEADER)
    code.label("ports")
    for port, member in sorted(probes.items()):
        code.op(_JMP | _JEQ, port, jf=f"after-{port}")
        code.op(_RET, member)
        code.label(f"after-{port}")


def _source_check(code: _Assembler, source: Address, version: int, offset: int) -> None:
    """Go on to "shares" unless the packet (of IP `version`, its source address at `offset`) comes from `source`:
    compared a 32-bit word at a time, in network order as `ld` reads it."""
    if source.version != version:
        code.op(_JMP | _JA, "shares")
        return
    packed = source.packed
    for word in range(len(packed) // 4):
        code.op(_LD | _W | _ABS, offset + 4 * word)
        code.op(_JMP | _JEQ, int.from_bytes(packed[4 * word:4 * word + 4], "big"), jf="shares")


def _share_section(code: _Assembler, shares: Sequence[int]) -> None:
    """Return member i with probability shares[i] / total: a random number modulo the total, compared with the
    running sums of the shares (members with share 0 have no interval, so they are never returned)."""
    chosen = [(member, share) for member, share in enumerate(shares) if share > 0]
    if len(chosen) == 1:
        code.op(_RET, chosen[0][0])  # one member takes all: no random number needed
        return
    # The random u32 modulo the total is biased by at most total / 2**32: nothing for shares as small as these.
    code.op(_LD | _W | _ABS, _SKF_AD_RANDOM)
    code.op(_ALU | _MOD, sum(shares))
    bound = 0
    for member, share in chosen[:-1]:
        bound += share
        code.op(_JMP | _JGE, bound, jt=f"above-{member}")  # A >= bound: a later member's interval
        code.op(_RET, member)
        code.label(f"above-{member}")
    code.op(_RET, chosen[-1][0])


Key = TypeVar("Key", bound=Hashable)


@dataclass
class ReuseportGroup(Generic[Key]):
    """The members of one reuseport group in the kernel's order, each named by an opaque key (its generation).

    The caller keeps this in step with the kernel: `join` right when the member's socket calls listen(), `leave`
    right when its last reference is closed (or it is shut down); `program` then maps shares and probes by key to
    the indexes the kernel will see. See the module's rules for the order of attach and join/leave."""

    members: list[Key] = field(default_factory=list)

    def join(self, key: Key) -> None:
        """A new member listens: it takes the next index."""
        if key in self.members:
            raise ValueError(f"{key!r} is already a member")
        self.members.append(key)

    def leave(self, key: Key) -> None:
        """A member leaves: the last member moves into its slot (nothing moves when it was the last). The module's
        leave rule says when that move can misroute, and how a placeholder avoids it."""
        hole = self.index(key)
        last = self.members.pop()
        if hole < len(self.members):
            self.members[hole] = last

    def index(self, key: Key) -> int:
        """The index the kernel knows `key`'s socket by; KeyError when it is no member."""
        try:
            return self.members.index(key)
        except ValueError:
            raise KeyError(key) from None

    def order(self) -> tuple[Key, ...]:
        """The members by index."""
        return tuple(self.members)

    def program(self, shares: Mapping[Key, int], probes: Mapping[int, Key] | None = None,
                source: Address | None = None) -> Program:
        """The program that gives each member its share (a member not named: 0) and sends each probe port (from
        `source`, when given) to its member. Raises KeyError for a key that is no member, ValueError as `weighted`
        does."""
        probes = dict(probes or {})
        for key in [*shares, *probes.values()]:
            self.index(key)
        program = weighted([shares.get(key, 0) for key in self.members],
                           {port: self.index(key) for port, key in probes.items()}, source)
        named = ", ".join(f"{key!r}: {shares.get(key, 0)}" for key in self.members)
        probed = ", ".join(f"{port} -> {key!r}" for port, key in sorted(probes.items()))
        return Program(program.instructions, f"shares {{{named}}}" + (f", probe ports {{{probed}}}" if probed else ""))
