"""Which sockets the next generation gets, and closing those no generation uses any more.

A listener the supervisor already holds is reused as it is when it is shared by every generation (unix, adopted,
UDP, --cutover shared); a steered one gets a sibling, the next generation's own socket on the same address
(traffic.py). A listener the settings add is bound now; one they drop is closed once no generation uses it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .config import Settings
from .errors import UserError
from .event_kinds import Kind
from .events import Events
from .listeners import Listener, ListenSpec, bind, sibling
from .traffic import Traffic


def for_settings(settings: Settings, held: Sequence[Listener], traffic: Traffic,
                 bind_new: bool) -> tuple[tuple[Listener, ...], tuple[ListenSpec, ...]]:
    """The listeners `settings` asks for, from those `held`: reused, a sibling of a steered one, or bound now —
    or, not binding (a dry run), returned as specs. Adopted listeners that no --listen names come last."""
    by_spec = {listener.spec: listener for listener in held if listener.spec is not None}
    chosen: list[Listener] = []
    unbound: list[ListenSpec] = []
    try:
        for spec in settings.listen:
            if spec in by_spec:
                steered = bind_new and traffic.steered(by_spec[spec])
                chosen.append(sibling(by_spec[spec]) if steered else by_spec[spec])
            elif bind_new:
                chosen.append(bind(spec, settings.backlog, settings.nodelay, settings.unix_mode,
                                   traffic.steerable(spec, adopted=False)))
            else:
                unbound.append(spec)
    except UserError:
        for listener in chosen:
            if listener not in held:
                listener.close()
        raise
    chosen.extend(listener for listener in _unique(held) if listener.spec is None)  # adopted, never in a file
    return tuple(chosen), tuple(unbound)


def close_unused(candidates: Sequence[Listener], in_use: set[Listener], traffic: Traffic, events: Events) -> None:
    """Close each candidate no generation uses; a listener whose last socket that was is reported closed."""
    for listener in candidates:
        if listener in in_use or listener.sock.fileno() == -1:
            continue
        address = listener.address
        if traffic.leave(listener) and traffic.held(listener):
            continue  # a generation's own socket of a steered listener: another generation's holds the address
        listener.close()
        events.emit(Kind.LISTENER_CLOSED, f"closed listener {listener.name} ({address}): no generation uses it any "
                    "more", name=listener.name, address=address)


def _unique(listeners: Iterable[Listener]) -> list[Listener]:
    return list(dict.fromkeys(listeners))
