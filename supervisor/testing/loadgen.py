"""Bounded HTTP/1.1 load generator for loopback targets (tests and benchmarks).

Pure asyncio, no HTTP library: the zero-loss tests must see every connection-level failure exactly as the
kernel reports it (refused, reset, closed early), not as a client library's retry or pool behaviour.

    gen = LoadGenerator("127.0.0.1", 8080, concurrency=8)
    gen.start()
    ...                       # upgrade the server under load
    stats = gen.stop()
    assert stats.failures == 0

Script mode:  python -m supervisor.testing.loadgen --port 8080 --seconds 5 --concurrency 8 [--keepalive] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

KEEPALIVE_RESET = "keepalive-reset"
CLOSE_WAIT_SECONDS = 1.0  # how long to wait for the server's FIN after a Connection: close response
MAX_HEAD_BYTES = 65536


@dataclass
class LoadStats:
    """Outcome of one load run; `samples` lets a caller split steady vs during-upgrade windows."""

    requests: int = 0
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error kind -> count
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    started: float = 0.0  # time.monotonic()
    stopped: float = 0.0  # time.monotonic()
    samples: list[tuple[float, float, bool]] = field(default_factory=list)  # (start, latency, ok)
    kinds: list[str | None] = field(default_factory=list)  # parallel to `samples`: each one's error kind, or None

    def record(self, start: float, latency: float, error: str | None) -> None:
        """Count one finished request; `error` is None on success, else its kind."""
        self.requests += 1
        self.samples.append((start, latency, error is None))
        self.kinds.append(error)
        if error is None:
            self.latencies.append(latency)
        else:
            self.failures += 1
            self.errors[error] = self.errors.get(error, 0) + 1

    def summary(self) -> dict[str, Any]:
        """Counts, throughput and latency percentiles (milliseconds) as a JSON-ready dict."""
        duration = max(self.stopped - self.started, 1e-9)
        ordered = sorted(self.latencies)
        return {
            "requests": self.requests,
            "failures": self.failures,
            "errors": dict(sorted(self.errors.items())),
            "seconds": round(duration, 3),
            "rps": round(self.requests / duration, 1),
            "p50_ms": _percentile_ms(ordered, 50),
            "p90_ms": _percentile_ms(ordered, 90),
            "p99_ms": _percentile_ms(ordered, 99),
            "max_ms": _percentile_ms(ordered, 100),
        }


def _percentile_ms(ordered: list[float], percent: int) -> float | None:
    """Nearest-rank percentile of sorted latencies, in ms; None when there are none."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * percent // 100))  # ceil without floats
    return round(ordered[rank - 1] * 1000, 3)


class RequestError(Exception):
    """A failed request; `kind` is the key it is counted under in LoadStats.errors."""

    def __init__(self, kind: str, *, before_response: bool = False) -> None:
        super().__init__(kind)
        self.kind = kind
        self.before_response = before_response  # no response byte arrived: the server may never have seen it


@dataclass
class Response:
    """What the generator needs from a response: its status and whether the connection may be reused."""

    status: int
    reusable: bool


class _Connection(asyncio.Protocol):
    """One client connection: buffers bytes and hands out complete responses one at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False  # EOF or connection lost
        self.lost_error: Exception | None = None
        self._wakeup: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost_error = exc
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _more(self) -> None:
        """Wait for more bytes, EOF or loss; raise if the connection is already finished."""
        if self.closed:
            raise self._closed_error()
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    def _closed_error(self) -> RequestError:
        before = not self.buffer
        if isinstance(self.lost_error, OSError):
            return RequestError(_os_error_kind(self.lost_error), before_response=before)
        return RequestError("eof", before_response=before)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        if self.closed or self.transport.is_closing():
            raise self._closed_error()
        self.transport.write(data)

    async def read_response(self) -> Response:
        """Read one whole response: headers, then Content-Length bytes or everything until close."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise RequestError("bad-response")
            await self._more()
        status, headers, version = _parse_head(bytes(self.buffer[:end]))
        del self.buffer[: end + 4]
        if "chunked" in headers.get("transfer-encoding", ""):
            raise RequestError("bad-response")  # our servers send Content-Length; chunked is not supported
        length = headers.get("content-length")
        if length is None:
            while not self.closed:
                await self._more()
            return Response(status, reusable=False)
        if not length.isdigit():
            raise RequestError("bad-response")
        while len(self.buffer) < int(length):
            await self._more()
        del self.buffer[: int(length)]
        connection = headers.get("connection", "").lower()
        keep = connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"
        return Response(status, reusable=keep and not self.closed)

    async def wait_closed(self, limit: float) -> None:
        """Wait (bounded) for the server to close first, so TIME_WAIT lands on its side, not on our ports."""
        try:
            async with asyncio.timeout(limit):
                while not self.closed:
                    await self._more()
        except (TimeoutError, RequestError):
            pass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _parse_head(head: bytes) -> tuple[int, dict[str, str], str]:
    """Status code, lower-cased headers and HTTP version of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise RequestError("bad-response")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers, parts[0]


def _os_error_kind(exc: OSError) -> str:
    """Short stable name for a socket error: refused, reset, or the errno name."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__).lower()


def _request_error_kind(exc: RequestError, reused: bool) -> str:
    """The error's kind, except that a reused connection dying before any response byte is the
    keep-alive race (the server closed it as idle while we sent), which is counted apart."""
    if reused and exc.before_response and exc.kind in ("reset", "eof"):
        return KEEPALIVE_RESET
    return exc.kind


def check_loopback(host: str) -> None:
    """Refuse anything but a loopback address literal: this tool must never load someone else's server."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"only loopback addresses (127.0.0.1, ::1) can be targeted, not {host!r}")


class LoadGenerator:
    """`concurrency` clients sending GETs back to back, in a background thread with its own event loop.

    keepalive=False opens a new connection per request (Connection: close). keepalive=True reuses
    connections; a connection-level error on a reused connection before any response byte is counted as
    "keepalive-reset", because any server closing an idle connection can cause it (see DESIGN.md).
    With `unix_path`, requests go to that unix stream socket and host/port only fill the Host header.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str = "/",
        concurrency: int = 8,
        keepalive: bool = False,
        max_requests: int = 1_000_000,
        max_seconds: float = 300.0,
        timeout: float = 10.0,
        *,
        unix_path: str | None = None,
    ) -> None:
        if unix_path is None:
            check_loopback(host)
        if concurrency < 1 or max_requests < 1 or max_seconds <= 0 or timeout <= 0:
            raise ValueError("concurrency, max_requests, max_seconds and timeout must be positive")
        self.host, self.port, self.unix_path = host, port, unix_path
        self.concurrency, self.keepalive = concurrency, keepalive
        self.max_requests, self.max_seconds, self.timeout = max_requests, max_seconds, timeout
        host_header = f"[{host}]" if ":" in host else host
        connection = "keep-alive" if keepalive else "close"
        self._request = (f"GET {path} HTTP/1.1\r\nHost: {host_header}:{port}\r\n"
                         f"Connection: {connection}\r\n\r\n").encode()
        self._stats = LoadStats()
        self._issued = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start sending in a background thread; returns at once."""
        if self._thread is not None:
            raise RuntimeError("a LoadGenerator runs once")
        self._stats.started = time.monotonic()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), name="loadgen", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends by itself (max_seconds or max_requests); True if it has ended."""
        if self._thread is None:
            raise RuntimeError("wait() before start()")
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> LoadStats:
        """Stop issuing requests, let those in flight finish (each bounded by `timeout`), return the stats."""
        if self._thread is None:
            raise RuntimeError("stop() before start()")
        self._stopping.set()
        self._thread.join()
        return self._stats

    async def _run(self) -> None:
        """The event loop's main task: all clients, until each has stopped."""
        deadline = self._stats.started + self.max_seconds
        try:
            await asyncio.gather(*(self._client(deadline) for _ in range(self.concurrency)))
        finally:
            self._stats.stopped = time.monotonic()

    def _may_issue(self, deadline: float) -> bool:
        """Claim the right to send one more request, unless stopped or a bound is reached."""
        if self._stopping.is_set() or self._issued >= self.max_requests or time.monotonic() >= deadline:
            return False
        self._issued += 1
        return True

    async def _client(self, deadline: float) -> None:
        """One client: a request at a time until stopped, reusing its connection when keep-alive allows."""
        connection: _Connection | None = None
        while self._may_issue(deadline):
            start = time.monotonic()
            reused = connection is not None
            try:
                async with asyncio.timeout(self.timeout):
                    connection = connection or await self._connect()
                    connection.send(self._request)
                    response = await connection.read_response()
                error = None if 200 <= response.status < 300 else f"http-{response.status}"
            except TimeoutError:
                response, error = None, "timeout"
            except RequestError as exc:
                response, error = None, _request_error_kind(exc, reused)
            except OSError as exc:
                response, error = None, _os_error_kind(exc)
            self._stats.record(start, time.monotonic() - start, error)
            connection = await self._settle(connection, response)
        if connection is not None:
            connection.close()

    async def _settle(self, connection: _Connection | None, response: Response | None) -> _Connection | None:
        """Keep the connection for the next request if keep-alive allows, otherwise close it."""
        if connection is None:
            return None
        if response is not None and response.reusable and self.keepalive:
            return connection
        if response is not None and not response.reusable:
            await connection.wait_closed(CLOSE_WAIT_SECONDS)
        connection.close()
        return None

    async def _connect(self) -> _Connection:
        """A new connection to the target (TCP, or the unix socket)."""
        loop = asyncio.get_running_loop()
        if self.unix_path is not None:
            _, protocol = await loop.create_unix_connection(_Connection, self.unix_path)
        else:
            _, protocol = await loop.create_connection(_Connection, self.host, self.port)
        return protocol


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Bounded HTTP load against a loopback server.")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--unix", metavar="PATH", help="send to this unix stream socket instead")
    parser.add_argument("--path", default="/")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument("--keepalive", action="store_true", help="reuse connections (HTTP/1.1 keep-alive)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run load for --seconds (or until --max-requests), print the summary; exit 1 if any request failed."""
    args = _parse_args(argv)
    try:
        generator = LoadGenerator(
            args.host, args.port, args.path, args.concurrency, args.keepalive,
            args.max_requests, args.seconds, args.timeout, unix_path=args.unix,
        )
    except ValueError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    generator.start()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the run early but still reports
        generator.wait()
    summary = generator.stop().summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print(" ".join(f"{key}={value}" for key, value in summary.items()))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
