"""Event kinds: the stable machine names of what happens (`promoted`, `rolled-back`, …).

Every producer emits a member and every consumer (the log, systemd STATUS, metrics, the control API's streams)
matches members, so a misspelt kind is an AttributeError at once, not an event nobody hears. They are strings on
the wire (JSON logs, `ctl events`): StrEnum members compare and serialize as their values.
"""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    # the supervisor's life
    STARTING = "starting"
    LISTENING = "listening"
    FD_LIMIT_RAISED = "fd-limit-raised"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FATAL = "fatal"
    INTERNAL_ERROR = "internal-error"
    LOG_DROPPED = "log-dropped"
    # upgrades (rollout.py) and their requests
    UPGRADE_REQUESTED = "upgrade-requested"
    UPGRADE_COALESCED = "upgrade-coalesced"
    UPGRADE_IGNORED = "upgrade-ignored"
    UPGRADE_REFUSED = "upgrade-refused"
    UPGRADE_INTERRUPTED = "upgrade-interrupted"
    TRANSITION = "transition"
    SPAWNED = "spawned"
    READY = "ready"
    WATCHING = "watching"
    BATCH = "batch"
    STRATEGY_FALLBACK = "strategy-fallback"
    PROMOTED = "promoted"
    DRAINING = "draining"
    DRAIN_TIMEOUT = "drain-timeout"
    DRAIN_UNQUIET = "drain-unquiet"
    RETIRED = "retired"
    INSTANCE_RETIRED = "instance-retired"
    ROLLED_BACK = "rolled-back"
    RESTORING = "restoring"
    HOOK = "hook"
    RELEASE_KNOWN_BAD = "release-known-bad"
    RELEASE_NOT_BLAMED = "release-not-blamed"
    # keeping the serving generation whole
    EXITED = "exited"
    RESTARTING = "restarting"
    REPAIR_DEFERRED = "repair-deferred"
    UNHEALTHY = "unhealthy"
    MEMORY_LIMIT = "memory-limit"
    SCALE_REQUESTED = "scale-requested"
    SIGNAL_FORWARDED = "signal-forwarded"
    SIGNAL_DROPPED = "signal-dropped"
    NOTIFY = "notify"
    NOTIFY_IGNORED = "notify-ignored"
    PROBE_LENIENT = "probe-lenient"
    # what is held: listeners, cgroups, leftovers of an earlier supervisor
    LISTENER_REVIVED = "listener-revived"
    LISTENER_LOST = "listener-lost"
    LISTENER_CLOSED = "listener-closed"
    TRAFFIC = "traffic"
    STEERING = "steering"
    STEERING_FALLBACK = "steering-fallback"
    CONNECTIONS_RESCUED = "connections-rescued"
    PRIORITY = "priority"
    CGROUPS = "cgroups"
    CGROUPS_UNAVAILABLE = "cgroups-unavailable"
    CGROUP_KILLED = "cgroup-killed"
    CGROUP_REMOVED = "cgroup-removed"
    CGROUP_FAILED = "cgroup-failed"
    LEFTOVER_REMOVED = "leftover-removed"
    LEFTOVER_KILLED = "leftover-killed"
    LEFTOVERS_REMOVED = "leftovers-removed"
    # state and control
    STATE_SAVED = "state-saved"
    STATE_UNREADABLE = "state-unreadable"
    STATE_CORRUPT = "state-corrupt"
    STATE_SAVE_FAILED = "state-save-failed"
    CONTROL_REFUSED = "control-refused"
    CONTROL_SHED = "control-shed"
    REEXECUTING = "reexecuting"
    REEXECUTED = "reexecuted"
    REEXEC_REFUSED = "reexec-refused"
    METRICS_LISTENING = "metrics-listening"
