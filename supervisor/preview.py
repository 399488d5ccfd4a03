"""The dry run of an upgrade (`ctl upgrade --dry-run`): the real upgrade's first steps — the fleet's prepare(),
the release's identity and refusal, the batch size — taken without binding, starting or recording anything, so
what it says cannot drift from what an upgrade does. control/plan.py words it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .errors import UserError
from .generation import Generation
from .identity import Identity
from .listeners import Listener
from .release import Release
from .rollout import Host, Plan, batch_step
from .spawn import SpawnError, out_of_fds


@dataclass(frozen=True)
class Preview:
    """What an upgrade started now would do. `error` set: it would not get as far as starting anything."""

    number: int  # the generation it would start
    old: int | None  # the serving generation
    old_order: tuple[int, ...]  # the serving generation's instance indexes, in the order they would drain
    closing: tuple[tuple[str, str], ...]  # (name, address) of held listeners the new settings no longer pass on
    plan: Plan | None = None
    identity: Identity | None = None
    known_bad: bool = False
    refusal: str | None = None  # it would be refused (known bad)
    surge: str | None = None  # why all instances would start at once although the strategy asks for batches
    error: str | None = None
    exec_failed: bool = False  # `error` is the release's: it would be rolled back at once
    steered: bool = False  # each generation has its own socket on the TCP listeners (traffic.py)
    shared: tuple[tuple[str, str], ...] = ()  # (listener, why) for those every generation shares


async def preview(host: Host, old: Generation | None, number: int, held: Sequence[Listener], force: bool,
                  release: Release | None = None, steered: bool = False,
                  shared: Sequence[tuple[str, str]] = ()) -> Preview:
    """Dry-run an upgrade from `old` (serving with the `held` listeners) to generation `number` of `release`, or of
    what is on disk now."""
    start = Preview(number, old.number if old else None,
                    tuple(instance.index for instance in old.drain_order()) if old else (), (), steered=steered,
                    shared=tuple(shared))
    try:
        plan = host.prepare(release, dry_run=True)
    except SpawnError as exc:
        return replace(start, error=str(exc), exec_failed=True)
    except UserError as exc:
        return replace(start, error=str(exc))
    except OSError as exc:
        if not out_of_fds(exc):
            raise
        return replace(start, error=f"the supervisor is out of file descriptors ({exc.strerror})")
    identity = await host.identify(plan.release, fresh=True)
    _, surge = await batch_step(host, old, plan.settings.strategy, plan.processes)
    closing = tuple((listener.name, listener.address) for listener in held
                    if listener.spec is not None and listener.spec not in plan.settings.listen)
    return replace(start, plan=plan, identity=identity, refusal=host.refusal(plan.release, identity, force),
                   known_bad=host.refusal(plan.release, identity, False) is not None, surge=surge,
                   closing=closing)
