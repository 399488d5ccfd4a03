"""What supervise knows about releases: their identities (for the upgrade in progress), the history of rollouts,
the last known good and bad, and the release served before the current one (what `ctl rollback` redeploys)."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from .event_kinds import Kind
from .events import Events
from .history import History, Record
from .identity import Identity, identify
from .release import Release
from .rollout import Outcome
from .states import RolloutResult


@dataclass(eq=False)
class ReleaseBook:
    """The release records of one supervisor; the history is saved to its state file by History itself."""

    history: History
    events: Events
    previous: Release | None = None  # served before the current release
    _identities: dict[Release, Identity] = field(default_factory=dict)  # for one upgrade: computed once

    async def identify(self, release: Release, fresh: bool = False) -> Identity:
        """The release's identity (identity.py), computed off the event loop; kept for the rest of the upgrade."""
        if fresh or release not in self._identities:
            self._identities[release] = await anyio.to_thread.run_sync(identify, release)
        return self._identities[release]

    def known(self, release: Release) -> Identity | None:
        """The identity computed for `release` in this upgrade, if any."""
        return self._identities.get(release)

    def forget(self) -> None:
        """Identities are for one upgrade: a deploy may rewrite the files of an identical-looking release."""
        self._identities.clear()

    def refusal(self, release: Release, identity: Identity, force: bool) -> str | None:
        """Why an upgrade to `release` must not run, or None: it is known bad (unless forced)."""
        if force or not self.history.is_known_bad(identity):
            return None
        return (f"release {identity.name} ({release.describe()}) is known bad: it was rolled back before, and nothing "
                f"it is told by has changed since ({identity.covers}); deploy a fixed release, or force it "
                "(supervise ctl upgrade --force)")

    def promoted(self, before: Release | None, identity: Identity | None, release: Release) -> None:
        """A generation of `release` serves now, after one of `before`: that one is what a rollback redeploys."""
        if before is not None and before != release:
            self.previous = before
        if identity is not None:
            self.history.good(identity)

    async def record(self, outcome: Outcome, serving: Release | None, serving_identity: Identity | None) -> None:
        """Keep the rollout in the history; a release that failed by its own fault becomes known bad — unless it
        cannot be told apart from the serving or last known good release (the log and the verdict say so)."""
        if outcome.identity is None and outcome.release is not None:
            outcome.identity = await self.identify(outcome.release)
        identity = outcome.identity
        bad = None
        if identity is not None and outcome.result == RolloutResult.ROLLED_BACK and outcome.kind is not None and outcome.kind.blames_release:
            if serving is not None and serving_identity is None:
                serving_identity = await self.identify(serving)
            bad, outcome.blame = self.history.blame(identity, serving_identity)
            self.events.emit(Kind.RELEASE_KNOWN_BAD if bad else Kind.RELEASE_NOT_BLAMED, outcome.blame,
                             level="warning" if bad else "info", gen=outcome.new_gen, release=identity.as_dict())
        self.history.add(Record(outcome.result, outcome.reason, outcome.trigger, outcome.new_gen, outcome.old_gen,
                                outcome.started_at, outcome.timings, identity.as_dict() if identity else None,
                                outcome.blame, list(outcome.output)), bad)
