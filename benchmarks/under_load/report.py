"""The printed report: supervise next to the baselines, the upgrades' phases and the supervisor's share, the
rollbacks, the open fds, the wrk cross-check and the targets, with notes on what is measured."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .samples import divided, spread


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ratio(base: Any, ours: Any) -> str:
    if not isinstance(base, (int, float)) or not isinstance(ours, (int, float)):
        return "-"
    if ours == 0:
        return "=" if base == 0 else "∞"
    return f"×{base / ours:.2f}"


def errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in errors.items()) or "-"


def comparison_rows(runs: dict[str, dict[str, Any]]) -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    return [
        ("requests, whole run", lambda r: r["total"]["requests"]),
        ("  in upgrade windows", lambda r: r["during"]["requests"]),
        ("failed requests", lambda r: r["total"]["failed"]),
        ("  in upgrade windows", lambda r: r["during"]["failed"]),
        ("keep-alive resets (apart)", lambda r: r["total"]["keepalive_resets"]),
        ("throughput steady, req/s", lambda r: r["steady"]["rps"]),
        ("throughput upgrading, req/s", lambda r: r["during"]["rps"]),
        ("p50 steady, ms", lambda r: r["steady"]["p50_ms"]),
        ("p50 upgrading, ms", lambda r: r["during"]["p50_ms"]),
        ("p99 steady, ms", lambda r: r["steady"]["p99_ms"]),
        ("p99 upgrading, ms", lambda r: r["during"]["p99_ms"]),
        ("p99 upgrading / steady", lambda r: divided(r["during"]["p99_ms"], r["steady"]["p99_ms"])),
        ("max steady, ms", lambda r: r["steady"]["max_ms"]),
        ("max upgrading, ms", lambda r: r["during"]["max_ms"]),
        ("longest no-success gap upgr., ms", lambda r: r["during"]["longest_gap_ms"]),
        ("upgrade time median, s", lambda r: r["upgrade_s"]["median"]),
        ("upgrade time max, s", lambda r: r["upgrade_s"]["max"]),
        ("manager CPU per steady s, ms", lambda r: r["manager_cpu_ms"]["per_steady_second"]),
        ("manager CPU per upgrade, ms", lambda r: r["manager_cpu_ms"]["per_upgrade"]),
    ]


def print_comparison(title: str, runs: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    print(f"\n{title}")
    head = f"  {'':<33}"
    for run in runs:
        head += f"{run['system']:>18}" + ("" if run is reference else f"{'vs sup.':>9}")
    print(head)
    for label, get in comparison_rows({}):
        row = f"  {label:<33}"
        for run in runs:
            value = get(run)
            row += f"{fmt(value, 3 if isinstance(value, float) and value < 10 else 1):>18}"
            if run is not reference:
                row += f"{ratio(value, get(reference)):>9}"
        print(row)
    failing = [(run["system"], run["total"]["errors"]) for run in runs if run["total"]["errors"]]
    for system, errors in failing:
        print(f"  errors, {system}: {errors_text(errors)}")


def print_phases(run: dict[str, Any], every: bool) -> None:
    notify = run["system"].endswith("(notify)")
    print(f"\n  {run['system']}, {'keep-alive' if run['keepalive'] else 'new connection per request'}: phases in seconds "
          f"since the rollout began (supervisor clock); ms columns: share = "
          + ("promoted − probe ok" if notify else "promoted − READY=1 (app ready)"))
    print(f"  {'#':>3} {'spawned':>8} {'READY=1':>8} {'probe ok':>8} {'promoted':>8} {'old gone':>8} {'share':>7} "
          f"{'ok→prom':>8} {'RDY→prom':>8} {'ts x-chk':>8} {'HUP→gone':>8} {'failed':>6} {'p99 ms':>7}")
    rows = run["upgrades"]
    for index, record in enumerate(rows, 1):
        if not every and 3 < index < len(rows) - 1:
            if index == 4:
                print("  ...")
            continue
        phases = record.get("phases", {})
        print(f"  {index:>3} {fmt(phases.get('spawned'), 3):>8} {fmt(phases.get('ready_signal'), 3):>8} "
              f"{fmt(phases.get('probe_ready'), 3):>8} {fmt(phases.get('promoted'), 3):>8} {fmt(phases.get('old_gone'), 3):>8} "
              f"{fmt(record.get('share_ms'), 2):>7} {fmt(record.get('verdict_to_promotion_ms'), 2):>8} "
              f"{fmt(record.get('ready_signal_to_promotion_ms'), 2):>8} {fmt(record.get('share_log_ts_ms'), 0):>8} "
              f"{fmt(record.get('signal_to_done_s'), 3):>8} {record.get('failed', 0):>6} {fmt(record.get('p99_ms'), 2):>7}"
              + ("" if record["verdict"] == "promoted" else f"  {record['verdict']}: {record.get('reason')}"))
    agg = {key: spread([r.get("phases", {}).get(key) for r in rows]) for key in
           ("spawned", "ready_signal", "probe_ready", "promoted", "old_gone")}
    ms = {key: spread([r.get(key) for r in rows], digits=3) for key in
          ("share_ms", "verdict_to_promotion_ms", "ready_signal_to_promotion_ms", "share_log_ts_ms")}
    for name in ("median", "max"):
        print(f"  {name[:3]} " + " ".join(f"{fmt(agg[k][name], 3):>8}" for k in agg) + " "
              + " ".join(f"{fmt(ms[k][name], 2):>{7 if k == 'share_ms' else 8}}" for k in ms))


def print_baseline_phases(runs: list[dict[str, Any]]) -> None:
    print("\n  baselines: phases, seconds after the signal (benchmark clock), median / max over the upgrades")
    print(f"  {'':<34} {'old gone':>15} {'new spawned':>15} {'new ready':>15} {'signal→done':>15}")
    for run in runs:
        rows = run["upgrades"]
        cells = []
        for key in ("old_gone", "spawned", "ready_signal"):
            figures = spread([r["phases"].get(key) for r in rows], digits=3)
            cells.append(f"{fmt(figures['median'], 3)} / {fmt(figures['max'], 3)}")
        cells.append(f"{fmt(run['upgrade_s']['median'], 3)} / {fmt(run['upgrade_s']['max'], 3)}")
        label = f"{run['system']} ({'keep-alive' if run['keepalive'] else 'new conn'})"
        print(f"  {label:<34} " + " ".join(f"{c:>15}" for c in cells))


NOTES = """
What is measured
  * Load: supervisor/testing/loadgen.py, C closed-loop clients on 127.0.0.1, GET /; latency = connect (when a new
    connection is opened) + request + whole response. "steady" = the S seconds before the first upgrade (after a
    warm-up); "upgrading" = requests *started* inside an upgrade window: signal → the old generation's `retired`
    event for supervise, SIGTERM → new process printed "serving on" for the naive restart, HUP → all new
    workers loaded and every old worker exited for gunicorn. Failed = any error or non-2xx; a keep-alive
    connection that dies before any response byte (the server closed it as idle) is a "keep-alive reset",
    counted apart (DESIGN.md, Traps). "longest no-success gap" = longest time inside the windows in which no
    request completed successfully: ~ the outage a client sees.
  * Phases (supervise): the `promoted` event's timings (seconds since the rollout began: spawned = fork/exec
    done, probe ok = the readiness probe's verdict, promoted = promotion decided), READY=1 = spawned + the
    `ready` event's elapsed (when the supervisor read the generation's READY=1; the app sends it in both probe
    modes, right after it starts accepting), old gone = promoted + the `retired` event's elapsed.
  * Supervisor's share (ready signal → promotion decision):
    - notify (--watch 0): "ok→prom" = promoted − probe ok, both on the rollout's clock; the notify probe's
      verdict is the wake-up on READY=1, so this is the supervisor's own decision time (target ≤ 5 ms).
      "ts x-chk" = promoted event ts − READY=1 `notify` event ts (1 ms log resolution) also covers that wake-up.
    - http (--watch 0): "RDY→prom" = promoted − READY=1, i.e. the probe's polling lag after the app became
      ready plus the decision (target ≤ one probe interval = --health-interval). READY=1 is placed via the
      generation's start instant, stamped a few bookkeeping steps before `spawned`: ± a few ms under load,
      which is why it can even come out negative for notify.
    Not visible on the supervisor's clock: how long the datagram / the connection waited before its loop ran.
  * Ratios: baseline ÷ supervise (notify) for the same load; "∞" = supervise 0, baseline not.
"""


def print_report(report: dict[str, Any], print_cutover: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
    """Everything measured (sections 1-5 when they ran, then section 6 by `print_cutover`), the targets, the notes."""
    cfg = report["config"]
    print("\n" + "=" * 100)
    print(f"supervise: upgrades under load — {report['machine']['cpus']} cores, Python {report['machine']['python']}, "
          f"127.0.0.1, K={cfg['upgrades']} upgrades per run, C={cfg['concurrency']} clients, steady {cfg['seconds']:g}s")
    print(f"supervise, examples/app.py and the stub from: {report['source']['describe']}; event loop in the "
          f"supervisor: {report['machine']['loop']}; load average before/after: {report['machine']['loadavg_before']} / "
          f"{report['machine']['loadavg_after']}")
    print("=" * 100)
    if report["runs"]:
        print_classic(report)
    print_cutover(report["cutover"], cfg)
    print("\nTargets")
    for target in report["targets"]:
        print(f"  [{'PASS' if target['ok'] else 'FAIL'}] {target['name']}: {target['measured']}")
    if report["runs"]:
        print(NOTES.rstrip())
    print(f"\ntotal wall time {report['wall_s']:.0f}s")


def print_classic(report: dict[str, Any]) -> None:
    """Sections 1-5."""
    cfg = report["config"]
    runs = report["runs"]
    close = [runs["supervise-notify-close"], runs["supervise-http-close"], runs["naive-close"], runs["gunicorn-close"]]
    print_comparison("1. New connection per request (zero-loss case)", close, close[0])
    reference = close[0]
    if "control" in reference:
        c = reference["control"]
        print(f"  control: {cfg['upgrades']} windows in the supervise (notify) run in which a standalone examples/app.py "
              f"starts and stops on\n  another port (an upgrade's CPU cost, no upgrade): p50 {fmt(c['p50_ms'], 3)} ms, "
              f"p99 {fmt(c['p99_ms'], 3)} ms (×{fmt(divided(c['p99_ms'], reference['steady']['p99_ms']), 2)} steady), "
              f"max {fmt(c['max_ms'], 1)} ms, {c['failed']} failed")
    for run in close[:2]:
        if "during_before_promotion" in run:
            pre, post = run["during_before_promotion"], run["during_after_promotion"]
            print(f"  {run['system']}: upgrade windows split at the promotion — before (new generation starting, old "
                  f"serving): p99 {fmt(pre['p99_ms'], 3)} ms, {pre['requests']} requests; after (both serve, old drains): "
                  f"p99 {fmt(post['p99_ms'], 3)} ms, {post['requests']} requests")
    print("  manager = the process that upgrades: the supervisor, or gunicorn's master (the naive restart has none);"
          " CPU from /proc, 10 ms ticks")
    ka = [runs[k] for k in ("supervise-notify-keepalive", "naive-keepalive", "gunicorn-keepalive") if k in runs]
    if ka:
        print_comparison("   Keep-alive variant (gunicorn sync workers close after every response)", ka, ka[0])
    print("\n2. Upgrade phases and the supervisor's own share")
    print_phases(runs["supervise-notify-close"], every=True)
    print_phases(runs["supervise-http-close"], every=True)
    if "supervise-notify-keepalive" in runs:
        print_phases(runs["supervise-notify-keepalive"], every=False)
    print_baseline_phases([runs[k] for k in runs if not k.startswith("supervise")])
    shares = report["share"]
    print(f"\n  share, notify: median {fmt(shares['notify']['median'], 3)} ms, p90 {fmt(shares['notify']['p90'], 3)} ms, "
          f"max {fmt(shares['notify']['max'], 3)} ms over {shares['notify']['n']} upgrades (target ≤ 5 ms)")
    print(f"  share, http (interval {cfg['http_interval']:g}s): median {fmt(shares['http']['median'], 1)} ms, "
          f"max {fmt(shares['http']['max'], 1)} ms over {shares['http']['n']} upgrades (target ≤ {cfg['http_interval'] * 1000:g} ms)")

    rb = report["rollbacks"]
    print("\n3. Rollbacks under load (stub releases, --ready http/readyz --ready-timeout 1.5s --watch 3s "
          "--health-interval 200ms)")
    print(f"  {'case':<26} {'verdict':<12} {'HUP→verdict s':>13} {'requests':>9} {'failed':>7} {'p99 ms':>7}  reason")
    for case in rb["cases"]:
        print(f"  {case['case']:<26} {case['verdict']:<12} {case['signal_to_verdict_s']:>13.3f} {case['requests']:>9} "
              f"{case['failed']:>7} {fmt(case['p99_ms'], 2):>7}  {case['reason']}"
              + ("" if case["reason_ok"] else f"  (expected: {case['expected_reason']})")
              + (f"  errors: {errors_text(case['errors'])}" if case["errors"] else ""))
    print(f"  generation 1 kept serving throughout: {rb['first_generation_kept_serving']}")
    interleaved = sum(run["stop"].get("interleaved_json_lines", 0) for run in runs.values())
    if interleaved:
        print(f"\n  note: {interleaved} supervisor JSON log lines arrived glued after a child's unterminated stderr "
              "output (the child wrote its text and its newline separately); parsed anyway")

    fds = report["fds"]
    counts = fds["num_fds"]
    print("\n4. Supervisor open fds (psutil num_fds), stub release, --ready tcp --watch 0, light load (2 clients)")
    print("  " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())
          + f"  → identical: {fds['identical']}; verdicts {fds['verdicts']}; upgrade median "
          f"{fmt(fds['upgrade_s']['median'], 3)} s; load {fds['load']['requests']} requests, {fds['load']['failed']} failed")
    if not fds["identical"]:
        print(f"  opened since before: {fds['diff_vs_before']['opened']}; closed: {fds['diff_vs_before']['closed']}")

    if report.get("wrk"):
        print("\n5. wrk cross-check (aggregates only; new connection per request; latency excludes connect)")
        print(f"  {'':<18} {'steady req/s':>12} {'p50':>7} {'p99':>7} {'max':>8} | {'upgrade run req/s':>17} "
              f"{'p50':>7} {'p99':>7} {'max':>8} {'failed':>7} {'upgrade med s':>13}")
        for item in report["wrk"]:
            s, d = item["steady"], item["upgrade_phase"]
            print(f"  {item['system']:<18} {s['rps']:>12} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} {s['max_ms']:>8.2f} | "
                  f"{d['rps']:>17} {d['p50_ms']:>7.2f} {d['p99_ms']:>7.2f} {d['max_ms']:>8.2f} {d['failed']:>7} "
                  f"{fmt(item['upgrade_s']['median'], 3):>13}" + (f"  {errors_text(d['errors'])}" if d["errors"] else ""))
    elif report.get("wrk_skipped"):
        print(f"\n5. wrk cross-check skipped: {report['wrk_skipped']}")
