"""The command line: `supervise [OPTIONS] -- COMMAND [ARG...]`. Parsing only; the work is in runner.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from . import __version__, schema
from .completion import complete_subcommand
from .config import Settings, from_command_line
from .errors import UserError
from .split_units import refuse_split_units

_EPILOG = """
\b
How an upgrade works (SIGHUP, or `systemctl reload`):
  1. a new generation of COMMAND starts beside the serving one, with its own socket on each TCP
     address (--cutover steered): no user connection reaches it yet;
  2. it must pass --ready (answered by *its* processes, not the old ones) within --ready-timeout;
  3. new connections go to it (over --ramp), the old one keeps running through the --watch
     window while the new one is health-checked, and takes them back if it fails;
  4. once nothing waited in its socket for --drain-delay, the old generation gets
     --drain-signal and --drain-timeout to finish, then SIGKILL.
  Any failure before step 4 removes only the new generation: the old one never stopped serving.

\b
What the child gets: the sockets at fds 3, 4, ... in --listen order, and
  LISTEN_FDS, LISTEN_PID (its own pid), LISTEN_FDNAMES, NOTIFY_SOCKET (private to
  the instance), SUPERVISE_GENERATION, SUPERVISE_INSTANCE (0..N-1 with -n N). In
  arguments, {fd} is replaced by the first socket's fd number and {fd:NAME} by
  that listener's.

\b
Signals: HUP upgrade · TERM/INT drain everything and exit 0 · second INT or QUIT
  kill everything now · USR1, USR2, WINCH forwarded to the serving generation.

\b
Examples:
  supervise --listen :8080 -- python examples/app.py
  supervise -l 127.0.0.1:8080 --ready http:/healthz -- gunicorn --no-control-socket app:app
  supervise -l :8000 -- uvicorn --backlog 4096 app:app --fd {fd}
  supervise -l unix:/run/app.sock --ready notify -- ./server
  supervise -l :8080 -n 4 --strategy rolling --batch 1 -- ./server
  supervise check -l :8080 -- ./server    # validate offline: "ok" and exit 0, or a line per problem, exit 2
"""


class Checked(click.ParamType):
    """A flag's value checked by its entry in the schema: the same type and range as the config file's key."""

    def __init__(self, key: str, metavar: str) -> None:
        self.key, self.name = key, metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return schema.SETTINGS[self.key].parse(value)
        except schema.Invalid as exc:
            self.fail(str(exc), param, ctx)


def _duration(key: str) -> Checked:
    return Checked(key, "DURATION")


def _integer(key: str) -> Checked:
    return Checked(key, "INTEGER")


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "allow_interspersed_args": False, "max_content_width": 100},
    epilog=_EPILOG,
)
@click.option("-c", "--config", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="TOML file with any of these options (names with underscores, plus command = [...], [env], [hooks]). "
                   "Read again on every upgrade; flags given here win over it.")
@click.option("-l", "--listen", "listen", multiple=True, metavar="[NAME=]ADDRESS",
              help="Socket to hold and pass on (repeatable): HOST:PORT, :PORT (all addresses), [::1]:PORT, "
                   "tcp://…, udp://HOST:PORT, unix:/path. NAME shows in LISTEN_FDNAMES (default listen0, listen1, …).")
@click.option("--ready", metavar="SPEC", help="Readiness and health probe: http[://HOST:PORT][/PATH], tcp[://HOST:PORT], "
              "notify (READY=1), exec:COMMAND, delay:DURATION. Default: http /readyz on the first TCP listener, where "
              "a 404 counts as 'no readiness endpoint, serving'; without a TCP listener, delay:1s.")
@click.option("--ready-timeout", type=_duration("ready_timeout"), default="60s", show_default=True, help="How long a new generation may take to become ready.")
@click.option("--probe-timeout", type=_duration("probe_timeout"), default="2s", show_default=True, help="Timeout of one probe attempt.")
@click.option("--watch", type=_duration("watch"), default="5s", show_default=True,
              help="After ready, how long the new generation takes the traffic and is health-checked while the old "
                   "one keeps running, to take it back at once if the new one fails (shared cutover: both serve).")
@click.option("--health-interval", type=_duration("health_interval"), default="1s", show_default=True,
              help="Time between health checks in the watch window (and the slowest readiness poll; polls start at "
                   "10ms).")
@click.option("--health-threshold", type=_integer("health_threshold"), default=3, show_default=True,
              help="Consecutive failed health checks that roll an upgrade back, or replace a serving instance.")
@click.option("--liveness-interval", type=_duration("liveness_interval"), default="10s", show_default=True,
              help="Time between health checks (and --max-rss checks) of the serving generation: lighter than "
                   "--health-interval, so probes do not fill the server's access log.")
@click.option("--max-rss", type=Checked("max_rss", "SIZE"),
              help="Replace an instance whose process tree (the sum of its processes' RSS) stays above SIZE (512M, "
                   "2G) for --health-threshold checks: beside itself, like a sick one, without dropping a request.")
@click.option("--drain-signal", default="TERM", show_default=True, metavar="SIGNAL", help="Signal that asks a generation to finish and exit.")
@click.option("--drain-timeout", type=_duration("drain_timeout"), default="30s", show_default=True,
              help="How long a draining generation may take before its whole process tree is killed.")
@click.option("--drain-delay", type=_duration("drain_delay"), default="1s", show_default=True,
              help="A generation no longer given new connections is signalled only once its accept queue has been "
                   "empty for this long: then nothing it accepted is left unread (steered cutover).")
@click.option("--ramp", type=_duration("ramp"), default="0s", show_default=True,
              help="Slow start: a new generation's share of new connections grows from 0 to all of them over this "
                   "long once it is ready (steered cutover), while the old one takes the rest.")
@click.option("--cutover", type=click.Choice(schema.choices("cutover")), default="steered", show_default=True,
              help="steered: each generation gets its own socket on every TCP address and a reuseport BPF program "
                   "decides which one gets new connections: a new generation gets none until it is proven ready, "
                   "the old one is drained without a signal and can be undrained if the new one fails. shared: "
                   "every generation accepts from one socket (unix sockets and systemd-passed ones always do).")
@click.option("--start-priority", type=click.Choice(schema.choices("start_priority")), default="low", show_default=True,
              help="low: a new generation starts at the lowest CPU priority until it is given connections (steered "
                   "cutover), so its start-up takes only CPU the serving one leaves idle; back to normal when it is "
                   "active, or after 5s (half of --ready-timeout if shorter) at most. normal: no change.")
@click.option("--max-restarts", type=_integer("max_restarts"), default=5, show_default=True,
              help="Restarts of a dying instance allowed within --restart-window (counted per instance); one more "
                   "failure exits non-zero when no instance is serving (else it retries every 30s).")
@click.option("--restart-window", type=_duration("restart_window"), default="60s", show_default=True, help="The window --max-restarts counts in.")
@click.option("-n", "--processes", type=_integer("processes"), default=1, show_default=True,
              help="Instances of COMMAND per generation, all on the same sockets, each with its own NOTIFY_SOCKET "
                   "and SUPERVISE_INSTANCE=0..N-1; a dead one is replaced alone. Change live: supervise ctl scale N.")
@click.option("--strategy", type=click.Choice(schema.choices("strategy")), default="surge", show_default=True,
              help="How an upgrade replaces the instances: surge starts all N new ones at once (fastest, up to 2N "
                   "processes for a moment); rolling replaces them --batch at a time. Neither drains an old instance "
                   "before a new one is ready, so never fewer than N are ready.")
@click.option("--batch", metavar="COUNT|PERCENT", help="With rolling: new instances per batch, like 1 or 25% of N (default 1).")
@click.option("--max-surge", metavar="COUNT|PERCENT",
              help="With rolling: processes allowed above N during the upgrade (default: the batch size); caps the batch.")
@click.option("--success-percent", type=_integer("success_percent"), default=100, show_default=True,
              help="Share of a batch that must become ready; below it the upgrade stops and every batch already "
                   "replaced is rolled back, old instances first ready, then new ones drained.")
@click.option("--upgrade-on-change", "upgrade_on_change", multiple=True, metavar="PATH",
              help="Upgrade when this file or symlink changes (a replaced binary, a flipped `current` link); repeatable.")
@click.option("--change-settle", type=_duration("change_settle"), default="1s", show_default=True,
              help="With --upgrade-on-change: how long the paths must stay unchanged before the upgrade starts.")
@click.option("--pre-upgrade", metavar="CMD", help="Shell command run before an upgrade; non-zero refuses the upgrade.")
@click.option("--post-upgrade", metavar="CMD", help="Shell command run after a new generation is promoted.")
@click.option("--on-rollback", metavar="CMD", help="Shell command run after an upgrade is rolled back (reason in $SUPERVISE_REASON).")
@click.option("--hook-timeout", type=_duration("hook_timeout"), default="60s", show_default=True, help="Time limit of each hook command.")
@click.option("--chdir", metavar="DIR", help="Working directory of the children, resolved again on every upgrade "
              "(default: the current directory as the shell names it, symlinks kept).")
@click.option("--user", metavar="USER", help="Run the children as this user (name or uid); the supervisor stays root "
              "to bind privileged ports. Sets USER, LOGNAME, HOME.")
@click.option("--group", metavar="GROUP", help="Run the children with this group (default: the user's primary group).")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE",
              help="Extra environment variable for the children (repeatable); wins over --env-file.")
@click.option("--env-file", "env_file", multiple=True, metavar="PATH",
              help="File of KEY=VALUE lines for the children, in systemd EnvironmentFile= syntax (repeatable; a "
                   "later file wins; -PATH: may be missing). Read again on every upgrade: a change reaches the next "
                   "generation only, a bad file (named with its line) refuses the upgrade.")
@click.option("--version-file", metavar="PATH", help="A file the deploy writes (a version, a git revision): its first line "
              "is the release's identity and name, re-read on every upgrade; relative to the working directory. Without "
              "it, a release is told by the content of what runs and a metadata digest of its directory.")
@click.option("--backlog", type=_integer("backlog"), default=4096, show_default=True, help="Listen backlog of TCP and unix listeners.")
@click.option("--no-nodelay", is_flag=True, help="Do not set TCP_NODELAY on TCP listeners (accepted connections inherit it).")
@click.option("--unix-mode", metavar="OCTAL", help="File mode of unix socket files we create (default: from the umask).")
@click.option("--name", metavar="NAME", help="Name of this service in logs, of its control socket and state file: 1-64 of A-Z a-z 0-9 . _ - "
              "(default: the app and the first listener's port, like app-8080).")
@click.option("--control", type=click.Path(path_type=Path), metavar="PATH",
              help="Control socket path (default: $XDG_RUNTIME_DIR/supervise/NAME.sock, /run/supervise as root).")
@click.option("--metrics-listen", metavar="ADDRESS",
              help="Also answer GET /metrics (Prometheus text) and GET /status (JSON) over HTTP on this TCP address "
                   "(HOST:PORT, :PORT, [::1]:PORT), for a scraper that cannot reach the control socket. Read-only: no "
                   "control verb is reachable there. No authentication: bind it to loopback or a private network.")
@click.option("--state-dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Where rollout history and last-known-good/bad releases persist (default: beside the control socket).")
@click.option("--pidfile", type=click.Path(path_type=Path), metavar="PATH", help="Write the supervisor's pid here.")
@click.option("--log-format", type=click.Choice(schema.choices("log_format")), default="text", show_default=True, help="Log lines on stderr: text for people, json for machines.")
@click.option("--log-level", type=click.Choice(schema.choices("log_level")), default="info", show_default=True)
@click.option("--child-output", type=click.Choice(schema.choices("child_output")), default="prefix", show_default=True,
              help="prefix: each instance's stdout and stderr come through pipes and go out line by line on "
                   "supervise's log, tagged [gen G #I pid P] (JSON objects with --log-format json); the last lines are "
                   "kept for `supervise ctl logs` and quoted when an instance fails. inherit: the children write to "
                   "supervise's own stdout and stderr directly.")
@click.option("--loop", type=click.Choice(schema.choices("loop")), default="auto", show_default=True,
              help="Event loop: uvloop when installed (auto), or plain asyncio.")
@click.version_option(__version__, "-V", "--version", prog_name="supervise")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND [ARG...]")
def run_command(**options: Any) -> None:
    """Run COMMAND as a supervised server that upgrades without dropping a connection.

    supervise binds the --listen sockets itself and keeps them open for its whole life; every generation of
    COMMAND inherits them (systemd socket-activation convention). On SIGHUP a new generation starts, must be
    provably ready, and only then replaces the old one — or is rolled back while the old one keeps serving.
    """
    context = click.get_current_context()
    explicit = frozenset(name for name in options
                         if context.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT))
    sys.exit(_run(from_command_line(options, explicit, options.pop("config"))))


def _run(settings: Settings) -> int:
    from .runner import (
        run,  # the runtime (anyio, psutil) is imported only once the arguments are known good
    )

    return run(settings)


def _fail(message: str, code: int) -> None:
    click.echo(f"supervise: error: {message}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `supervise` console script: `supervise ctl VERB`, `supervise check …` or the run form."""
    args = sys.argv[1:] if argv is None else argv
    complete_subcommand(run_command)
    try:
        if args[:1] == ["ctl"]:
            from .control.client import ctl

            ctl.main(args=args[1:], prog_name="supervise ctl", standalone_mode=False)
        elif args[:1] == ["check"]:
            from .check import check_command

            refuse_split_units(args[1:])
            check_command(run_command).main(args=args[1:], prog_name="supervise check", standalone_mode=False)
        else:
            refuse_split_units(args)
            run_command.main(args=args, prog_name="supervise", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        _fail(exc.format_message(), 2)
    except UserError as exc:
        _fail(str(exc), exc.exit_code)


if __name__ == "__main__":
    main()
