"""Metrics: counted from events as they happen, rendered in Prometheus text format when scraped.

Counting is plain Python so it costs nothing at start-up; prometheus_client is imported only for a scrape.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..snapshot import HistogramView, Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # of the Prometheus text format rendered here


def render(snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition of a snapshot."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    tally, serving_view = snapshot.tally, snapshot.serving
    families: list[Any] = []
    serving = GaugeMetricFamily("supervise_generation", "Number of the serving generation (0: none)")
    serving.add_metric([], serving_view.number if serving_view else 0)
    families.append(serving)
    alive = GaugeMetricFamily("supervise_generations", "Generations alive, by state", labels=["state"])
    for state, count in Counter(generation.state for generation in snapshot.generations).items():
        alive.add_metric([state], count)
    families.append(alive)
    upgrades = CounterMetricFamily("supervise_upgrades", "Upgrades by outcome", labels=["outcome"])
    for outcome in ("promoted", "rolled-back", "refused"):
        upgrades.add_metric([outcome], tally.upgrades.get(outcome, 0))
    families.append(upgrades)
    rollbacks = CounterMetricFamily("supervise_rollbacks", "Rollbacks by reason", labels=["reason"])
    for reason, count in tally.rollbacks.items():
        rollbacks.add_metric([reason], count)
    families.append(rollbacks)
    restarts = CounterMetricFamily("supervise_restarts", "Restarts of a generation that died")
    restarts.add_metric([], tally.restarts)
    families.append(restarts)
    replacements = CounterMetricFamily("supervise_replacements", "Serving instances (or generations of one) replaced "
                                       "beside themselves, by reason: unhealthy (liveness), memory (--max-rss)",
                                       labels=["reason"])
    for reason in ("unhealthy", "memory"):
        replacements.add_metric([reason], tally.replacements.get(reason, 0))
    families.append(replacements)
    revivals = CounterMetricFamily("supervise_listener_revivals", "Times a held listener that a child shut down "
                                   "(or whose backlog a child shrank) was made to listen again", labels=["listener"])
    for name, count in tally.revivals.items():
        revivals.add_metric([name], count)
    families.append(revivals)
    dropped = CounterMetricFamily("supervise_log_dropped", "Log lines dropped because the log's reader (stderr) "
                                  "did not take them and the buffer was full")
    dropped.add_metric([], tally.log_dropped)
    families.append(dropped)
    output_dropped = CounterMetricFamily("supervise_child_output_dropped", "Lines of the children's output "
                                         "(--child-output prefix) dropped because the log's reader did not take them")
    output_dropped.add_metric([], tally.output_dropped)
    families.append(output_dropped)
    elsewhere = CounterMetricFamily("supervise_probe_answered_elsewhere", "Probe connections accepted by another "
                                    "generation than the one under test (with steered cutover: only by a bug)")
    elsewhere.add_metric([], tally.probes_elsewhere)
    families.append(elsewhere)
    families.append(_histograms("supervise_upgrade_phase_seconds", "Duration of each upgrade phase", "phase", tally.phases,
                                HistogramMetricFamily))
    families.append(_histograms("supervise_probe_seconds", "Duration of one probe attempt", "kind", tally.probes,
                                HistogramMetricFamily))
    families.extend(_process_families(snapshot, GaugeMetricFamily, CounterMetricFamily))
    families.extend(_queue_families(snapshot, GaugeMetricFamily))
    families.extend(_traffic_families(snapshot, GaugeMetricFamily))
    families.append(_release_family(snapshot, GaugeMetricFamily))
    uptime = GaugeMetricFamily("supervise_uptime_seconds", "Seconds since the supervisor started")
    uptime.add_metric([], snapshot.taken_at - snapshot.supervisor.started_at)
    families.append(uptime)

    class Snapshot:
        def collect(self) -> list[Any]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())  # type: ignore[arg-type]
    return generate_latest(registry)


def _histograms(name: str, documentation: str, label: str, histograms: dict[str, HistogramView], family_type: Any) -> Any:
    family = family_type(name, documentation, labels=[label])
    for value, histogram in histograms.items():
        family.add_metric([value], list(histogram.buckets), histogram.total)
    return family


def _process_families(snapshot: Snapshot, gauge: Any, counter: Any) -> list[Any]:
    labels = ["gen", "instance", "pid"]
    rss = gauge("supervise_child_rss_bytes", "Resident memory of each process of each instance", labels=labels)
    cpu = counter("supervise_child_cpu_seconds", "CPU time of each process of each instance", labels=labels)
    ready = gauge("supervise_instances_ready", "Instances proved ready and not draining, by generation", labels=["gen"])
    wanted = gauge("supervise_instances_wanted", "Instances the serving generation should have (--processes, ctl scale)")
    wanted.add_metric([], snapshot.supervisor.processes)
    for generation in snapshot.generations:
        ready.add_metric([str(generation.number)], len(generation.ready()))
        for instance in generation.instances:
            for process in instance.processes:
                values = [str(generation.number), str(instance.index), str(process.pid)]
                rss.add_metric(values, process.rss)
                cpu.add_metric(values, process.cpu_seconds)
    return [rss, cpu, ready, wanted]


def _traffic_families(snapshot: Snapshot, gauge: Any) -> list[Any]:
    """Steered cutover: each generation's share of new connections (its traffic state as a label) and what
    waits in its own socket of each listener."""
    share = gauge("supervise_generation_traffic_share", "Share of new connections each generation gets (0..1), by "
                  "its traffic state: passive, active, drained, retiring", labels=["gen", "state"])
    queued = gauge("supervise_generation_accept_queue", "Connections waiting in a generation's own socket of each "
                   "steered listener", labels=["gen", "listener"])
    for generation in snapshot.generations:
        if generation.traffic is not None:
            share.add_metric([str(generation.number), generation.traffic.state], generation.traffic.share)
            for listener, waiting in generation.traffic.queued.items():
                queued.add_metric([str(generation.number), listener], waiting)
    return [share, queued]


def _release_family(snapshot: Snapshot, gauge: Any) -> Any:
    """The serving release as labels (always 1), the Prometheus way to join a version onto other series."""
    info = gauge("supervise_release_info", "The serving release: its version (--version-file) and digest",
                 labels=["version", "digest", "gen"])
    serving = snapshot.serving
    if serving is not None and serving.release is not None:
        info.add_metric([serving.release.get("version") or "", serving.release["digest"], str(serving.number)], 1)
    return info


def _queue_families(snapshot: Snapshot, gauge: Any) -> list[Any]:
    labels = ["listener", "address"]
    queue = gauge("supervise_listener_accept_queue", "Connections waiting to be accepted on each TCP listener",
                  labels=labels)
    backlog = gauge("supervise_listener_backlog", "Accept queue limit (listen backlog) of each TCP listener",
                    labels=labels)
    for listener in snapshot.listeners:
        if listener.accept_queue is not None:
            queue.add_metric([listener.name, listener.address], listener.accept_queue[0])
            backlog.add_metric([listener.name, listener.address], listener.accept_queue[1])
    return [queue, backlog]
