"""The supervisor: owns the listeners and the generations, and turns signals into operations.

Operations (the first start, upgrades, replacing a dead generation) run one at a time in a single task, so the
state machine is never entered twice. Signals only set flags and wake that task; exits arrive from the reaper.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field

import anyio
import psutil
from anyio.abc import TaskGroup

from .commands import CommandRunner
from .concurrency import first_completed
from .config import Settings
from .events import Events
from .generation import DRAINING, EXITED, SERVING, Generation
from .libc import release_free_memory
from .listeners import Listener
from .probes import DEFAULT_PROBE, NO_LISTENER_PROBE, Probe, build_probe
from .reaper import Reaper
from .release import Release, resolve
from .rollout import Failed, Outcome, Rollout, wait_ready
from .spawn import SpawnError

_MAX_BACKOFF = 30.0
_FIRST_BACKOFF = 0.1
_TRACK_INTERVAL = 1.0
_FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)


class Fatal(Exception):
    """The supervisor cannot go on (the first generation cannot be executed, too many restarts)."""


@dataclass(eq=False)
class Supervisor:
    """Everything one running supervisor owns."""

    settings: Settings
    listeners: list[Listener]
    events: Events
    release: Release
    runtime_dir: str
    reaper: Reaper = field(default_factory=Reaper)
    generations: list[Generation] = field(default_factory=list)
    serving: Generation | None = None
    rollout: Rollout | None = None
    history: deque[Outcome] = field(default_factory=lambda: deque(maxlen=20))
    next_number: int = 1
    stopping: bool = False
    forced: bool = False
    exit_code: int = 0
    upgrade_pending: bool = False
    upgrade_trigger: str = ""
    failures: deque[float] = field(default_factory=deque)
    started_at: float = field(default_factory=time.monotonic)
    probe: Probe = field(init=False)
    commands: CommandRunner = field(init=False)
    _wakeup: anyio.Event = field(init=False)
    _operations: anyio.CancelScope = field(init=False)
    _drain: anyio.CancelScope | None = field(init=False, default=None)
    _group: TaskGroup = field(init=False)
    _lenient_logged: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.commands = CommandRunner(self.reaper, os.environ, self.release.cwd)
        tcp = [listener for listener in self.listeners if listener.kind == "tcp"]
        self.probe = build_probe(
            self.settings.ready or (DEFAULT_PROBE if tcp else NO_LISTENER_PROBE),
            tcp[0].probe_address() if tcp else None,
            {port for listener in tcp if (port := listener.tcp_port) is not None},
            self.settings.probe_timeout,
            self.commands,
            self._lenient_probe_used,
        )

    # -- running ----------------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until told to stop (exit 0) or until supervision is impossible (exit non-zero)."""
        self._wakeup = anyio.Event()
        self._operations = anyio.CancelScope()
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                group.start_soon(self.reaper.run)
                group.start_soon(self._receive_signals)
                group.start_soon(self._track_trees)
                with self._operations:
                    await self._operate()
                await self._shutdown()
                group.cancel_scope.cancel()
        finally:
            for generation in self.generations:
                generation.close()
            self.reaper.close()
        return self.exit_code

    async def _operate(self) -> None:
        """Bring the first generation up, then serve operations one at a time until cancelled or fatal."""
        try:
            await self._bring_up(self.release, first=True)
            release_free_memory()
            while True:
                await self._next_operation()
                if self.serving is None or not self.serving.alive:
                    await self._replace_serving()
                elif self.upgrade_pending:
                    await self._upgrade()
        except Fatal as exc:
            self.events.emit("fatal", str(exc), level="error")
            self.exit_code = 1
            self.stopping = True

    async def _next_operation(self) -> None:
        """Wait until an upgrade is requested or the serving generation dies."""
        if self.upgrade_pending or self.serving is None or not self.serving.alive:
            return
        await first_completed(self._wakeup.wait, self.serving.exit.wait)

    # -- operations -------------------------------------------------------------------------------------------

    def request_upgrade(self, trigger: str) -> bool:
        """Ask for an upgrade. Requests during an upgrade coalesce into one more; none are taken once stopping."""
        if self.stopping:
            self.events.emit("upgrade-ignored", f"upgrade request ({trigger}) ignored: stopping", level="warning")
            return False
        if self.upgrade_pending:
            self.events.emit("upgrade-coalesced", f"upgrade request ({trigger}) coalesced with the pending one", level="debug")
            return True
        self.upgrade_pending, self.upgrade_trigger = True, trigger
        self.events.emit("upgrade-requested", f"upgrade requested ({trigger})", trigger=trigger)
        self._wakeup.set()
        return True

    async def _upgrade(self) -> Outcome:
        self.upgrade_pending, self._wakeup = False, anyio.Event()
        self.rollout = Rollout(self, self.serving, self.upgrade_trigger)
        try:
            outcome = await self.rollout.run()
        finally:
            self.rollout = None
        self.history.append(outcome)
        return outcome

    async def _bring_up(self, release: Release, first: bool = False) -> Generation:
        """Start `release` and wait until it is ready, retrying with backoff; it becomes the serving generation."""
        while True:
            try:
                generation = self.launch(release)
            except SpawnError as exc:
                if first:
                    raise Fatal(str(exc)) from None
                await self._failed(str(exc))
                continue
            try:
                result = await wait_ready(self.probe, generation, self.settings.ready_timeout, self.settings.health_interval)
            except Failed as failure:
                await self.retire(generation, graceful=True)
                await self._failed(f"generation {generation.number} {failure}")
                continue
            elapsed = (generation.ready_at or time.monotonic()) - generation.started_at
            self.events.emit("ready", f"generation {generation.number} ready after {elapsed:.3f}s ({result.detail})",
                             gen=generation.number, pids=generation.pids(fresh=True), elapsed=round(elapsed, 6), probe=result.detail)
            self.promote(generation)
            self.events.emit("serving", f"generation {generation.number} serving", gen=generation.number, pids=generation.pids())
            return generation

    async def _replace_serving(self) -> None:
        """The serving generation died: start its exact release again, then clear away what is left of it."""
        dead = self.serving
        assert dead is not None
        self.serving = None
        status = dead.exit_status.describe() if dead.exit_status else "gone"
        await self._failed(f"generation {dead.number} {status}")
        await self._bring_up(dead.release)
        await self.retire(dead, graceful=True)

    async def _failed(self, reason: str) -> None:
        """Count a failure; give up past --max-restarts in the window, else wait the backoff delay."""
        now = time.monotonic()
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.settings.restart_window:
            self.failures.popleft()
        count = len(self.failures)
        if count > self.settings.max_restarts:
            raise Fatal(f"giving up: {count} failures within {self.settings.restart_window:g}s (last: {reason})")
        delay = min(_MAX_BACKOFF, _FIRST_BACKOFF * 2 ** (count - 1))
        self.events.emit("restarting", f"{reason}; restarting in {delay:g}s (failure {count} of at most "
                         f"{self.settings.max_restarts} within {self.settings.restart_window:g}s)", level="warning",
                         delay=delay, reason=reason)
        await anyio.sleep(delay)

    # -- the rollout's host interface -------------------------------------------------------------------------

    def resolve_release(self) -> Release:
        """Resolve the command on disk again (a replaced binary or flipped symlink is picked up)."""
        current = self.release
        self.release = resolve(current.argv, current.logical_cwd, current.env, os.environ.get("PATH"))
        return self.release

    def launch(self, release: Release) -> Generation:
        """Spawn the next generation of `release` and start watching its exit."""
        number, self.next_number = self.next_number, self.next_number + 1
        try:
            generation = Generation.start(number, release, self.listeners, self.runtime_dir, self.reaper, self.events)
        except SpawnError as exc:
            self.events.emit("spawn-failed", f"generation {number}: {exc}", level="error", gen=number)
            raise
        self.generations.append(generation)
        self.events.emit("spawned", f"generation {number} started: {release.describe()}", gen=number,
                         pids=(generation.leader,), argv=list(release.argv), executable=release.executable, cwd=release.cwd)
        self._group.start_soon(self._report_exit, generation)
        return generation

    def promote(self, generation: Generation) -> None:
        """Make `generation` the one that serves (signals are forwarded to it, it is replaced if it dies)."""
        self.serving = generation
        generation.state = SERVING

    async def retire(self, generation: Generation, graceful: bool) -> list[int]:
        """Stop a generation: drain it (signal, wait, kill the rest) or kill it at once; then forget it."""
        signame = self.settings.drain_signal.name
        began = time.monotonic()
        self._adopt_orphans()  # a process whose parent died since the last scan is still this generation's
        if graceful and generation.living():
            self.events.emit("draining", f"draining generation {generation.number} ({signame}, up to "
                             f"{self.settings.drain_timeout:g}s)", gen=generation.number, pids=generation.pids(fresh=True))
            killed = await generation.drain(self.settings.drain_signal, self.settings.drain_timeout)
        else:
            generation.state = DRAINING
            killed = generation.kill()
            await generation.wait_gone(5.0)
        elapsed = time.monotonic() - began
        if killed and graceful:
            self.events.emit("drain-timeout", f"generation {generation.number} still running after "
                             f"{self.settings.drain_timeout:g}s: killed pids {', '.join(map(str, killed))}",
                             level="warning", gen=generation.number, pids=killed)
        generation.close()
        if generation in self.generations:
            self.generations.remove(generation)
        if self.serving is generation:
            self.serving = None
        self.events.emit("retired", f"generation {generation.number} gone after {elapsed:.3f}s", gen=generation.number,
                         elapsed=round(elapsed, 6), killed=killed)
        return killed

    # -- stopping ---------------------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Graceful stop: abort any upgrade, drain every generation, exit 0."""
        if self.stopping:
            return
        self.stopping = True
        self.events.emit("stopping", f"stopping ({reason}): draining every generation", reason=reason)
        self._operations.cancel()

    def force(self, reason: str) -> None:
        """Immediate stop: kill every generation's whole tree now."""
        self.forced = self.stopping = True
        self.events.emit("stopping", f"stopping now ({reason}): killing every generation", reason=reason, forced=True)
        self._operations.cancel()
        if self._drain is not None:
            self._drain.cancel()

    async def _shutdown(self) -> None:
        self.stopping = True
        with anyio.CancelScope(shield=True):
            if not self.forced:
                with anyio.CancelScope() as self._drain:
                    async with anyio.create_task_group() as group:
                        for generation in list(self.generations):
                            group.start_soon(self.retire, generation, True)
            for generation in list(self.generations):
                await self.retire(generation, graceful=False)
            self._kill_descendants()
        self.events.emit("stopped", "stopped" + (" (forced)" if self.forced else ""), exit_code=self.exit_code)

    def _kill_descendants(self) -> None:
        """Last sweep at exit: every generation is gone, so any process still below us is a leftover."""
        try:
            leftovers = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        for process in leftovers:
            try:
                process.kill()
            except psutil.Error:
                continue
            self.events.emit("leftover-killed", f"killed pid {process.pid}: still running after every generation was stopped",
                             level="warning", pids=(process.pid,))
        self.reaper.reap()

    # -- background duties ------------------------------------------------------------------------------------

    async def _receive_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, *_FORWARDED) as received:
            async for signum in received:
                self._on_signal(signal.Signals(signum))

    def _on_signal(self, signum: signal.Signals) -> None:
        if signum == signal.SIGHUP:
            self.request_upgrade("SIGHUP")
        elif signum == signal.SIGQUIT or (signum == signal.SIGINT and self.stopping):
            self.force(signum.name if signum == signal.SIGQUIT else "second SIGINT")
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.stop(signum.name)
        else:
            self.forward(signum)

    def forward(self, signum: signal.Signals) -> bool:
        """Pass a signal on to the serving generation's process group."""
        target = self.serving
        if target is None or not target.alive:
            self.events.emit("signal-dropped", f"{signum.name} not forwarded: no generation is serving", level="warning")
            return False
        target.signal_group(signum)
        self.events.emit("signal-forwarded", f"forwarded {signum.name} to generation {target.number}", gen=target.number,
                         pids=(target.leader,), signal=signum.name)
        return True

    async def _report_exit(self, generation: Generation) -> None:
        status = await generation.exit.wait()
        expected = self.stopping or generation.state in (DRAINING, EXITED)
        self.events.emit("exited", f"generation {generation.number} {status.describe()}" + ("" if expected else " unexpectedly"),
                         level="info" if expected else "warning", gen=generation.number, pids=(generation.leader,),
                         code=status.code, signal=status.signal, expected=expected)

    async def _track_trees(self) -> None:
        """Keep each generation's process tree current, so draining can reach processes that re-parented."""
        while True:
            await anyio.sleep(_TRACK_INTERVAL)
            for generation in self.generations:
                generation.refresh()
            self._adopt_orphans()

    def _adopt_orphans(self) -> None:
        """Processes re-parented to us (we are their subreaper) go back to the generation their environment names.

        One whose generation is already finished must not outlive it: it is killed here.
        """
        known = set(self.reaper.children)
        for generation in self.generations:
            known.update(generation.members)
        try:
            children = psutil.Process().children()
        except psutil.Error:
            return
        for process in children:
            if process.pid in known:
                continue
            try:
                number = process.environ().get("SUPERVISE_GENERATION", "")
            except psutil.Error:
                continue
            owner = next((generation for generation in self.generations if str(generation.number) == number), None)
            if owner is not None:
                owner.remember(process.pid)
                owner.refresh()
            elif number.isdigit() and int(number) < self.next_number:
                self._kill_leftover(process, int(number))

    def _kill_leftover(self, process: psutil.Process, number: int) -> None:
        try:
            for member in [*process.children(recursive=True), process]:
                member.kill()
        except psutil.Error:
            return
        self.events.emit("leftover-killed", f"killed pid {process.pid}: left over from finished generation {number}",
                         level="warning", gen=number, pids=(process.pid,))

    def _lenient_probe_used(self, number: int) -> None:
        if not self._lenient_logged:
            self._lenient_logged = True
            self.events.emit("probe-lenient", f"generation {number} answers 404 on {self.probe.spec.path}: no readiness "
                             "endpoint, so an answer from it counts as ready (pass --ready to be strict)", gen=number)
