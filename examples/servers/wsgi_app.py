"""Minimal WSGI app for gunicorn under supervise (sync, gthread or any other WSGI worker).

    supervise -l :8000 --chdir examples/servers -- gunicorn --no-control-socket wsgi_app:app

No framework and no code for the socket: gunicorn finds the inherited socket through LISTEN_FDS itself
(so no --bind: see README.md here).
`/` says which generation and process answered, `/readyz` is the readiness probe supervise uses by default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

GENERATION = os.environ.get("SUPERVISE_GENERATION", "0")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        status, body = "200 OK", f"hello from generation {GENERATION} pid {os.getpid()}\n".encode()
    elif path == "/readyz":
        status, body = "200 OK", b"ready\n"
    else:
        status, body = "404 Not Found", b"not found\n"
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]
