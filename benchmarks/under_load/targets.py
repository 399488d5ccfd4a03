"""The targets a run is held to: zero failed requests across upgrades and rollbacks, p99 while upgrading within
1.1 × steady, the supervisor's own share of an upgrade, and no fd leak."""

from __future__ import annotations

from typing import Any

from .samples import divided


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    runs = report["runs"]
    ours = [runs[k] for k in runs if k.startswith("supervise")]
    targets = []
    upgrades = sum(len(r["upgrades"]) for r in ours)
    failed = sum(r["total"]["failed"] for r in ours if not r["keepalive"])
    targets.append({"name": f"0 failed requests across upgrades under load (new connection per request, {upgrades - len(runs['supervise-notify-keepalive']['upgrades']) if 'supervise-notify-keepalive' in runs else upgrades} upgrades)",
                    "ok": failed == 0, "measured": failed})
    if "supervise-notify-keepalive" in runs:
        ka = runs["supervise-notify-keepalive"]["total"]
        targets.append({"name": "keep-alive variant: failed requests other than keep-alive resets", "ok": ka["failed"] == 0,
                        "measured": f"{ka['failed']} (keep-alive resets, reported apart: {ka['keepalive_resets']})"})
    rb = report["rollbacks"]
    targets.append({"name": "0 failed requests across rollbacks (" + ", ".join(c["case"] for c in rb["cases"]) + ")",
                    "ok": rb["failed_total"] == 0 and all(c["verdict"] == "rolled-back" for c in rb["cases"]),
                    "measured": f"{rb['failed_total']} failed; verdicts " + ", ".join(c["verdict"] for c in rb["cases"])})
    for run in ours:
        ratio_value = divided(run["during"]["p99_ms"], run["steady"]["p99_ms"])
        variant = "keep-alive" if run["keepalive"] else "new conn"
        context = []
        if "control" in run:
            context.append(f"control windows ×{divided(run['control']['p99_ms'], run['steady']['p99_ms'])}")
        for key in (("naive-keepalive", "gunicorn-keepalive") if run["keepalive"] else ("naive-close", "gunicorn-close")):
            if key in runs:
                context.append(f"{runs[key]['system']} ×{divided(runs[key]['during']['p99_ms'], runs[key]['steady']['p99_ms'])}")
        targets.append({"name": f"p99 upgrading ≤ 1.1 × steady p99 — {run['system']}, {variant}",
                        "ok": ratio_value is not None and ratio_value <= 1.1,
                        "measured": f"{run['during']['p99_ms']} ms vs {run['steady']['p99_ms']} ms = ×{ratio_value}"
                        + (f" (for comparison: {'; '.join(context)})" if context else "")})
    share = report["share"]
    targets.append({"name": "supervisor's share ≤ 5 ms with notify (max over upgrades)",
                    "ok": share["notify"]["max"] is not None and share["notify"]["max"] <= 5.0,
                    "measured": f"median {share['notify']['median']} ms, max {share['notify']['max']} ms"})
    limit = report["config"]["http_interval"] * 1000
    targets.append({"name": f"supervisor's share ≤ one probe interval ({limit:g} ms) with http (max)",
                    "ok": share["http"]["max"] is not None and share["http"]["max"] <= limit,
                    "measured": f"median {share['http']['median']} ms, max {share['http']['max']} ms"})
    fds = report["fds"]
    targets.append({"name": f"open fds identical after {fds['upgrades']} upgrades", "ok": fds["identical"],
                    "measured": " → ".join(str(v) for v in fds["num_fds"].values())})
    return targets
