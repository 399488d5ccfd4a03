"""WSGI twin of examples/app.py for the gunicorn baseline of benchmarks/upgrade_under_load.py.

    gunicorn --bind 127.0.0.1:8080 --workers 2 --pythonpath benchmarks wsgi_app:app

Same routes and answers as the aiohttp demo (`/`, `/readyz`), no framework. Each worker prints one line when
it has imported the app (gunicorn does not say when a worker can serve), which the benchmark uses as the
worker's "ready" instant. With SLOW_START=io:SECONDS or cpu:SECONDS (gunicorn `--env`, kept across its USR2
re-exec) the import takes that long first: see slow_start.py.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

if os.environ.get("SLOW_START"):
    from slow_start import start_up  # benchmarks/ is on gunicorn's --pythonpath

    start_up(os.environ["SLOW_START"])

# One write() per line: print() writes the text and the newline separately, and the workers share stderr.
os.write(sys.stderr.fileno(), f"wsgi_app: pid {os.getpid()} loaded\n".encode())


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        status, body = "200 OK", f"hello from gunicorn worker pid {os.getpid()}\n".encode()
    elif path == "/readyz":
        status, body = "200 OK", b"ready\n"
    else:
        status, body = "404 Not Found", b"not found\n"
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]
