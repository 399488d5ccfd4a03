#!/usr/bin/env python3
"""Stdlib-only HTTP test server that plays good and bad releases for the integration tests.

Serves on the socket the supervisor passes (systemd convention: fd 3.., LISTEN_FDS, LISTEN_PID), or binds
--host/--port itself. One thread per connection; on SIGTERM it stops accepting (closes its own fd of the
listening socket, never shutdown(): the socket is shared with the next generation), finishes in-flight
requests and exits 0. Flags make it misbehave in the ways a real release can (see --help).

It imports only light stdlib modules and speaks just enough HTTP/1.1 itself, because start-up time is
test time: it must be accepting within a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

LISTEN_FDS_START = 3
DRAIN_TIMEOUT = 30.0  # longest wait for in-flight requests after accepting stopped
POLL_SECONDS = 0.05  # how often the accept loop and idle connections look at the drain state
FIRST_REQUEST_TIMEOUT = 10.0  # a new connection gets this long to send its request, even while draining
KEEPALIVE_TIMEOUT = 60.0  # idle keep-alive connections are closed after this long
IO_TIMEOUT = 10.0  # one blocking read or write on a connection
MAX_HEAD_BYTES = 65536
CRASH_EXIT_CODE = 3

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}
TEXT = "text/plain; charset=utf-8"


class BadRequest(Exception):
    """The client sent something that is not an HTTP/1.x request: answer 400 and close."""


@dataclass
class Request:
    """The parts of a request the routes look at."""

    path: str
    query: dict[str, list[str]]
    keep_alive: bool


@dataclass
class Stub:
    """Options plus the state shared by the accept loop, the connection threads and the signal handler."""

    options: argparse.Namespace
    listener: socket.socket
    where: str  # "fd 3" or "127.0.0.1:8080", for log lines
    generation: int
    started: float = field(default_factory=time.monotonic)
    grandchildren: list[int] = field(default_factory=list)
    first_ready_at: float | None = None  # monotonic; when /readyz first answered 200 (--sick-after counts from it)
    listener_closed: bool = False  # --close-listener-after has closed our fd of the listening socket
    stop_accepting_at: float | None = None  # monotonic; set by SIGTERM/SIGINT
    drain_signal: str = ""
    accepting_stopped: threading.Event = field(default_factory=threading.Event)
    connections: set[threading.Thread] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    leaked: list[bytes] = field(default_factory=list)  # --leak-per-*: held for the life of the process

    @property
    def draining(self) -> bool:
        return self.stop_accepting_at is not None

    def log(self, message: str) -> None:
        """One write per line: stderr is shared with the supervisor, whose JSON lines must not be split by ours."""
        os.write(2, f"stub: pid {os.getpid()} gen {self.generation} tag {self.options.tag} {message}\n".encode())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="HTTP test server simulating good and bad releases.")
    parser.add_argument("--host", default="127.0.0.1", help="bind here when no socket is inherited")
    parser.add_argument("--port", type=int, default=8080, help="bind here when no socket is inherited")
    parser.add_argument("--socket-name", help="use the inherited socket with this LISTEN_FDNAMES name")
    parser.add_argument("--tag", default="stub", help="echoed in / and /env to tell releases apart")
    parser.add_argument("--exit-at-start", type=int, metavar="CODE", help="exit at once with CODE")
    parser.add_argument("--start-delay", type=float, default=0.0, metavar="S", help="sleep before accepting")
    parser.add_argument("--never-ready", action="store_true", help="/readyz always 503")
    parser.add_argument("--warm-up", type=float, default=0.0, metavar="S",
                        help="accept at once, but answer 503 to every path (/readyz too) for S s after start")
    parser.add_argument("--no-readyz", action="store_true", help="/readyz is 404")
    parser.add_argument("--sick-after", type=float, metavar="S",
                        help="/readyz 503 from S s after it first answered 200 (ready first, however slow the start)")
    parser.add_argument("--crash-after", type=float, metavar="S", help="os._exit(3) S s after start")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM")
    parser.add_argument("--grandchildren", type=int, default=0, metavar="N",
                        help="fork N sleeping processes (every second one calls setsid())")
    parser.add_argument("--notify", action="store_true", help="send READY=1 to NOTIFY_SOCKET once accepting")
    parser.add_argument("--notify-delay", type=float, metavar="S",
                        help="send READY=1 S s after accepting starts (implies --notify)")
    parser.add_argument("--drain-delay", type=float, default=0.0, metavar="S",
                        help="on SIGTERM keep accepting S s before draining")
    parser.add_argument("--shutdown-listener-after", type=float, metavar="S",
                        help="shutdown(SHUT_RDWR) the listening socket S s after accepting starts (once), then go on "
                             "accepting whenever it listens again")
    parser.add_argument("--close-listener-after", type=float, metavar="S",
                        help="close our fd of the listening socket S s after being ready (first /readyz 200 or "
                             "READY=1) and accept nothing more, while staying up and answering READY")
    parser.add_argument("--listen-backlog", type=int, metavar="N", help="listen(N) on the inherited socket at start")
    parser.add_argument("--log-requests", action="store_true", help="one line on stderr per request (an access log)")
    parser.add_argument("--leak-per-second", type=float, default=0.0, metavar="MIB",
                        help="grow by MIB MiB of resident memory every second once listening (a leaking release)")
    parser.add_argument("--leak-per-request", type=float, default=0.0, metavar="KIB",
                        help="keep KIB KiB of resident memory for every request answered on /")
    return parser.parse_args(argv)


def env_int(name: str) -> int | None:
    """An integer environment variable, None when unset or not a number."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def inherited_socket(name: str | None) -> tuple[socket.socket, int] | None:
    """The listening socket passed by the supervisor and its fd, or None when not socket-activated.

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
            raise SystemExit(f"stub: no inherited socket named {name!r} (LISTEN_FDNAMES={':'.join(names)})")
        index = names.index(name)
    fd = LISTEN_FDS_START + index
    sock = socket.socket(fileno=fd)  # family and type are read from the fd
    sock.set_inheritable(False)
    return sock, fd


def open_listener(options: argparse.Namespace) -> tuple[socket.socket, str]:
    """The inherited socket, or a socket bound to --host/--port for standalone runs."""
    inherited = inherited_socket(options.socket_name)
    if inherited is not None:
        return inherited[0], f"fd {inherited[1]}"
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.create_server((options.host, options.port), family=family)
    host, port = sock.getsockname()[:2]
    return sock, f"{host}:{port}"


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
        print(f"stub: pid {os.getpid()} cannot notify {address!r}: {exc}", file=sys.stderr, flush=True)


def spawn_grandchildren(count: int, listener: socket.socket) -> list[int]:
    """Fork `count` processes that sleep until killed; every second one leaves our session with setsid().

    They close their copy of the listening socket: they stand for helper processes, not servers. Forked
    before any thread or signal handler exists, so they have default dispositions (SIGTERM kills them).
    Each is waited for until set up, so tests never see one still in our session before its setsid().
    """
    pids = []
    for index in range(count):
        set_up_read, set_up_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(set_up_read)
                if index % 2 == 1:
                    os.setsid()
                listener.close()
                os.close(set_up_write)  # EOF for the parent: set up
                while True:
                    time.sleep(3600)
            finally:
                os._exit(0)
        os.close(set_up_write)
        os.read(set_up_read, 1)
        os.close(set_up_read)
        pids.append(pid)
    return pids


def install_signal_handlers(stub: Stub) -> None:
    """SIGTERM/SIGINT start the drain (SIGTERM is ignored with --ignore-term)."""

    def drain(signum: int, _frame: object) -> None:
        if stub.stop_accepting_at is None:
            stub.stop_accepting_at = time.monotonic() + stub.options.drain_delay
            stub.drain_signal = signal.Signals(signum).name  # logged by the main loop: no I/O in handlers

    signal.signal(signal.SIGINT, drain)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if stub.options.ignore_term else drain)


def notify_ready(stub: Stub) -> None:
    """READY=1; it also counts as being ready for --close-listener-after."""
    sd_notify("READY=1")
    if stub.first_ready_at is None:
        stub.first_ready_at = time.monotonic()


def leak(stub: Stub, size: int) -> None:
    """Hold `size` more bytes for good; written, so the pages are resident (not the kernel's shared zero page)."""
    with stub.lock:
        stub.leaked.append(b"x" * size)


def leak_every_tenth_second(stub: Stub) -> None:
    """Thread body of --leak-per-second: a tenth of the rate ten times a second, until the process ends."""
    while True:
        leak(stub, int(stub.options.leak_per_second * (1 << 20) / 10))
        time.sleep(0.1)


def start_timers(stub: Stub) -> None:
    """--crash-after, --leak-per-second and the delayed READY=1 of --notify run on their own daemon threads."""
    options = stub.options
    if options.leak_per_second > 0:
        threading.Thread(target=leak_every_tenth_second, args=(stub,), daemon=True).start()
    if options.crash_after is not None:
        delay = max(0.0, stub.started + options.crash_after - time.monotonic())
        timer = threading.Timer(delay, os._exit, (CRASH_EXIT_CODE,))
        timer.daemon = True
        timer.start()
    if options.notify or options.notify_delay is not None:
        timer = threading.Timer(options.notify_delay or 0.0, notify_ready, (stub,))
        timer.daemon = True
        timer.start()


def accept_until_drain(stub: Stub) -> None:
    """Accept connections, a thread each, until the drain starts; then close our fd of the listener.

    The socket is non-blocking: with several processes woken for one connection, the losers must get
    EAGAIN rather than block in accept() where a drain could not interrupt them.
    """
    stub.listener.setblocking(False)
    poller = select.poll()
    poller.register(stub.listener, select.POLLIN)
    shutdown_at = None if stub.options.shutdown_listener_after is None else (
        time.monotonic() + stub.options.shutdown_listener_after)
    while stub.stop_accepting_at is None or time.monotonic() < stub.stop_accepting_at:
        if shutdown_at is not None and time.monotonic() >= shutdown_at:
            shutdown_at = None
            try:
                stub.listener.shutdown(socket.SHUT_RDWR)  # the fault under test: it stops the socket for everyone
                stub.log(f"shut down the listening socket at {time.time():.6f}")
            except OSError as exc:  # ENOTCONN: an earlier instance already did, and nobody revived it
                stub.log(f"cannot shut down the listening socket: {exc}")
        if close_listener_due(stub):
            poller.unregister(stub.listener)
            stub.listener.close()
            stub.listener_closed = True
            stub.log("closed its listening socket: accepting nothing more")
        if stub.listener_closed:
            time.sleep(POLL_SECONDS)
        elif poller.poll(POLL_SECONDS * 1000):
            accept_pending(stub)
    stub.listener.close()  # close, never shutdown(): the next generation accepts on the same socket
    stub.accepting_stopped.set()


def close_listener_due(stub: Stub) -> bool:
    """Whether --close-listener-after says to close our listening fd now."""
    after, ready_at = stub.options.close_listener_after, stub.first_ready_at
    return not stub.listener_closed and after is not None and ready_at is not None and time.monotonic() >= ready_at + after


def accept_pending(stub: Stub) -> None:
    """Accept every connection queued right now and give each its own thread."""
    while True:
        try:
            conn, _ = stub.listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError:  # EINVAL: the socket no longer listens (shut down); poll says so until it listens again
            time.sleep(POLL_SECONDS)
            return
        thread = threading.Thread(target=serve_connection, args=(stub, conn), daemon=True)
        with stub.lock:
            stub.connections.add(thread)
        thread.start()


def wait_for_connections(stub: Stub) -> bool:
    """Wait (at most DRAIN_TIMEOUT) for every connection thread to finish; True if they all did."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        with stub.lock:
            remaining = list(stub.connections)
        if not remaining:
            return True
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return False
        remaining[0].join(timeout)


def serve_connection(stub: Stub, conn: socket.socket) -> None:
    """Thread body: answer requests on one connection, then close it and forget the thread."""
    try:
        with conn:
            conn.settimeout(IO_TIMEOUT)
            answer_requests(stub, conn)
    except OSError:
        pass  # the client went away or stalled: nothing more to answer
    finally:
        with stub.lock:
            stub.connections.discard(threading.current_thread())


def answer_requests(stub: Stub, conn: socket.socket) -> None:
    """Answer requests until the client closes, asks to close, or the drain ends an idle keep-alive."""
    buffer = bytearray()
    served = 0
    while wait_for_request(stub, conn, buffer, first=served == 0):
        try:
            request = read_request(conn, buffer)
        except BadRequest:
            send_response(conn, 400, b"bad request\n", TEXT, keep_alive=False)
            return
        if request is None:
            return
        status, body, content_type = route(stub, request)
        keep_alive = request.keep_alive and not stub.accepting_stopped.is_set()
        send_response(conn, status, body, content_type, keep_alive)
        if stub.options.log_requests:
            stub.log(f'"GET {request.path}" {status} {len(body)}')
        served += 1
        if not keep_alive:
            return


def wait_for_request(stub: Stub, conn: socket.socket, buffer: bytearray, first: bool) -> bool:
    """True once request bytes are available; False to close an idle connection.

    The first request is always waited for, even while draining: the connection was accepted, so its
    request is on the way and dropping it would fail a client that did nothing wrong. An idle keep-alive
    connection is closed when the drain has started.
    """
    if buffer:
        return True
    deadline = time.monotonic() + (FIRST_REQUEST_TIMEOUT if first else KEEPALIVE_TIMEOUT)
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    while time.monotonic() < deadline:
        if poller.poll(POLL_SECONDS * 1000):
            return True
        if not first and stub.accepting_stopped.is_set():
            return False
    return False


def read_request(conn: socket.socket, buffer: bytearray) -> Request | None:
    """Read one request head (and discard its body) from the connection; None at EOF."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise BadRequest("request head too large")
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    lines = buffer[:end].decode("latin-1").split("\r\n")
    del buffer[: end + 4]
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(lines[0])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise BadRequest(f"Content-Length: {length}")
    discard_body(conn, buffer, int(length))
    connection = headers.get("connection", "")
    keep_alive = connection == "keep-alive" if parts[2] == "HTTP/1.0" else connection != "close"
    target = urlsplit(parts[1])
    return Request(target.path, parse_qs(target.query), keep_alive)


def discard_body(conn: socket.socket, buffer: bytearray, length: int) -> None:
    """Drop a request body: no route reads one, but the next request starts after it."""
    while len(buffer) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionResetError("body cut short")
        buffer += chunk
    del buffer[:length]


def send_response(conn: socket.socket, status: int, body: bytes, content_type: str, keep_alive: bool) -> None:
    """Write a whole response; Connection: close tells a keep-alive client to go elsewhere."""
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    conn.sendall(head.encode() + body)


def route(stub: Stub, request: Request) -> tuple[int, bytes, str]:
    """Status, body and content type for a request."""
    if time.monotonic() - stub.started < stub.options.warm_up:
        return 503, f"warming up {stub.options.tag} gen={stub.generation} pid={os.getpid()}\n".encode(), TEXT
    if request.path == "/":
        if stub.options.leak_per_request > 0:
            leak(stub, int(stub.options.leak_per_request * 1024))
        return 200, f"ok {stub.options.tag} gen={stub.generation} pid={os.getpid()}\n".encode(), TEXT
    if request.path == "/readyz":
        return readyz(stub)
    if request.path == "/slow":
        return slow(request)
    if request.path == "/burst":
        megabytes = int(request.query.get("mb", ["100"])[0])
        threading.Thread(target=burst, args=(stub, megabytes), daemon=True).start()
        return 200, f"writing {megabytes} MB to stdout\n".encode(), TEXT
    if request.path == "/env":
        import json  # only /env needs it; kept out of start-up

        return 200, json.dumps(env_report(stub)).encode(), "application/json"
    return 404, b"not found\n", TEXT


def burst(stub: Stub, megabytes: int) -> None:
    """/burst?mb=N: N MiB of 100-byte lines on stdout as fast as it takes them, then one line on stderr."""
    line = b"burst " + b"x" * 93 + b"\n"
    block = line * ((1 << 20) // len(line)) + line[: (1 << 20) % len(line) - 1] + b"\n"
    began = time.monotonic()
    for _ in range(megabytes):
        view = memoryview(block)
        while view:
            view = view[os.write(1, view):]
    stub.log(f"burst done: {megabytes} MiB in {time.monotonic() - began:.3f}s")


def readyz(stub: Stub) -> tuple[int, bytes, str]:
    """/readyz as shaped by --no-readyz, --never-ready and --sick-after; 503 once draining.

    --sick-after counts from the first 200, not from the start: a test of "sick after it was found ready" must
    not depend on how quickly a loaded machine starts the process and probes it."""
    options = stub.options
    if options.no_readyz:
        return 404, b"not found\n", TEXT
    now = time.monotonic()
    sick = (options.sick_after is not None and stub.first_ready_at is not None
            and now - stub.first_ready_at >= options.sick_after)
    if options.never_ready or sick or stub.draining:
        return 503, b"not ready\n", TEXT
    if stub.first_ready_at is None:
        stub.first_ready_at = now
    return 200, b"ready\n", TEXT


def slow(request: Request) -> tuple[int, bytes, str]:
    """/slow?t=SECONDS: answer after that long (the long-request tests)."""
    try:
        seconds = min(max(float(request.query.get("t", ["1"])[0]), 0.0), 300.0)
    except ValueError:
        return 400, b"t must be a number of seconds\n", TEXT
    time.sleep(seconds)
    return 200, f"slept {seconds}\n".encode(), TEXT


def env_report(stub: Stub) -> dict[str, object]:
    """What the tests check about the contract with the child: process, LISTEN_*, generation, argv."""
    names = os.environ.get("LISTEN_FDNAMES")
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "listen_pid": env_int("LISTEN_PID"),
        "listen_fds": env_int("LISTEN_FDS"),
        "listen_fdnames": names.split(":") if names is not None else None,
        "generation": stub.generation,
        "notify_socket": os.environ.get("NOTIFY_SOCKET"),
        "argv": sys.argv,
        "tag": stub.options.tag,
        "grandchildren": stub.grandchildren,
        "environ": dict(os.environ),
    }


def wait_start_delay(stub: Stub) -> bool:
    """Sleep --start-delay before accepting; False if told to stop meanwhile (like a real server, a slow starter
    stops on SIGTERM: tests of a release that never gets ready must not also wait out a drain timeout)."""
    if stub.options.start_delay <= 0:
        return True
    deadline = time.monotonic() + stub.options.start_delay
    while (remaining := deadline - time.monotonic()) > 0:
        if stub.draining:
            return False
        time.sleep(min(remaining, POLL_SECONDS))
    return not stub.draining


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain; 0 after a clean drain (or the --exit-at-start code)."""
    options = parse_args(argv)
    if options.exit_at_start is not None:
        return int(options.exit_at_start)
    listener, where = open_listener(options)
    if options.listen_backlog is not None:
        listener.listen(options.listen_backlog)  # the fault under test: the backlog is the socket's, not ours
    stub = Stub(options, listener, where, generation=env_int("SUPERVISE_GENERATION") or 0)
    stub.grandchildren = spawn_grandchildren(options.grandchildren, listener)
    install_signal_handlers(stub)
    if not wait_start_delay(stub):
        stub.log(f"got {stub.drain_signal} while starting: exiting")
        return 0
    stub.log(f"listening on {where}")
    start_timers(stub)
    accept_until_drain(stub)
    stub.log(f"got {stub.drain_signal}: stopped accepting, finishing in-flight requests")
    if not wait_for_connections(stub):
        stub.log(f"in-flight requests still running after {DRAIN_TIMEOUT}s, exiting anyway")
        return 1
    stub.log("drained")
    return 0


if __name__ == "__main__":
    sys.exit(main())
