"""The fleet: everything supervise holds and runs — the listeners, the generations, which one serves and their
numbering. It is the rollout's Host: it prepares an upgrade's plan, creates, spawns, promotes and retires
generations, and keeps their process trees whole (orphans adopted, leftovers cleared). It decides nothing about
when: the supervisor's operations loop and the rollout sequence it (tableflip: fds.go owns what is held).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import holding, orphans
from .cgroups import Cgroups
from .commands import CommandRunner
from .concurrency import gather
from .config import Settings, invalid, reread
from .credentials import Credentials
from .errors import UserError
from .event_kinds import Kind
from .events import Events
from .exit_watch import ExitWatch
from .generation import Generation
from .identity import Identity
from .instance import Instance, Launcher, notify_name
from .leftovers import marker
from .listener_guard import ListenerGuard
from .listeners import Listener
from .output_log import OutputLog
from .probe_spec import DEFAULT_PROBE, NO_LISTENER_PROBE
from .probes import Probe, Result, build_probe
from .reaper import ExitStatus, Reaper
from .release import Release, check_templates, next_release
from .release_book import ReleaseBook
from .rollout import Plan
from .spawn import SpawnError
from .start_priority import StartPriorities
from .states import InstanceState, TrafficState
from .tally import Tally, TimedProbe
from .traffic import Traffic

_WEIGHT = 1000  # an instance's weight in the program: fine enough steps for a ramp
SWEEP_INTERVAL = 1.0  # how often the fleet is swept (zombies, orphans, held sockets)
_EXIT_GRACE = 1.0  # a retired generation's processes are gone: its last exits are only waiting to be reaped


@dataclass(eq=False)
class Fleet:
    """What one supervisor holds and runs. `wake` tells the operations loop that an instance exited."""

    settings: Settings
    listeners: list[Listener]
    events: Events
    release: Release
    book: ReleaseBook
    reaper: Reaper
    tally: Tally
    wake: Callable[[], None]
    refill: Callable[[Generation, Sequence[int]], Awaitable[None]]  # start indexes, retried as restarts are
    traffic: Traffic  # which generation's socket gets new connections
    credentials: Credentials | None = None
    child_fd_limit: tuple[int, int] | None = None  # RLIMIT_NOFILE we were started with (we raised ours), for children
    cgroups: Cgroups | None = None  # a cgroup per generation, where cgroup v2 can be used
    runtime_dir: str = ""
    output: OutputLog | None = None  # the children's output and their last lines (--child-output prefix)
    generations: list[Generation] = field(default_factory=list)
    serving: Generation | None = None
    next_number: int = 1
    scaled: int | None = None  # `ctl scale N`: wins over --processes (and the config file) until the supervisor exits
    stopping: bool = False  # every exit from here on is expected
    probe: Probe = field(init=False)
    commands: CommandRunner = field(init=False)
    guard: ListenerGuard = field(init=False)
    priorities: StartPriorities = field(init=False)  # which starting generations run at low CPU priority
    _watches: dict[Generation, ExitWatch] = field(default_factory=dict)  # each generation's, until it retires
    _created: MemoryObjectSendStream[ExitWatch] = field(init=False)
    _to_run: MemoryObjectReceiveStream[ExitWatch] = field(init=False)
    _lenient_logged: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.commands = CommandRunner(self.reaper, os.environ, self.release.cwd, self.child_fd_limit)
        self.probe = self.build_probe(self.settings, self.listeners)
        self.guard = ListenerGuard(self.events, self.all_listeners, lambda: [gen.number for gen in self.generations],
                                   self.traffic.rejoined)
        self._created, self._to_run = anyio.create_memory_object_stream[ExitWatch](float("inf"))
        self.priorities = StartPriorities(self.events)

    @property
    def processes(self) -> int:
        """How many instances the serving generation should have."""
        return self.scaled or self.settings.processes

    def scale(self, processes: int) -> int:
        """`ctl scale`: the serving generation should have `processes` instances from now on; how many it had."""
        previous, self.scaled = self.processes, processes
        return previous

    def wind_down(self) -> None:
        """The supervisor is stopping: every exit from here on is expected."""
        self.stopping = True
        self.traffic.stopping = True

    def build_probe(self, settings: Settings, listeners: Sequence[Listener]) -> Probe:
        tcp = [listener for listener in listeners if listener.kind == "tcp"]
        return TimedProbe(build_probe(
            settings.ready or (DEFAULT_PROBE if tcp else NO_LISTENER_PROBE),
            tcp[0].probe_address() if tcp else None,
            {port for listener in tcp if (port := listener.tcp_port) is not None},
            settings.probe_timeout,
            self.commands,
            self._lenient_probe_used,
            self.traffic,
        ), self.tally)

    def label(self, instance: Instance) -> str:
        """`generation 3`, or `generation 3 instance 1` when there are several."""
        several = self.processes > 1 or instance.index > 0
        return f"generation {instance.number}" + (f" instance {instance.index}" if several else "")

    async def run(self) -> None:
        """For the supervisor's life: run each generation's exit watch (the fleet owns them on the generations'
        behalf; retire() ends one), watch the held sockets' hangups, relay what retired sockets held, and end
        each start-up's low CPU priority at its bound."""
        with self._created, self._to_run:
            try:
                async with anyio.create_task_group() as group:
                    group.start_soon(self.guard.watch_hangups, SWEEP_INTERVAL)
                    group.start_soon(self.traffic.rescue.run)
                    group.start_soon(self.priorities.run)
                    async for watch in self._to_run:
                        group.start_soon(watch.run)
            finally:
                self.traffic.rescue.close()
                for watch in self._watches.values():
                    watch.close()

    def _report_exit(self, generation: Generation, instance: Instance, status: ExitStatus) -> None:
        expected = not generation.exited(instance, status) or self.stopping
        self.events.emit(Kind.EXITED, f"{self.label(instance)} {status.describe()}" + ("" if expected else " unexpectedly"),
                         level="info" if expected else "warning", gen=generation.number, pids=(instance.leader,),
                         instance=instance.index, code=status.code, signal=status.signal, expected=expected)
        self.wake()

    # -- the rollout's host interface -------------------------------------------------------------------------

    def prepare(self, release: Release | None, dry_run: bool = False) -> Plan:
        """What the next upgrade deploys: the config file read again (if any), listeners it adds bound, the
        command resolved on disk again (a replaced binary or flipped symlink is picked up) — or `release` as given.
        A `dry_run` (ctl upgrade --dry-run) takes the same path but binds nothing: new listeners stay `unbound`."""
        if not dry_run:
            self.book.forget()
        try:
            settings = reread(self.settings)
            listeners, unbound = holding.for_settings(settings, self.all_listeners(), self.traffic, bind_new=not dry_run)
        except UserError as exc:
            raise UserError(invalid(exc)) from None
        try:
            check_templates(settings.command, [listener.name for listener in listeners] + [spec.name for spec in unbound])
            probe = self.build_probe(settings, listeners)
        except UserError as exc:
            self._close_unused(listeners)
            raise UserError(invalid(exc)) from None
        if release is None:
            try:
                release = next_release(settings, self.release)
            except SpawnError:
                self._close_unused(listeners)
                raise
        return Plan(settings, probe, release, listeners, self.scaled or settings.processes, unbound, self.traffic)

    def all_listeners(self) -> list[Listener]:
        found = list(self.listeners)
        for generation in self.generations:
            found.extend(listener for listener in generation.listeners if listener not in found)
        return found

    def discard(self, plan: Plan) -> None:
        """An upgrade that was not promoted: close listeners it bound that nothing uses."""
        self._close_unused(plan.listeners)

    def _close_unused(self, candidates: Sequence[Listener]) -> None:
        in_use = set(self.listeners).union(*(generation.listeners for generation in self.generations))
        holding.close_unused(candidates, in_use, self.traffic, self.events)

    async def identify(self, release: Release, fresh: bool = False) -> Identity:
        return await self.book.identify(release, fresh)

    def refusal(self, release: Release, identity: Identity, force: bool) -> str | None:
        return self.book.refusal(release, identity, force)

    def create(self, plan: Plan) -> Generation:
        """The next generation, as `plan` says; its instances are started one by one with spawn()."""
        number, self.next_number = self.next_number, self.next_number + 1
        generation = Generation(number, plan.release, plan.listeners, self.launcher(number),
                                identity=self.book.known(plan.release))
        self.generations.append(generation)
        active = any(self.traffic.states.get(other.number) == TrafficState.ACTIVE for other in self.generations)
        self.traffic.join(number, plan.listeners, plan.settings.backlog,
                          TrafficState.PASSIVE if active else TrafficState.ACTIVE)
        self.priorities.begin(generation, active and self.traffic.exclusive(plan.listeners),
                              plan.settings.start_priority == "low", plan.settings.ready_timeout)
        self.watch(generation)
        return generation

    def launcher(self, number: int) -> Launcher:
        """What starting any instance of generation `number` needs (its cgroup made, or found again)."""
        return Launcher(self.runtime_dir, self.reaper, self.events, self.credentials, self.child_fd_limit,
                        self.cgroups.create(number) if self.cgroups else None, marker(self.settings.name),
                        self.output)

    def watch(self, generation: Generation) -> None:
        """Watch the exits of `generation`'s instances until it retires (those it has, and each one spawned)."""
        self._watches[generation] = watch = ExitWatch(generation, self._report_exit)
        for instance in generation.instances:
            watch.add(instance)
        self._created.send_nowait(watch)

    def spawn(self, generation: Generation, index: int) -> Instance:
        """Start instance `index` of `generation` and watch its exit; raises SpawnError if it cannot start."""
        self.guard.check()  # a socket an earlier child shut down would fail this instance's readiness
        instance = generation.spawn(index, self.priorities.lowering(generation))
        self.priorities.spawned(generation, instance)
        release = generation.release
        command = release.describe([listener.name for listener in generation.listeners])
        self.events.emit(Kind.SPAWNED, f"{self.label(instance)} started: {command}", gen=generation.number,
                         pids=(instance.leader,), instance=index, argv=list(release.argv), executable=release.executable,
                         cwd=release.cwd, release=generation.identity.name if generation.identity else None)
        self._watches[generation].add(instance)
        return instance

    def announce_ready(self, generation: Generation, instance: Instance, result: Result, probe: Probe) -> None:
        """An instance proved ready: its generation records it (when READY=1 arrived, if that proved it); say so."""
        elapsed = generation.instance_ready(instance, result.detail, probe.spec.kind == "notify")
        self.events.emit(Kind.READY, f"{self.label(instance)} ready after {elapsed:.3f}s ({result.detail})",
                         gen=generation.number, pids=instance.pids(), instance=instance.index, elapsed=round(elapsed, 6),
                         probe=result.detail)

    async def restore(self, generation: Generation, count: int) -> None:
        """Start `count` more instances of an old generation (a rollback putting back what a batch replaced)."""
        await self.refill(generation, generation.free_indexes(count))

    def steer(self, states: Mapping[Generation, TrafficState], parts: Mapping[Generation, float] | None = None) -> None:
        """Which new connections each generation gets from now on, all changed at once (traffic.py); an active
        one in proportion to its ready instances, times its part (0..1) of that where one is given (a ramp)."""
        parts = parts or {}
        self.traffic.set({generation.number: (state, max(1, round(_WEIGHT * parts.get(generation, 1.0)
                                                                  * len(generation.ready()))))
                          for generation, state in states.items()})
        for generation, state in states.items():
            if state == TrafficState.ACTIVE:
                self.priorities.activated(generation)

    def was_active(self, generation: Generation) -> bool:
        """Whether `generation` was ever given new connections (a passive one only ever got probes)."""
        return self.traffic.ever_active(generation.number)

    def promote(self, generation: Generation, plan: Plan | None = None) -> None:
        """Make `generation` the one that serves (signals are forwarded to it, it is replaced if it dies); the
        settings it was deployed with become the supervisor's."""
        self.book.promoted(self.serving.release if self.serving else None, generation.identity, generation.release)
        if plan is not None:
            self.settings, self.probe, self.release = plan.settings, plan.probe, plan.release
            self.listeners = list(plan.listeners)
        self.serving = generation
        generation.serve()

    async def changed_in_place(self, generation: Generation) -> str | None:
        """Whether the files of a generation's release were rewritten since it was promoted — then starting it
        again would run something else — and how, for the log."""
        if generation.identity is None:
            return None
        now = await self.identify(generation.release, fresh=True)
        if now.same_code(generation.identity):
            return None
        return (f"the files of generation {generation.number} ({generation.release.describe()}) changed in place "
                f"since it started (identity {generation.identity.name} → {now.name})")

    async def retire(self, generation: Generation, graceful: bool) -> list[int]:
        """Stop every instance of a generation: drain (signal, wait, kill the rest) or kill at once; then forget it.

        A generation whose new connections go elsewhere (steered) is signalled only once its accept queue has
        been empty for --drain-delay; one that was never given any (it failed while passive) gets a short grace."""
        began = anyio.current_time()
        timeout = self.traffic.drain_timeout(generation.number, generation.listeners, self.settings.drain_timeout)
        if graceful and not self.stopping:
            await self.traffic.settle(generation.number, self.settings.drain_delay, timeout)
        self.adopt_orphans()  # a process whose parent died since the last scan is still this generation's
        if graceful and generation.running():
            self.events.emit(Kind.DRAINING, f"draining generation {generation.number} ({self.settings.drain_signal.name}, up "
                             f"to {timeout:g}s)", gen=generation.number, pids=generation.pids(fresh=True))
        killed: list[int] = []

        async def stop(instance: Instance) -> None:
            killed.extend(await self._stop(instance, graceful, timeout))

        await gather(*(partial(stop, instance) for instance in list(generation.instances)))
        elapsed = anyio.current_time() - began
        if killed and graceful:
            self.events.emit(Kind.DRAIN_TIMEOUT, f"generation {generation.number} still running after "
                             f"{timeout:g}s: killed pids {', '.join(map(str, sorted(killed)))}",
                             level="warning", gen=generation.number, pids=sorted(killed))
        await self._end_watch(generation)
        generation.close()
        if self.cgroups is not None:
            await self.cgroups.retire(generation.number)  # escaped grandchildren included
        if generation in self.generations:
            self.generations.remove(generation)
        self.priorities.forget(generation)
        if self.serving is generation:
            self.serving = None
        self._close_unused(generation.listeners)
        self.events.emit(Kind.RETIRED, f"generation {generation.number} gone after {elapsed:.3f}s", gen=generation.number,
                         elapsed=round(elapsed, 6), killed=sorted(killed))
        return killed

    async def _end_watch(self, generation: Generation) -> None:
        """A retired generation's exit watchers end: the exits of its processes, all gone, are reaped and
        reported first."""
        watch = self._watches.get(generation)
        if watch is not None:
            self.reaper.reap()
            await watch.end(_EXIT_GRACE)
            self._watches.pop(generation, None)

    async def retire_instances(self, generation: Generation, instances: list[Instance]) -> None:
        """Drain some instances of a generation (the others keep serving), each killed after --drain-timeout."""
        self.adopt_orphans()
        timeout = self.traffic.drain_timeout(generation.number, generation.listeners, self.settings.drain_timeout)

        async def retire_one(instance: Instance) -> None:
            began, running = anyio.current_time(), instance.running()
            if running:
                self.events.emit(Kind.DRAINING, f"draining {self.label(instance)} ({self.settings.drain_signal.name}, up to "
                                 f"{timeout:g}s)", gen=instance.number, instance=instance.index,
                                 pids=instance.pids(fresh=True))
            killed = await self._stop(instance, True, timeout)
            if killed:
                self.events.emit(Kind.DRAIN_TIMEOUT, f"{self.label(instance)} still running after "
                                 f"{timeout:g}s: killed pids {', '.join(map(str, killed))}",
                                 level="warning", gen=instance.number, instance=instance.index, pids=killed)
            generation.forget(instance)
            elapsed = anyio.current_time() - began
            self.events.emit(Kind.INSTANCE_RETIRED, f"generation {instance.number} instance {instance.index} (pid "
                             f"{instance.leader}) gone" + (f" after {elapsed:.3f}s" if running else ""),
                             gen=instance.number, instance=instance.index, pids=(instance.leader,),
                             elapsed=round(elapsed, 6))

        await gather(*(partial(retire_one, instance) for instance in instances))

    async def _stop(self, instance: Instance, graceful: bool, timeout: float) -> list[int]:
        """Drain one instance's tree (killed after `timeout`), or kill it now; the pids that had to be killed."""
        if graceful and instance.running():
            return await instance.drain(self.settings.drain_signal, timeout)
        instance.enter(InstanceState.DRAINING)
        killed = instance.kill()
        await instance.wait_gone(5.0)
        return killed

    # -- what the operations and workers ask of it ------------------------------------------------------------

    def forward(self, signum: signal.Signals) -> bool:
        """Pass a signal on to the serving generation's process group."""
        target = self.serving
        if target is None or not target.alive:
            self.events.emit(Kind.SIGNAL_DROPPED, f"{signum.name} not forwarded: no generation is serving", level="warning")
            return False
        target.signal_group(signum)
        leaders = [instance.leader for instance in target.instances if instance.alive]
        self.events.emit(Kind.SIGNAL_FORWARDED, f"forwarded {signum.name} to generation {target.number}", gen=target.number,
                         pids=leaders, signal=signum.name)
        return True

    async def sweep(self) -> None:
        """The reaper worker: reap zombies, keep process trees current, clear leftovers and stale socket files."""
        self.reaper.reap()
        self.guard.check()  # listening, and with the backlog it had? (a hangup is seen at once by watch_hangups)
        self.traffic.check_members()
        for generation in self.generations:
            generation.refresh()
        self.adopt_orphans()
        live = {notify_name(generation.number, instance.seq) for generation in self.generations
                for instance in generation.instances}
        for entry in os.scandir(self.runtime_dir):
            if entry.name.endswith(".notify") and entry.name not in live:
                os.unlink(entry.path)

    def kill_descendants(self) -> None:
        """Last sweep at exit: every generation is gone, so any process still below us is a leftover."""
        orphans.kill_descendants(self.events)
        self.reaper.reap()

    def adopt_orphans(self) -> None:
        """Processes re-parented to us go back to their generation, or are killed if it is finished."""
        orphans.adopt(self.generations, set(self.reaper.children), self.next_number, self.events)

    def _lenient_probe_used(self, number: int) -> None:
        if not self._lenient_logged:
            self._lenient_logged = True
            self.events.emit(Kind.PROBE_LENIENT, f"generation {number} answers 404 on {self.probe.spec.path}: no readiness "
                             "endpoint, so an answer from it counts as ready (pass --ready to be strict)", gen=number)
