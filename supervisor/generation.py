"""A generation: the instances started from one release at one time (SUPERVISE_INSTANCE=0..N-1).

It is what an upgrade replaces and a rollback restores. Its instances come and go one at a time — a dead one
is replaced, `ctl scale` adds or drains some, a rolling upgrade drains them batch by batch — so this holds the
set: which instances are ready, which indexes are free, the pids of all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import psutil

from .identity import Identity
from .instance import Instance, Launcher
from .listeners import Listener
from .priority import Lowering
from .reaper import ExitStatus
from .release import Release
from .states import InstanceState


@dataclass(eq=False)
class Generation:
    """The instances of one release, and the sockets they inherited (kept open while any may use them)."""

    number: int
    release: Release
    listeners: tuple[Listener, ...]
    launcher: Launcher
    instances: list[Instance] = field(default_factory=list)
    state: InstanceState = InstanceState.STARTING
    started_at: float = field(default_factory=anyio.current_time)
    ready_at: float | None = None
    ready_signal: anyio.Event = field(default_factory=anyio.Event)
    casualty: anyio.Event = field(default_factory=anyio.Event)  # an instance that had been ready died
    lost: tuple[Instance, ExitStatus] | None = None
    identity: Identity | None = None  # its release's, when it was started or promoted: tells whether its files changed since
    _spawned: int = 0

    def spawn(self, index: int, lowering: Lowering | None = None) -> Instance:
        """Start instance `index` (at the CPU priority `lowering` gives it); raises SpawnError (nothing left
        running) if it cannot."""
        instance = Instance.start(self.launcher, self.number, index, self._spawned + 1, self.release, self.listeners,
                                  lowering)
        self._spawned += 1
        self.instances.append(instance)
        return instance

    @property
    def spawned(self) -> int:
        """How many processes were started for it, replacements included (the next one's seq is one more)."""
        return self._spawned

    def forget(self, instance: Instance) -> None:
        """An instance is gone for good: release what we hold for it (its last lines are kept if it failed)."""
        instance.close(failed=instance.crashed or instance.ready_at is None)
        if instance in self.instances:
            self.instances.remove(instance)

    def instance_ready(self, instance: Instance, detail: str, by_notify: bool) -> float:
        """One of its instances proved ready (see Instance.mark_ready; the seconds it took). In the serving
        generation — a replacement, a restored or added instance — it serves at once."""
        elapsed = instance.mark_ready(detail, by_notify)
        self._mark_ready()
        if self.state == InstanceState.SERVING and instance.state == InstanceState.READY:  # not one told to drain
            instance.enter(InstanceState.SERVING)
        return elapsed

    def _mark_ready(self) -> None:
        """The generation's first instances are ready (a probe of the generation may now wait on that)."""
        if self.ready_at is None:
            self.ready_at = anyio.current_time()
            if self.state == InstanceState.STARTING:
                self.state = InstanceState.READY
            self.ready_signal.set()

    def serve(self) -> None:
        """The generation becomes the serving one; its ready instances are serving instances."""
        self.state = InstanceState.SERVING
        for instance in self.ready():
            instance.enter(InstanceState.SERVING)

    def exited(self, instance: Instance, status: ExitStatus) -> bool:
        """Note an instance's exit; True if it was unexpected (not drained, not stopped by us)."""
        if instance.state in (InstanceState.DRAINING, InstanceState.EXITED):
            return False
        instance.crashed = True
        if instance.ready_at is not None and self.lost is None:
            self.lost = (instance, status)
            self.casualty.set()
        return True

    # -- which instances -----------------------------------------------------------------------------------------

    def current(self) -> list[Instance]:
        """Instances that hold their index: alive, or dead but not yet replaced — anything but draining."""
        return [instance for instance in self.instances if instance.state not in (InstanceState.DRAINING, InstanceState.EXITED)]

    def drain_order(self) -> list[Instance]:
        """Current instances in the order a rolling upgrade drains them: dead ones first (they serve nothing)."""
        return sorted(self.current(), key=lambda instance: (instance.alive, instance.index))

    def ready(self) -> list[Instance]:
        """Instances proved ready, alive and not draining."""
        return [instance for instance in self.instances if instance.ready]

    def failing(self) -> list[Instance]:
        """Instances waiting for a replacement: died on their own, or failed their health checks."""
        return [instance for instance in self.current() if not instance.alive or instance.sick]

    def owner(self, pid: int | None) -> Instance | None:
        """The instance a process belongs to (the one that answered a probe)."""
        return next((instance for instance in self.instances if pid in instance.members), None) if pid else None

    def free_indexes(self, count: int) -> list[int]:
        """The `count` lowest instance indexes no current instance holds."""
        taken = {instance.index for instance in self.current()}
        free: list[int] = []
        index = 0
        while len(free) < count:
            if index not in taken:
                free.append(index)
            index += 1
        return free

    # -- the processes of all instances ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return any(instance.alive for instance in self.instances)

    @property
    def leader(self) -> int:
        """The main pid of its first living instance (for hooks and probes that name one pid)."""
        living = self.leaders()
        return living[0] if living else (self.instances[0].leader if self.instances else 0)

    def leaders(self) -> list[int]:
        """The main pid of each living instance, in index order."""
        living = sorted((instance for instance in self.instances if instance.alive), key=lambda item: item.index)
        return [instance.leader for instance in living]

    @property
    def members(self) -> dict[int, psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for instance in self.instances:
            found.update(instance.members)
        return found

    @property
    def notified_ready(self) -> bool:
        ready = self.ready()
        return bool(ready) and all(instance.notified_ready for instance in ready)

    @property
    def notified_stopping(self) -> bool:
        return any(instance.notified_stopping for instance in self.ready())

    @property
    def last_watchdog(self) -> float | None:
        pings = [instance.last_watchdog for instance in self.instances if instance.last_watchdog is not None]
        return max(pings) if pings else None

    def refresh(self) -> None:
        for instance in self.instances:
            instance.refresh()

    def running(self) -> bool:
        return any(instance.running() for instance in self.instances)

    def living(self) -> list[psutil.Process]:
        return [process for instance in self.instances for process in instance.living()]

    def pids(self, fresh: bool = False) -> list[int]:
        return [pid for instance in self.instances for pid in instance.pids(fresh)]

    def signal_group(self, signum: int) -> bool:
        """Send `signum` to every living instance's process group; True if any got it."""
        results = [instance.signal_group(signum) for instance in self.instances if instance.alive]
        return any(results)

    def close(self) -> None:
        """Release what the supervisor holds for every instance (the last lines of a generation that never served,
        or of an instance that died, are kept a while)."""
        never_served = self.state not in (InstanceState.SERVING, InstanceState.EXITED)
        self.state = InstanceState.EXITED
        for instance in self.instances:
            instance.close(failed=never_served or instance.crashed)
