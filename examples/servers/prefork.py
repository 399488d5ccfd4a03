"""A minimal prefork HTTP server (standard library only), the shape of gunicorn, uWSGI or Apache prefork.

    supervise -l :8000 -- python examples/servers/prefork.py --workers 4

The master takes the inherited socket (fd 3, LISTEN_FDS), forks `--workers` processes that accept on it, and
waits. Like most real prefork servers, the workers do not ask to die with their parent (no PR_SET_PDEATHSIG):
when the master is killed they go on serving. That is what supervise's per-generation cgroups and its
leftover removal at start are for (tests/test_fault_processes.py). `/` answers `hello from generation N pid P`,
`/readyz` answers 200. SIGTERM to the master stops the workers and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket

LISTEN_FDS_START = 3


def serve(listener: socket.socket, generation: str) -> None:
    """A worker: answer one request per connection, forever (SIGTERM ends it: default disposition)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(5.0)
            try:
                request = connection.recv(65536).split(b"\r\n", 1)[0].split()
            except OSError:
                continue
            path = request[1] if len(request) > 1 else b"/"
            body = b"ready\n" if path == b"/readyz" else f"hello from generation {generation} pid {os.getpid()}\n".encode()
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            try:
                connection.sendall(head + body)
            except OSError:
                continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4, choices=range(1, 65), metavar="1..64")
    options = parser.parse_args()
    if os.environ.get("LISTEN_FDS", "0") == "0" or os.environ.get("LISTEN_PID") != str(os.getpid()):
        parser.error("no inherited socket: run me under supervise (LISTEN_FDS)")
    listener = socket.socket(fileno=LISTEN_FDS_START)
    generation = os.environ.get("SUPERVISE_GENERATION", "0")
    workers = []
    for _ in range(options.workers):
        pid = os.fork()
        if pid == 0:
            serve(listener, generation)
        workers.append(pid)

    def stop(signum: int, _frame: object) -> None:
        for worker in workers:
            try:
                os.kill(worker, signal.SIGTERM)
            except ProcessLookupError:
                continue  # the signal reached the whole process group: it is gone already

    signal.signal(signal.SIGTERM, stop)
    for worker in workers:
        os.waitpid(worker, 0)


if __name__ == "__main__":
    main()
