"""Service names (--name): what a name may be, and the default that tells one app from another.

The name becomes file names — `NAME.sock` in the runtime directory, `NAME.state.json` in the state directory —
so it is a single path component of a small, safe alphabet: `x/../../y` can never place a file elsewhere.
Two supervisors of the same name share a control socket path and a rollout history (known-bad releases
included), so the default must differ between unrelated apps: it is the app (the script or module a runner
such as python or gunicorn is given, else the executable) and the first listener's port, `app-8080`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from .errors import UserError
from .listeners import ListenSpec

MAX_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Executables that run the app named by an argument (a script, a module, module:callable), not the app itself.
_RUNNER = re.compile(r"(python|pypy|node|nodejs|ruby|perl|php|java|deno|bun|sh|bash|dash|zsh)[0-9.]*|gunicorn|uvicorn|"
                     r"hypercorn|daphne|granian|uwsgi|waitress-serve|env")
_MODULE_CALLABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*):")
_SCRIPT_SUFFIXES = (".py", ".pyz", ".js", ".mjs", ".cjs", ".ts", ".rb", ".pl", ".php", ".sh", ".jar")
RULE = f"1 to {MAX_LENGTH} letters, digits, '.', '_' or '-', not starting with '.' or '-', without '..'"


def check_name(text: str) -> str:
    """`text` if it is a valid service name; else a UserError saying the rule."""
    if len(text) > MAX_LENGTH or not _NAME.fullmatch(text) or ".." in text:
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise UserError(f"invalid name {shown!r}: use {RULE}")
    return text


def default_name(command: Sequence[str], listen: Sequence[ListenSpec]) -> str:
    """The app and the first listener (`app-8080`, `server-app.sock`), or the app alone without a listener."""
    suffix = _listener_part(listen[0])[: MAX_LENGTH // 2] if listen else ""
    app = _safe(app_name(command))[: MAX_LENGTH - len(suffix) - 1] or "supervise"
    return check_name(f"{app}-{suffix}" if suffix else app)


def app_name(command: Sequence[str]) -> str:
    """What the command runs: `python app.py` → app, `gunicorn myapp.wsgi:application` → myapp.wsgi,
    `python -m http.server` → http.server, `./bin/server` → server."""
    executable = _stem(command[0]) if command else ""
    if not _RUNNER.fullmatch(executable):
        return executable
    args = list(command[1:])
    for arg in args:
        match = _MODULE_CALLABLE.match(arg)
        if match:
            return match.group(1)
    for flag, value in zip(args, args[1:]):
        if flag == "-m":
            return value
    if "-c" in args:
        return executable
    scripts = [arg for arg in args if not arg.startswith("-") and ("/" in arg or arg.endswith(_SCRIPT_SUFFIXES))]
    return _stem(scripts[0]) if scripts else executable


def _listener_part(spec: ListenSpec) -> str:
    if spec.kind == "unix":
        return _safe(os.path.splitext(os.path.basename((spec.path or "").lstrip("@")))[0])
    return str(spec.port) if spec.port else ""


def _stem(path: str) -> str:
    base = os.path.basename(path.rstrip("/"))
    for suffix in _SCRIPT_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def _safe(text: str) -> str:
    """`text` in the name alphabet: other characters become '-', and it starts with a letter, digit or '_'."""
    return re.sub(r"\.{2,}", ".", _UNSAFE.sub("-", text)).lstrip(".-")
