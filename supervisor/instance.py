"""An instance: one process of a generation (SUPERVISE_INSTANCE=i of N), its process tree, and what it said.

Its process tree is remembered (psutil objects carry their create time, so a reused pid is never signalled)
so that draining and killing reach grandchildren too — even one that left the process group with setsid().
Where /proc is not our PID namespace's (see proctree) no tree is known: only the leader, which we spawned, is
signalled and waited for (its exit comes from the reaper), with its process group.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import anyio
import psutil

from .capture import Capture
from .cgroups import GenerationCgroup
from .credentials import Credentials
from .event_kinds import Kind
from .events import Events
from .listeners import Listener
from .notify import NotifySocket
from .output_log import OutputLog
from .priority import Lowering
from .proctree import descendants, proc_is_ours
from .reaper import ChildExit, ExitStatus, Reaper
from .release import Release, generation_env, substitute
from .spawn import OutOfFds, ProcessSpec, SpawnError, child_environment, out_of_fds, spawn
from .states import MOVES, InstanceState

_DRAIN_POLL = 0.02
_TREE_REFRESH = 0.25


class IllegalMove(AssertionError):
    """An instance was asked to move between states in a way that cannot happen: a bug of ours."""


@dataclass(frozen=True)
class Launcher:
    """What starting any instance needs besides its release and sockets."""

    runtime_dir: str
    reaper: Reaper
    events: Events
    credentials: Credentials | None = None
    fd_limit: tuple[int, int] | None = None  # RLIMIT_NOFILE for children: the supervisor's own as it started
    cgroup: GenerationCgroup | None = None  # the generation's cgroup, which each of its children enters itself
    marker: Mapping[str, str] = field(default_factory=dict)  # tells a later supervisor whose leftover a process is
    output: OutputLog | None = None  # where the children's output goes (--child-output prefix), if they get pipes


@dataclass(eq=False)
class Instance:
    """One process of generation `number` started from `release`, with its tree and what it told us over
    its private NOTIFY_SOCKET. `seq` tells apart the successive processes that held the same `index`."""

    number: int
    index: int
    seq: int
    release: Release
    leader: int
    exit: ChildExit
    events: Events
    notify: NotifySocket | None = None
    output: Capture | None = None  # its stdout and stderr, when they come through pipes
    crashed: bool = False  # it exited on its own (not drained or stopped): its last lines are kept once it is gone
    state: InstanceState = InstanceState.STARTING  # written by enter() only
    started_at: float = field(default_factory=anyio.current_time)
    ready_at: float | None = None
    status_text: str = ""
    notified_ready: bool = False
    notified_stopping: bool = False
    last_watchdog: float | None = None
    notified_ready_at: float | None = None
    sick: str | None = None  # why health checks want it replaced (it is, beside its siblings)
    members: dict[int, psutil.Process] = field(default_factory=dict)
    ready_signal: anyio.Event = field(default_factory=anyio.Event)

    @classmethod
    def start(cls, launcher: Launcher, number: int, index: int, seq: int, release: Release,
              listeners: Sequence[Listener], lowering: Lowering | None = None) -> Instance:
        """Spawn instance `index` of generation `number`. Raises SpawnError (nothing left running) if it cannot."""
        names = [listener.name for listener in listeners]
        notify_path = os.path.join(launcher.runtime_dir, notify_name(number, seq))
        credentials = launcher.credentials
        instance: Instance | None = None

        def on_notify(pid: int, fields: dict[str, str]) -> None:
            if instance is not None:
                instance.notified(pid, fields)

        try:
            notify = NotifySocket(notify_path, on_notify, (credentials.uid, credentials.gid) if credentials else None)
        except OSError as exc:
            error = OutOfFds if out_of_fds(exc) else SpawnError
            raise error(f"cannot create the notify socket {notify_path} for generation {number}: "
                             f"{exc.strerror or exc}" + (" (giving it to another user needs CAP_CHOWN)"
                                                         if credentials and isinstance(exc, PermissionError) else "")) from None
        capture: Capture | None = None
        try:
            capture = _capture(launcher.output, number, index)
            extra = {**(credentials.environment() if credentials else {}), **generation_env(release, number, notify_path),
                     **launcher.marker, "SUPERVISE_INSTANCE": str(index)}
            env = child_environment(os.environ, extra, len(listeners), names)
            spec = ProcessSpec(
                release.executable,
                substitute(release.argv, names),
                env,
                cwd=release.cwd,
                pass_fds=tuple(listener.sock.fileno() for listener in listeners),
                set_listen_pid=bool(listeners),
                credentials=credentials,
                fd_limit=launcher.fd_limit,
                cgroup_procs=launcher.cgroup.procs_fd if launcher.cgroup else None,
                lowering=lowering,
                streams=capture.writers if capture else None,
            )
            pid = spawn(spec)
        except BaseException:
            notify.close()
            if capture is not None:
                capture.close(failed=False)
            raise
        instance = cls(number, index, seq, release, pid, launcher.reaper.watch(pid), launcher.events, notify, capture)
        instance.remember(pid)
        notify.start()
        if capture is not None:
            capture.started(pid)
        return instance

    # -- what we know about its processes ---------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the main process is still running (not yet reaped)."""
        return self.exit.status is None

    @property
    def exit_status(self) -> ExitStatus | None:
        return self.exit.status

    def remember(self, pid: int) -> None:
        """Add a process (by pid) to this instance's tree, if it still exists (and /proc can name it)."""
        if pid not in self.members and proc_is_ours():
            try:
                self.members[pid] = psutil.Process(pid)
            except psutil.Error:
                pass

    def refresh(self) -> None:
        """Add every current descendant of every living member (new workers, grandchildren)."""
        for process in list(self.members.values()):
            try:
                if not process.is_running():
                    continue
            except psutil.Error:
                continue
            for child in descendants(process):
                self.members.setdefault(child.pid, child)

    def living(self) -> list[psutil.Process]:
        """Members still running (zombies count as gone: they hold no socket and run no code)."""
        found = []
        for process in self.members.values():
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def running(self) -> bool:
        """Whether any process of it still runs: a member, or the leader where no tree is known."""
        return bool(self.living()) or (self.alive and not proc_is_ours())

    def pids(self, fresh: bool = False) -> list[int]:
        """Pids of the living members; `fresh` rescans the tree first."""
        if fresh:
            self.refresh()
        return [process.pid for process in self.living()]

    @property
    def ready(self) -> bool:
        """Proved ready and neither draining nor dead: it counts towards the N ready instances."""
        return self.ready_at is not None and self.state in (InstanceState.READY, InstanceState.SERVING) and self.alive

    def enter(self, state: InstanceState) -> None:
        """Move to `state`, the one way its state changes; a move that cannot happen (back from draining, say) is
        a bug, raised as IllegalMove. Entering the state it is in changes nothing."""
        if state != self.state and state not in MOVES[self.state]:
            raise IllegalMove(f"instance {self.number}#{self.index} cannot go from {self.state} to {state}")
        self.state = state

    def mark_ready(self, detail: str, by_notify: bool) -> float:
        """Record readiness — when READY=1 arrived if that is what proved it, else now; returns the seconds it took."""
        self.ready_at = self.notified_ready_at if by_notify and self.notified_ready_at else anyio.current_time()
        if self.state == InstanceState.STARTING:
            self.enter(InstanceState.READY)
        return self.ready_at - self.started_at

    # -- what it tells us -------------------------------------------------------------------------------------

    def notified(self, pid: int, fields: dict[str, str]) -> None:
        """Handle one sd_notify message; only processes of this instance are listened to."""
        if pid not in self.members:
            self.refresh()
        if pid not in self.members:
            self.events.emit(Kind.NOTIFY_IGNORED, f"ignored notify message from pid {pid}: not a process of this instance",
                             level="warning", gen=self.number, pids=(pid,), instance=self.index)
            return
        if "STATUS" in fields:
            self.status_text = fields["STATUS"]
        if fields.get("STOPPING") == "1":
            self.notified_stopping = True
        if fields.get("WATCHDOG") == "1":
            self.last_watchdog = anyio.current_time()
        if fields.get("READY") == "1" and not self.notified_ready:
            self.notified_ready = True
            self.notified_ready_at = anyio.current_time()
            self.ready_signal.set()
        self.events.emit(Kind.NOTIFY, "notify: " + " ".join(f"{k}={v}" for k, v in fields.items()), level="debug",
                         gen=self.number, pids=(pid,), instance=self.index)

    # -- ending it --------------------------------------------------------------------------------------------

    def signal_group(self, signum: int) -> bool:
        """Send `signum` to the instance's process group (the leader started a session of its own)."""
        try:
            os.killpg(self.leader, signum)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def kill(self) -> list[int]:
        """SIGKILL every process of the tree now; returns the pids that were still alive."""
        self.refresh()
        victims = self.living()
        killed = {process.pid for process in victims}
        if not proc_is_ours() and self.alive:
            killed.add(self.leader)
            os.kill(self.leader, signal.SIGKILL)  # our own child, not reaped yet: the pid cannot have been reused
        for _ in range(3):
            self.signal_group(signal.SIGKILL)
            for process in victims:
                try:
                    process.kill()  # psutil checks the create time: a reused pid is never hit
                except psutil.Error:
                    pass
            self.refresh()  # anything forked meanwhile
            victims = self.living()
            if not victims:
                break
            killed.update(process.pid for process in victims)
        return sorted(killed)

    async def drain(self, signum: int, timeout: float) -> list[int]:
        """Ask the instance to stop, wait up to `timeout` for its whole tree to exit, then kill what remains.

        Returns the pids that had to be killed.
        """
        self.refresh()
        self.enter(InstanceState.DRAINING)
        self.signal_group(signum)
        for process in self.living():  # like systemd: every process of the unit, also those that left the group
            try:
                if os.getpgid(process.pid) != self.leader:
                    process.send_signal(signum)
            except (OSError, psutil.Error):
                continue
        await self.wait_gone(timeout)
        if not self.running():
            return []
        killed = self.kill()
        await self.wait_gone(5.0)
        return killed

    async def wait_gone(self, timeout: float) -> bool:
        """Wait until no member is alive (rescanning for new forks now and then); False on timeout."""
        last_refresh = anyio.current_time()
        with anyio.move_on_after(timeout):
            while self.running():
                await anyio.sleep(_DRAIN_POLL)
                if anyio.current_time() - last_refresh > _TREE_REFRESH:
                    self.refresh()
                    last_refresh = anyio.current_time()
            return True
        return False

    def tail(self) -> tuple[str, ...]:
        """The last non-empty lines it wrote (everything in its pipes read first); empty when not captured."""
        return self.output.tail() if self.output is not None else ()

    def drain_output(self) -> None:
        """Read what it wrote so far (once it exited: all of it), so its lines come before its exit is reported."""
        if self.output is not None:
            self.output.drain()

    def close(self, failed: bool = False) -> None:
        """Release what the supervisor holds for this instance (its notify socket, its pipes: its last lines are
        kept a while longer if it `failed`)."""
        self.enter(InstanceState.EXITED)
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        if self.output is not None:
            self.output.close(failed)
            self.output = None


def _capture(output: OutputLog | None, number: int, index: int) -> Capture | None:
    """Pipes for an instance's stdout and stderr, when the children's output is captured."""
    if output is None or not output.capture:
        return None
    try:
        return Capture.open(output, number, index)
    except OSError as exc:
        error = OutOfFds if out_of_fds(exc) else SpawnError
        raise error(f"cannot create the output pipes for generation {number}: {exc.strerror or exc}") from None


def notify_name(number: int, seq: int) -> str:
    """The file name of an instance's notify socket in the runtime directory."""
    return f"gen{number}.{seq}.notify"
