"""Metrics: counted from events as they happen, rendered in Prometheus text format when scraped.

Counting is plain Python so it costs nothing at start-up; prometheus_client is imported only for a scrape.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..listener_guard import accept_queue
from ..tally import Histogram

if TYPE_CHECKING:
    from ..supervisor import Supervisor


def render(supervisor: Supervisor) -> bytes:
    """The Prometheus text exposition of the supervisor's state and tally."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    tally = supervisor.tally
    families: list[Any] = []
    serving = GaugeMetricFamily("supervise_generation", "Number of the serving generation (0: none)")
    serving.add_metric([], supervisor.fleet.serving.number if supervisor.fleet.serving else 0)
    families.append(serving)
    alive = GaugeMetricFamily("supervise_generations", "Generations alive, by state", labels=["state"])
    for state, count in Counter(generation.state for generation in supervisor.fleet.generations).items():
        alive.add_metric([state], count)
    families.append(alive)
    upgrades = CounterMetricFamily("supervise_upgrades", "Upgrades by outcome", labels=["outcome"])
    for outcome in ("promoted", "rolled-back", "refused"):
        upgrades.add_metric([outcome], tally.upgrades[outcome])
    families.append(upgrades)
    rollbacks = CounterMetricFamily("supervise_rollbacks", "Rollbacks by reason", labels=["reason"])
    for reason, count in tally.rollbacks.items():
        rollbacks.add_metric([reason], count)
    families.append(rollbacks)
    restarts = CounterMetricFamily("supervise_restarts", "Restarts of a generation that died")
    restarts.add_metric([], tally.restarts)
    families.append(restarts)
    revivals = CounterMetricFamily("supervise_listener_revivals", "Times a held listener that a child shut down "
                                   "(or whose backlog a child shrank) was made to listen again", labels=["listener"])
    for name, count in tally.revivals.items():
        revivals.add_metric([name], count)
    families.append(revivals)
    dropped = CounterMetricFamily("supervise_log_dropped", "Log lines dropped because the log's reader (stderr) "
                                  "did not take them and the buffer was full")
    dropped.add_metric([], supervisor.events.sink.dropped_total if supervisor.events.sink else 0)
    families.append(dropped)
    families.append(_histograms("supervise_upgrade_phase_seconds", "Duration of each upgrade phase", "phase", tally.phases,
                                HistogramMetricFamily))
    families.append(_histograms("supervise_probe_seconds", "Duration of one probe attempt", "kind", tally.probes,
                                HistogramMetricFamily))
    families.extend(_process_families(supervisor, GaugeMetricFamily, CounterMetricFamily))
    families.extend(_queue_families(supervisor, GaugeMetricFamily))
    families.append(_release_family(supervisor, GaugeMetricFamily))
    uptime = GaugeMetricFamily("supervise_uptime_seconds", "Seconds since the supervisor started")
    uptime.add_metric([], time.monotonic() - supervisor.started_at)
    families.append(uptime)

    class Snapshot:
        def collect(self) -> list[Any]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())  # type: ignore[arg-type]
    return generate_latest(registry)


def _histograms(name: str, documentation: str, label: str, histograms: dict[str, Histogram], family_type: Any) -> Any:
    family = family_type(name, documentation, labels=[label])
    for value, histogram in histograms.items():
        family.add_metric([value], histogram.buckets(), histogram.total)
    return family


def _process_families(supervisor: Supervisor, gauge: Any, counter: Any) -> list[Any]:
    labels = ["gen", "instance", "pid"]
    rss = gauge("supervise_child_rss_bytes", "Resident memory of each process of each instance", labels=labels)
    cpu = counter("supervise_child_cpu_seconds", "CPU time of each process of each instance", labels=labels)
    ready = gauge("supervise_instances_ready", "Instances proved ready and not draining, by generation", labels=["gen"])
    wanted = gauge("supervise_instances_wanted", "Instances the serving generation should have (--processes, ctl scale)")
    wanted.add_metric([], supervisor.fleet.processes)
    for generation in supervisor.fleet.generations:
        ready.add_metric([str(generation.number)], len(generation.ready()))
        for instance in generation.instances:
            for process in instance.living():
                try:
                    with process.oneshot():
                        memory, times = process.memory_info().rss, process.cpu_times()
                except Exception:  # noqa: BLE001 - a process may vanish between listing and reading
                    continue
                values = [str(generation.number), str(instance.index), str(process.pid)]
                rss.add_metric(values, memory)
                cpu.add_metric(values, times.user + times.system)
    return [rss, cpu, ready, wanted]


def _release_family(supervisor: Supervisor, gauge: Any) -> Any:
    """The serving release as labels (always 1), the Prometheus way to join a version onto other series."""
    info = gauge("supervise_release_info", "The serving release: its version (--version-file) and digest",
                 labels=["version", "digest", "gen"])
    serving = supervisor.fleet.serving
    if serving is not None and serving.identity is not None:
        info.add_metric([serving.identity.version or "", serving.identity.digest, str(serving.number)], 1)
    return info


def _queue_families(supervisor: Supervisor, gauge: Any) -> list[Any]:
    labels = ["listener", "address"]
    queue = gauge("supervise_listener_accept_queue", "Connections waiting to be accepted on each TCP listener",
                  labels=labels)
    backlog = gauge("supervise_listener_backlog", "Accept queue limit (listen backlog) of each TCP listener",
                    labels=labels)
    for listener in supervisor.fleet.listeners:
        if listener.kind == "tcp" and (depth := accept_queue(listener.sock)) is not None:
            queue.add_metric([listener.name, listener.address], depth[0])
            backlog.add_metric([listener.name, listener.address], depth[1])
    return [queue, backlog]
