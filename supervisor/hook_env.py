"""What an operator's hook (--pre-upgrade, --post-upgrade, --on-rollback) is told in its environment."""

from __future__ import annotations

from .generation import Generation
from .identity import Identity


def hook_environment(old: Generation | None, new: Generation | None, identity: Identity | None,
                     reason: str, output: tuple[str, ...] = ()) -> dict[str, str]:
    """Both generations, their main pids (the first instance's, and every living instance's by index), both
    releases (`identity`: the new one's), the reason of a rollback and the last lines the failed instance wrote
    (one per line)."""
    return {
        "SUPERVISE_OLD_GENERATION": str(old.number) if old else "",
        "SUPERVISE_OLD_PID": str(old.leader or "") if old else "",
        "SUPERVISE_OLD_PIDS": " ".join(map(str, old.leaders())) if old else "",
        "SUPERVISE_NEW_GENERATION": str(new.number) if new else "",
        "SUPERVISE_NEW_PID": str(new.leader or "") if new else "",
        "SUPERVISE_NEW_PIDS": " ".join(map(str, new.leaders())) if new else "",
        "SUPERVISE_REASON": reason,
        "SUPERVISE_OUTPUT": "\n".join(output),
        **_release("NEW", identity),
        **_release("OLD", old.identity if old else None),
    }


def _release(which: str, identity: Identity | None) -> dict[str, str]:
    """SUPERVISE_NEW_RELEASE (the version, else the digest) and SUPERVISE_NEW_VERSION (the version file's, or empty)."""
    return {f"SUPERVISE_{which}_RELEASE": identity.name if identity else "",
            f"SUPERVISE_{which}_VERSION": (identity.version or "") if identity else ""}
