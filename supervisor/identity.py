"""A release's identity: what tells one deploy from another, so that a release that failed is not retried blindly.

Three sources, strongest first:
1. A version file the deploy writes (`--version-file`): the operator's word is the identity and its name.
2. The content of what is executed: the executable, every file named in argv, modules named as `pkg.mod:attr`
   (gunicorn, uvicorn, hypercorn) or after `-m`.
3. A cheap metadata digest (path, size, mtime_ns, inode) of the working directory tree and of the
   executable's directory: it sees a settings file or a module edited in place, which (2) cannot.

The walk in (3) is bounded. Past the bound the identity is *unknown*: nothing is ever refused on it, because a
false "known bad" in the middle of an incident is far worse than retrying a release that rolls back losslessly.
Files the server itself writes into its working directory make every identity new; that errs the same safe way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .counted import counted
from .release import Release

MAX_ENTRIES = 20_000
MAX_SECONDS = 0.2
VERSION_MAX = 200  # characters of a version file's first line that name a release
_CHUNK = 1 << 20
# Directories that are caches or tooling, never what a release runs: their churn must not make a release "new".
_SKIPPED = frozenset({".git", ".hg", ".svn", "__pycache__", "node_modules", ".tox", ".nox", ".mypy_cache",
                      ".pytest_cache", ".ruff_cache", ".cache"})
_MODULE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):[A-Za-z_][\w.]*(?:\(.*\))?$")


@dataclass(frozen=True)
class Identity:
    """Who a release is. `known` False: it could not be told (the walk hit its bound); never refuse on it."""

    digest: str
    content: str  # the digest of what is executed alone (no metadata walk, no version file)
    executable: str
    argv: tuple[str, ...]
    cwd: str
    version: str | None = None
    covers: str = ""
    known: bool = True
    env: str = ""  # a digest of the variables it gets (--env, --env-file, [env]): tells configurations apart

    @property
    def name(self) -> str:
        """How logs and status name the release: its version when the operator gave one, else its digest."""
        return self.version or self.digest

    def as_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "version": self.version, "covers": self.covers, "known": self.known,
                "executable": self.executable, "argv": list(self.argv), "cwd": self.cwd, "env": self.env}

    def same_code(self, other: Identity) -> bool:
        """Whether two identities are the same release as far as can be told (content alone when a walk failed)."""
        if self.known and other.known:
            return self.digest == other.digest
        return self.content == other.content


@dataclass(frozen=True)
class Bounds:
    """How far a metadata walk may go before the identity is declared unknown."""

    entries: int = MAX_ENTRIES
    seconds: float = MAX_SECONDS


def identify(release: Release, bounds: Bounds = Bounds()) -> Identity:
    """The identity of `release` as it is on disk now. Blocking file I/O: call it from a worker thread."""
    named = list(content_files(release))
    content = hashlib.sha256()
    for path in named:
        content.update(path.encode() + b"\0")
        _hash_file(content, path)
    content.update(json.dumps([release.executable, list(release.argv), release.cwd, list(release.env)]).encode())
    content_digest = content.hexdigest()[:16]
    env = hashlib.sha256(json.dumps(list(release.env)).encode()).hexdigest()[:12]
    fields = {"content": content_digest, "executable": release.executable, "argv": release.argv, "cwd": release.cwd,
              "env": env}
    version, problem = read_version(release)
    if version is not None:
        digest = hashlib.sha256(f"{version}\0{content_digest}".encode()).hexdigest()[:16]
        return Identity(digest, version=version, covers=f"version file {release.version_file}", **fields)
    walk = _Walk(bounds)
    walk.tree(release.cwd)
    walk.directory(os.path.dirname(release.executable))
    files = f"{counted(len(named), 'file')} hashed" + (f"; {problem}" if problem else "")
    if walk.exceeded:
        return Identity(content_digest, covers=f"unknown: {walk.exceeded} ({files})", known=False, **fields)
    digest = hashlib.sha256(f"{content_digest}\0{walk.digest.hexdigest()}".encode()).hexdigest()[:16]
    entries = counted(walk.entries, "entry")
    return Identity(digest, covers=f"{files}, metadata of {entries} under {release.cwd}", **fields)


def content_files(release: Release) -> Iterator[str]:
    """The files whose content a release runs: the executable, files named in argv, and named modules."""
    yield release.executable
    args = release.argv[1:]
    for position, arg in enumerate(args):
        path = arg if os.path.isabs(arg) else os.path.join(release.cwd, arg)
        if os.path.isfile(path):
            yield path
            continue
        module = arg if position > 0 and args[position - 1] == "-m" else _module_of(arg)
        if module:
            yield from _module_files(release.cwd, module)


def read_version(release: Release) -> tuple[str | None, str | None]:
    """(the release's version, why there is none) from its version file; relative to the release's directory."""
    if not release.version_file:
        return None, None
    path = os.path.join(release.cwd, release.version_file)
    try:
        with open(path, "rb") as handle:
            first = handle.read(4096).decode("utf-8", "replace").splitlines()
    except OSError as exc:
        return None, f"version file {release.version_file}: {exc.strerror}"
    text = "".join(ch for ch in (first[0] if first else "").strip() if ch.isprintable())[:VERSION_MAX]
    return (text, None) if text else (None, f"version file {release.version_file} is empty")


def _module_of(arg: str) -> str | None:
    match = _MODULE.match(arg)
    return match.group(1) if match else None


def _module_files(cwd: str, module: str) -> Iterator[str]:
    base = os.path.join(cwd, *module.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            yield candidate
            return


def _hash_file(digest: Any, path: str) -> None:
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        digest.update(b"<unreadable>")


@dataclass
class _Walk:
    """A bounded metadata digest of directories: entries in sorted order, never following a link or a mount."""

    bounds: Bounds
    digest: Any = field(default_factory=hashlib.sha256)
    entries: int = 0
    exceeded: str = ""
    _deadline: float = 0.0

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.bounds.seconds

    def tree(self, root: str) -> None:
        """Every entry below `root` on the same filesystem; a virtualenv counts by what is installed in it."""
        try:
            device = os.lstat(root).st_dev
        except OSError:
            return
        pending = [root]
        while pending and not self.exceeded:
            directory = pending.pop()
            entries = self._list(directory)
            if any(entry.name == "pyvenv.cfg" for entry in entries):
                self._virtualenv(directory)
                continue
            for entry in entries:
                info = self._add(entry)
                if info is not None and stat.S_ISDIR(info.st_mode) and info.st_dev == device:
                    pending.append(entry.path)

    def directory(self, path: str) -> None:
        """The entries of one directory, not below (the executable's: /usr/bin must not be walked whole)."""
        for entry in self._list(path):
            self._add(entry)

    def _virtualenv(self, root: str) -> None:
        """What is installed (site-packages' top level: `pkg-1.2.dist-info` names the version) and its scripts."""
        for lib in ("lib", "lib64"):
            for python in self._list(os.path.join(root, lib)):
                self.directory(os.path.join(python.path, "site-packages"))
        self.directory(os.path.join(root, "bin"))

    def _list(self, path: str) -> list[os.DirEntry[str]]:
        """A directory's entries in name order, caches and tooling left out."""
        try:
            with os.scandir(path) as listing:
                return sorted((entry for entry in listing if entry.name not in _SKIPPED), key=lambda entry: entry.name)
        except OSError:
            return []

    def _add(self, entry: os.DirEntry[str]) -> os.stat_result | None:
        """Count and digest one entry; None when it cannot be read or the bound is reached."""
        if self.exceeded:
            return None
        self.entries += 1
        if self.entries > self.bounds.entries:
            self.exceeded = f"more than {self.bounds.entries} entries"
            return None
        if self.entries % 256 == 0 and time.monotonic() > self._deadline:
            self.exceeded = f"walking took longer than {self.bounds.seconds:g}s"
            return None
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            return None
        if stat.S_ISDIR(info.st_mode):
            self.digest.update(f"d {entry.path}\n".encode())  # its mtime changes with skipped caches: not digested
        elif stat.S_ISLNK(info.st_mode):
            self.digest.update(f"l {entry.path} {_readlink(entry.path)}\n".encode())
        else:
            self.digest.update(f"f {entry.path} {info.st_size} {info.st_mtime_ns} {info.st_ino}\n".encode())
        return info


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"
