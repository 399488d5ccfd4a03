"""The network side of tests and benchmarks: they only ever listen and connect on loopback."""

from __future__ import annotations

import random
import socket
import urllib.error
import urllib.request

_BELOW = 10000  # the lowest port handed out: above the well-known and most registered services


def free_port() -> int:
    """A TCP port that nothing uses right now, on any address, IPv4 or IPv6.

    It is picked at random below the kernel's ephemeral range: a port bind(0) handed out from that range could
    be taken, before the test binds it, by any client socket of a concurrent test — a probe binding its source
    port, a load generator connecting — and the supervisor would refuse it as in use."""
    ephemeral = _ephemeral_start()
    generator = random.SystemRandom()
    for _ in range(1000):
        port = generator.randrange(_BELOW, ephemeral)
        if _unused(port):
            return port
    with socket.socket() as sock:  # a crowded machine: fall back to what the kernel picks
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return max(_BELOW + 1000, int(ports.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


def _unused(port: int) -> bool:
    """Whether a plain bind to the port succeeds on every address (no SO_REUSEADDR: a TIME_WAIT counts as used)."""
    families = [(socket.AF_INET, "0.0.0.0")] + ([(socket.AF_INET6, "::")] if socket.has_ipv6 else [])
    for family, address in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((address, port))
        except OSError:
            return False
    return True


def http_get(port: int, path: str = "/", timeout: float = 5.0, host: str = "127.0.0.1") -> tuple[int, str]:
    """GET on a fresh connection; (status, body). HTTP errors are returned, not raised."""
    url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
