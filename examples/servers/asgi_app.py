"""Minimal ASGI app for uvicorn, hypercorn and gunicorn's ASGI workers under supervise.

    supervise -l :8000 --chdir examples/servers -- uvicorn --backlog 4096 asgi_app:app --fd {fd}

No framework and no code for the socket: the server is told the inherited fd on its command line.
`/` says which generation and process answered, `/readyz` is the readiness probe supervise uses by default.
The lifespan protocol is answered so that servers running it (uvicorn, hypercorn, gunicorn -k asgi) are happy.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

GENERATION = os.environ.get("SUPERVISE_GENERATION", "0")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope.get("path", "/")
    if path == "/":
        status, body = 200, f"hello from generation {GENERATION} pid {os.getpid()}\n".encode()
    elif path == "/readyz":
        status, body = 200, b"ready\n"
    else:
        status, body = 404, b"not found\n"
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
