"""`supervise check [OPTIONS] -- COMMAND`: everything the run form would refuse at start, found offline.

It takes the run form's options (the same click parameters, see cli.py) and the same config file, and checks
them with the functions the start-up uses — the schema, config.build, the env-file reader, release.resolve,
check_templates, the probe's target, the user lookup — plus what only a start would find out later: that each
hook and exec probe is a shell command `sh` can parse and whose program exists. It binds nothing, starts nothing
(but `sh -n`) and writes nothing. Every problem is one line, all of them are reported, and the exit status is 2
if there is any (0 and one "ok" line otherwise): usable as systemd's ExecStartPre= and in CI.

Not checked, as only a start can tell: whether a port is free, and (run as another user than root) whether
supervise may switch to --user.
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from . import config, envfile, schema
from .commands import SHELL
from .credentials import lookup
from .errors import UserError
from .probes import probe_target
from .release import check_templates, logical_cwd, resolve
from .spawn import ExecutableNotFound
from .textfile import read_text

_SHELL_TIMEOUT = 5.0  # seconds for `sh -n`: parsing a command line takes milliseconds

_HELP = """Check OPTIONS, the --config file, the --env-file files and COMMAND as `supervise` would at start,
without binding, starting or writing anything: exit 0 with one "ok" line, or one line per problem and exit 2.

\b
Takes every option of the run form. Use it before a deploy, in CI, or in a systemd unit:
  ExecStartPre=/usr/bin/supervise check --config /etc/app/supervise.toml
Not checked: whether the ports are free (only binding tells), and, unless run as root, whether supervise
could switch to --user.
"""


def check_command(run: click.Command) -> click.Command:
    """The `check` command: `run`'s parameters, each taking its value as text so that a bad one is reported with
    the others by the schema rather than stopping click at the first."""
    params = [_as_text(param) for param in run.params]
    return click.Command("check", params=params, callback=_check, help=_HELP,
                         context_settings=dict(run.context_settings), short_help="Validate a setup offline.")


def _as_text(param: click.Parameter) -> click.Parameter:
    if not isinstance(param, click.Option) or param.is_flag or param.name not in schema.SETTINGS:
        return param
    copied = copy.copy(param)
    copied.type = click.STRING
    return copied


@dataclass
class Report:
    """What `check` found: every problem, one line each, and the settings when they could be built."""

    problems: list[str] = field(default_factory=list)
    settings: config.Settings | None = None


def _check(**options: Any) -> None:
    context = click.get_current_context()
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    explicit = frozenset(name for name in options if context.get_parameter_source(name) in given)
    defaults = context.command.make_context("check", ["--", "true"]).params  # as click fills in an unused option
    report = examine(options, explicit, options.pop("config"), defaults)
    for problem in report.problems:
        click.echo(f"supervise check: {problem}", err=True)
    if report.problems or report.settings is None:
        sys.exit(2)
    settings = report.settings
    click.echo(f"supervise check: ok: {settings.name}: {' '.join(settings.command)}")


def examine(options: Mapping[str, Any], explicit: frozenset[str], path: Path | None,
            defaults: Mapping[str, Any]) -> Report:
    """Every problem of a setup, one line each: the options, the config file, the env files, then — once the
    settings can be built — what the start-up would find: command, working directory, listeners, probe, hooks,
    user, and where the control socket, state and pidfile go. A refused option's default stands in for it, so
    the rest can still be checked."""
    report = Report()
    merged = dict(options)
    for key, value in options.items():
        bad = list(_option_problems(key, value))
        report.problems.extend(problem for _, problem in bad)
        if bad and isinstance(value, tuple) and key != "command":  # a repeatable option keeps its good items
            merged[key] = tuple(item for item in value if item not in {item for item, _ in bad})
        elif bad:
            merged[key] = defaults.get(key)
    if path is not None:
        from_file, bad = _file_problems(path)
        report.problems.extend(bad)
        if bad:
            return report  # what the file would have set (often the command) is unknown
        merged.update({key: value for key, value in from_file.items() if key not in explicit})
    for item in merged.get("env_file") or ():
        try:
            envfile.load(envfile.reference(item))
        except UserError as exc:
            report.problems.append(str(exc))
            merged["env_file"] = ()  # named once: building the settings would read it again
    try:
        report.settings = config.build(merged)
    except UserError as exc:
        report.problems.append(str(exc))
        return report
    report.problems.extend(_start_problems(report.settings))
    return report


def _option_problems(key: str, value: Any) -> Iterator[tuple[Any, str]]:
    """A flag's value checked by the schema, each item of a repeatable one on its own: (the item, why)."""
    if key not in schema.SETTINGS or value is None:
        return
    items = list(value) if isinstance(value, tuple) and key != "command" else [value]
    for item in items:
        try:
            schema.command_line_options({key: (item,) if item is not value else item})
        except UserError as exc:
            yield item, str(exc)


def _file_problems(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The config file's values, or every key it has wrong (not only the first, as a start would say)."""
    try:
        return config.read_file(path), []
    except UserError as exc:
        first = str(exc)
    try:
        data = tomllib.loads(read_text(path, "config"))
    except (UserError, tomllib.TOMLDecodeError, RecursionError, ValueError):
        return {}, [first]  # unreadable, or not TOML: read_file's one line says it
    found = []
    for key, value in data.items():
        try:
            schema.file_options({key: value})
        except schema.Invalid as exc:
            found.append(f"config {path}: {exc}")
    return {}, found or [first]


def _start_problems(settings: config.Settings) -> Iterator[str]:
    """What runner._run and the first spawn would refuse, checked without doing any of it."""
    cwd: str | None = None
    try:
        release = resolve(settings.command, logical_cwd(settings.chdir), settings.env, os.environ.get("PATH"),
                          settings.version_file)
        cwd = release.cwd
    except ExecutableNotFound as exc:
        yield str(exc)
    names = [spec.name for spec in settings.listen]
    for argument in settings.command:
        try:
            check_templates([argument], names)
        except UserError as exc:
            yield str(exc)
    probe = settings.ready
    if probe is not None and probe.kind in ("http", "tcp"):
        tcp = [spec for spec in settings.listen if spec.kind == "tcp"]
        try:
            probe_target(probe, ("127.0.0.1", tcp[0].port) if tcp else None)
        except UserError as exc:
            yield str(exc)
    commands = {"--ready exec": probe.command if probe is not None and probe.kind == "exec" else None,
                "--pre-upgrade": settings.hooks.pre_upgrade, "--post-upgrade": settings.hooks.post_upgrade,
                "--on-rollback": settings.hooks.on_rollback}
    for option, command in commands.items():
        if command:
            yield from _shell_problems(option, command, cwd)
    if settings.user is not None or settings.group is not None:
        try:
            lookup(settings.user, settings.group)
        except UserError as exc:
            yield str(exc)
    places = [(settings.control_path, "control socket"), (settings.state_path, "state file")]
    for place, what in [*places, *([(settings.pidfile, "pidfile")] if settings.pidfile else [])]:
        problem = _unwritable(place, what)
        if problem:
            yield problem


def _shell_problems(option: str, command: str, cwd: str | None) -> Iterator[str]:
    """Whether `sh` exists, parses `command` (`sh -n`) and finds its first program (`command -v`), in the
    children's working directory, as the command would run."""
    if not os.access(SHELL, os.X_OK):
        yield f"{option}: cannot run {SHELL}: not an executable file"
        return
    try:
        parsed = _shell(["-n", "-c", command], cwd)
        if parsed.returncode != 0:
            detail = (parsed.stderr.strip().splitlines() or ["syntax error"])[-1]
            yield f"{option} {command!r}: {SHELL} cannot parse it: {detail}"
            return
        word = _first_word(command)
        if word is not None and _shell(["-c", 'command -v -- "$1"', "sh", word], cwd).returncode != 0:
            yield f"{option} {command!r}: {word}: command not found"
    except subprocess.TimeoutExpired:
        yield f"{option} {command!r}: {SHELL} took more than {_SHELL_TIMEOUT:g}s to parse it"


def _shell(arguments: list[str], cwd: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SHELL, *arguments], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=_SHELL_TIMEOUT)


def _first_word(command: str) -> str | None:
    """The program a simple command line starts with, or None where the shell decides (assignments, syntax)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    if not words or "=" in words[0] or any(char in words[0] for char in "$`(){};&|<>*?[]!"):
        return None
    return words[0]


def _unwritable(path: Path, what: str) -> str | None:
    """Why `path` could not be written at start (as runner._check_writable would find), creating nothing: the
    file itself if it exists, else the nearest existing directory above it, which the start would create in."""
    if path.is_dir():
        return f"cannot write {what} {path}: it is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"cannot write {what} {path}: permission denied"
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot write {what} {path}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write {what} {path}: permission denied in {existing}"
    return None
