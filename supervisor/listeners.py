"""Listening sockets: parsed from --listen, bound once (or adopted from systemd) and held by the supervisor.

A generation inherits a socket on every listener, and the supervisor keeps its copy while the generation lives:
connections queued in an accept backlog belong to the socket, not to a process, so a generation exiting never
takes them with it. A TCP listener supervise binds itself is steered (traffic.py): each later generation gets a
`sibling` on the same address, in the first socket's SO_REUSEPORT group. Others are shared by every generation.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import StartupError, UserError

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,255}$")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[^:]+)$")
_FORMS = "HOST:PORT, :PORT, [IPv6]:PORT, udp://HOST:PORT or unix:PATH"
_TCP_FORMS = "a TCP address: HOST:PORT, :PORT or [IPv6]:PORT"


@dataclass(frozen=True)
class ListenSpec:
    """One --listen argument, parsed. `host` None means every address."""

    name: str
    kind: str  # "tcp" | "udp" | "unix"
    host: str | None = None
    port: int = 0
    path: str | None = None
    explicit_name: bool = False

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = self.host if self.host is not None else ""
        shown = f"[{host}]" if ":" in host else host
        return f"{'udp://' if self.kind == 'udp' else ''}{shown}:{self.port}"


def parse_listen(text: str, index: int, option: str = "--listen", forms: str = _FORMS) -> ListenSpec:
    """Parse `[NAME=]ADDRESS`: `HOST:PORT`, `:PORT`, `PORT`, `[::1]:PORT`, `tcp://…`, `udp://…`, `unix:PATH`;
    errors name `option` and, for an address of no known form, the `forms` it takes."""
    name, address, explicit = f"listen{index}", text.strip(), False
    head, sep, rest = address.partition("=")
    if sep and _NAME.match(head) and ":" not in head:
        name, address, explicit = head, rest.strip(), True
    if not address:
        raise UserError(f"invalid {option} {text!r}: no address")
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        path = path[2:] if path.startswith("//") else path
        if not path:
            raise UserError(f"invalid {option} {text!r}: unix: needs a path, like unix:/run/app.sock")
        return ListenSpec(name, "unix", path=path, explicit_name=explicit)
    kind = "tcp"
    for scheme in ("tcp", "udp"):
        if address.startswith(scheme + "://"):
            kind, address = scheme, address[len(scheme) + 3:]
    if address.isdigit():
        address = ":" + address
    match = _HOST_PORT.match(address)
    if not match:
        raise UserError(f"invalid {option} {text!r}: expected {forms}")
    host = match.group("v6") if match.group("v6") is not None else match.group("host")
    port_text = match.group("port")
    if not port_text.isdigit():
        raise UserError(f"invalid {option} {text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise UserError(f"invalid {option} {text!r}: port {port} is out of range (0-65535)")
    return ListenSpec(name, kind, host=host or None, port=port, explicit_name=explicit)


def parse_tcp_address(text: str, option: str) -> ListenSpec:
    """A TCP address for a server of the supervisor's own (--metrics-listen): `HOST:PORT`, `:PORT`, `PORT`,
    `[::1]:PORT` or `tcp://…` — no name, udp:// or unix: (nothing of it is passed to children)."""
    spec = parse_listen(text, 0, option, _TCP_FORMS)
    if spec.kind != "tcp" or spec.explicit_name:
        raise UserError(f"invalid {option} {text!r}: expected {_TCP_FORMS}")
    return spec


@dataclass(eq=False)
class Listener:
    """A bound (or adopted) socket held open by the supervisor for its whole life."""

    name: str
    kind: str
    sock: socket.socket
    spec: ListenSpec | None = None
    adopted: bool = False
    unix_inode: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """The address actually bound, for logs and status (`127.0.0.1:8080`, `[::]:8080`, `unix:/x.sock`)."""
        local = self.sock.getsockname()
        if self.sock.family == socket.AF_UNIX:
            text = local.decode(errors="replace") if isinstance(local, bytes) else local
            return "unix:" + (text.replace("\0", "@", 1) if text.startswith("\0") else text)
        host, port = local[0], local[1]
        prefix = "udp://" if self.kind == "udp" else ""
        return f"{prefix}[{host}]:{port}" if ":" in host else f"{prefix}{host}:{port}"

    @property
    def tcp_port(self) -> int | None:
        """The bound port of a TCP listener, else None."""
        if self.kind != "tcp":
            return None
        return int(self.sock.getsockname()[1])

    def probe_address(self) -> tuple[str, int]:
        """Where a local probe connects to reach this TCP listener (loopback for a wildcard bind)."""
        host, port = self.sock.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            dual = self.sock.family == socket.AF_INET6 and not self.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            host = "127.0.0.1" if host == "0.0.0.0" or dual else "::1"
        return host, int(port)

    def close(self) -> None:
        """Close the socket; remove a unix socket file that is still the one we created."""
        if self.unix_inode and not self.adopted:
            path = self.sock.getsockname()
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == self.unix_inode:
                    os.unlink(path)
            except OSError:
                pass
        self.sock.close()


def _describe_bind_error(spec: ListenSpec, exc: OSError) -> str:
    where = str(spec)
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: address already in use (is another server running?)"
    if exc.errno == errno.EACCES:
        if spec.kind != "unix" and spec.port < 1024:
            return f"cannot listen on {where}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        return f"cannot listen on {where}: permission denied"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: address not available on this machine"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def _resolve(spec: ListenSpec) -> tuple[socket.AddressFamily, tuple]:
    """The family and bind address for a TCP/UDP spec; a missing host means every address (dual-stack)."""
    if spec.host is None:
        if socket.has_ipv6:
            try:
                socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
                return socket.AF_INET6, ("::", spec.port)
            except OSError:
                pass
        return socket.AF_INET, ("0.0.0.0", spec.port)
    kind = socket.SOCK_DGRAM if spec.kind == "udp" else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(spec.host, spec.port, type=kind, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {spec}: unknown host {spec.host!r} ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    return family, address


def _bind_inet(spec: ListenSpec, backlog: int, nodelay: bool, reuseport: bool) -> socket.socket:
    family, address = _resolve(spec)
    kind = socket.SOCK_DGRAM if spec.kind == "udp" else socket.SOCK_STREAM
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if spec.host is None else 1)
        if kind == socket.SOCK_STREAM and nodelay:
            # Accepted sockets inherit TCP_NODELAY from the listener; servers handed a bare fd never set it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        if reuseport:
            # Set only after the bind, which is the "port in use" check: with SO_REUSEPORT before it, a second
            # supervise (or any server of the same user that sets it) would silently share the port with us.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise StartupError(_describe_bind_error(spec, exc)) from None
    return sock


def sibling(listener: Listener) -> Listener:
    """Another socket on a steered listener's address, bound but not yet listening: the next generation's own,
    which joins the listener's SO_REUSEPORT group when it listens (traffic.py)."""
    held = listener.sock
    sock = socket.socket(held.family, held.type)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if held.family == socket.AF_INET6:
            v6only = held.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        nodelay = held.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, nodelay)
        sock.bind(held.getsockname())
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot open another socket on {listener.address} for the next generation: "
                           f"{exc.strerror or exc}") from None
    return Listener(listener.name, listener.kind, sock, listener.spec)


def _unix_path(spec: ListenSpec) -> str:
    assert spec.path is not None
    return "\0" + spec.path[1:] if spec.path.startswith("@") else spec.path


def _remove_stale_unix_socket(spec: ListenSpec, path: str) -> None:
    """Remove a leftover socket file, but only if nothing answers on it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"cannot listen on {spec}: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError:
        return  # not refused: leave it and let bind report the real problem
    finally:
        probe.close()
    raise StartupError(f"cannot listen on {spec}: another process is serving on {path}")


def _bind_unix(spec: ListenSpec, backlog: int, mode: int | None) -> tuple[socket.socket, tuple[int, int] | None]:
    path = _unix_path(spec)
    if not path.startswith("\0"):
        _remove_stale_unix_socket(spec, path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
        if path.startswith("\0"):
            return sock, None
        if mode is not None:
            os.chmod(path, mode)
        st = os.stat(path)
        return sock, (st.st_dev, st.st_ino)
    except OSError as exc:
        sock.close()
        raise StartupError(_describe_bind_error(spec, exc)) from None


def bind(spec: ListenSpec, backlog: int, nodelay: bool, unix_mode: int | None, reuseport: bool = False) -> Listener:
    """Bind one listener as its spec says; `reuseport`: it is steered (each generation gets a sibling)."""
    if spec.kind == "unix":
        sock, inode = _bind_unix(spec, backlog, unix_mode)
        return Listener(spec.name, "unix", sock, spec, unix_inode=inode)
    return Listener(spec.name, spec.kind, _bind_inet(spec, backlog, nodelay, reuseport), spec)


def inherited_from_systemd(environ: dict[str, str] | os._Environ[str]) -> list[tuple[str, socket.socket]]:
    """Sockets passed to *this* process by socket activation (LISTEN_FDS with LISTEN_PID = our pid)."""
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
        pid = int(environ.get("LISTEN_PID", "0"))
    except ValueError:
        return []
    if count <= 0 or pid != os.getpid():
        return []
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    found = []
    for index in range(count):
        fd = 3 + index
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)  # only the spawn path hands fds to children, and at known numbers
        found.append((names[index] if index < len(names) and names[index] else f"listen{index}", sock))
    return found


def _kind_of(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return "unix"
    return "udp" if sock.type == socket.SOCK_DGRAM else "tcp"


def _same_address(spec: ListenSpec, sock: socket.socket) -> bool:
    """Whether an inherited socket is the one a --listen spec describes (port and kind, for unmatched names)."""
    if _kind_of(sock) != spec.kind:
        return False
    if spec.kind == "unix":
        return sock.getsockname() in (spec.path, _unix_path(spec).encode())
    return int(sock.getsockname()[1]) == spec.port


def open_listeners(
    specs: tuple[ListenSpec, ...], backlog: int, nodelay: bool, unix_mode: int | None, inherited: list[tuple[str, socket.socket]],
    steered: Callable[[ListenSpec], bool] = lambda spec: False,
) -> list[Listener]:
    """Adopt what systemd passed (matched by name, then by address) and bind the rest, in --listen order.

    On any failure every socket opened so far is closed again, so a failed start leaves nothing behind.
    """
    pool = list(inherited)
    opened: list[Listener] = []
    try:
        for spec in specs:
            match = next((item for item in pool if item[0] == spec.name), None)
            match = match or next((item for item in pool if _same_address(spec, item[1])), None)
            if match:
                pool.remove(match)
                opened.append(Listener(spec.name, _kind_of(match[1]), match[1], spec, adopted=True))
            else:
                opened.append(bind(spec, backlog, nodelay, unix_mode, steered(spec)))
        opened.extend(Listener(name, _kind_of(sock), sock, None, adopted=True) for name, sock in pool)
    except BaseException:
        for listener in opened:
            listener.close()
        raise
    return opened

