r"""Minimal aiohttp application for gunicorn's aiohttp worker under supervise.

    supervise -l :8000 --chdir examples/servers -- \
        gunicorn --no-control-socket -k aiohttp.GunicornWebWorker aiohttp_app:app

Not recommended (see README.md here): this worker closes connections still waiting for their first request when
it drains, and sometimes stops answering. For aiohttp, use examples/app.py: it takes fd 3 itself and drains
without loss.
"""

from __future__ import annotations

import os

from aiohttp import web

GENERATION = os.environ.get("SUPERVISE_GENERATION", "0")


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello from generation {GENERATION} pid {os.getpid()}\n")


async def readyz(request: web.Request) -> web.Response:
    return web.Response(text="ready\n")


app = web.Application()
app.add_routes([web.get("/", hello), web.get("/readyz", readyz)])
