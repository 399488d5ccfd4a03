"""Steered vs shared cutover side by side (issue 13): the same load and upgrades against supervise with each
`--cutover`, for examples/app.py with an I/O-bound and a CPU-bound start-up and for uvicorn and hypercorn (their
command lines in examples/servers/README.md), next to gunicorn's own best reload (USR2, then TERM to the old
master). One table: failed requests by kind, p99 upgrading / steady, the longest gap with no successful request,
and signal → old generation gone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .gunicorn import GunicornUsr2
from .measurement import Beside, Config, measure
from .report import errors_text, fmt
from .samples import divided
from .source import PYTHON, Source
from .systems import BENCH_DIR, Launch, Supervised, System

CUTOVERS = ("steered", "shared")
SLOW_START = BENCH_DIR / "slow_start.py"
RAMP = "2s"  # the --ramp of the ramped rows: a few times a start-up here


@dataclass(frozen=True)
class Row:
    """One line of the table. `cutover` is free text for the report ("steered", "shared", "-" when the server
    binds the port itself), so a variant such as a ramp is one more row, not a new column."""

    key: str
    server: str
    startup: str
    cutover: str
    make: Callable[[], System]
    beside: Beside | None = None  # control windows: the same start-up run beside the server, with no upgrade


def rows(cfg: Config, source: Source) -> list[Row]:
    """The rows of this run, steered and shared next to each other for every server and start-up."""
    servers = source.root / "examples" / "servers"
    launches = [(f"app-{kind}", f"{kind}:{cfg.startup:g}", "notify",
                 Launch(f"app {kind}:{cfg.startup:g}", (PYTHON, str(SLOW_START), f"{kind}:{cfg.startup:g}", "--",
                                                        PYTHON, str(source.app))))
                for kind in ("io", "cpu")]
    launches += [
        ("uvicorn", "-", "http", Launch("uvicorn", (PYTHON, "-m", "uvicorn", "--backlog", "4096", "asgi_app:app",
                                                    "--fd", "{fd}"), servers)),
        ("hypercorn", "-", "http", Launch("hypercorn", (PYTHON, "-m", "hypercorn", "--workers", "0", "--backlog", "4096",
                                                        "--bind", "fd://{fd}", "asgi_app:app"), servers)),
    ]
    found = [Row(f"{key}-{cutover}", launch.name.split()[0], startup, cutover,
                 lambda probe=probe, cutover=cutover, launch=launch: Supervised(source, probe, cfg.http_interval,
                                                                               cutover, launch),
                 Beside(launch.command, lowered=True) if key.startswith("app") and cutover == "steered" else None)
             for key, startup, probe, launch in launches for cutover in CUTOVERS]
    variants = [(1, "normal", "steered, normal priority", ("--start-priority", "normal")),  # what lowering buys
                (1, "ramp", f"steered, --ramp {RAMP}", ("--ramp", RAMP)),  # a slow start of the new share
                (2, "ramp", f"steered, --ramp {RAMP}", ("--ramp", RAMP))]
    for index, suffix, cutover, options in reversed(variants):
        if options[0] not in source.private_options:
            continue
        key, startup, probe, launch = launches[index]
        found.insert((index + 1) * len(CUTOVERS), Row(f"{key}-steered-{suffix}", launch.name.split()[0], startup,
                                                      cutover, lambda probe=probe, launch=launch, options=options:
                                                      Supervised(source, probe, cfg.http_interval, "steered", launch,
                                                                 options)))
    for kind in ("cpu",) if cfg.quick else ("io", "cpu"):
        spec = f"{kind}:{cfg.startup:g}"
        found.append(Row(f"gunicorn-usr2-{kind}", "gunicorn USR2", spec, "-",
                         lambda spec=spec: GunicornUsr2(source, cfg.gunicorn_workers, spec)))
    return found


def measure_cutover(cfg: Config, source: Source) -> dict[str, Any]:
    """Run every row (new connection per request, the zero-loss case): its figures, and its whole run."""
    if "--cutover" not in source.private_options:
        return {"skipped": "this supervise has no --cutover"}
    table: list[dict[str, Any]] = []
    runs: dict[str, dict[str, Any]] = {}
    for row in rows(cfg, source):
        run = measure(row.make(), cfg, keepalive=False, control=row.beside or False)
        runs[row.key] = run
        table.append({"key": row.key, "server": row.server, "startup": row.startup, "cutover": row.cutover,
                      **figures(run)})
    return {"rows": table, "runs": runs}


def figures(run: dict[str, Any]) -> dict[str, Any]:
    """What the table shows of a run (whole-run failures: a request lost just after a window counts too)."""
    total, steady, during = run["total"], run["steady"], run["during"]
    return {"requests": total["requests"], "failed": total["failed"], "errors": total["errors"],
            "failed_upgrading": during["failed"], "p99_steady_ms": steady["p99_ms"], "p99_upgrading_ms": during["p99_ms"],
            "p99_ratio": divided(during["p99_ms"], steady["p99_ms"]), "longest_gap_ms": during["longest_gap_ms"],
            "old_gone_median_s": run["upgrade_s"]["median"], "old_gone_max_s": run["upgrade_s"]["max"],
            "upgrades": len(run["upgrades"]), "verdicts": run["verdicts"],
            "p99_beside_ms": run.get("control", {}).get("p99_ms"),
            "p99_beside_ratio": divided(run.get("control", {}).get("p99_ms"), steady["p99_ms"])}


def print_cutover(section: dict[str, Any], cfg: dict[str, Any]) -> None:
    """The side-by-side table."""
    print(f"\n6. Cutover: steered vs shared (K={cfg['upgrades']} upgrades per row, C={cfg['concurrency']} clients, "
          "new connection per request, --watch 0)")
    if "skipped" in section:
        print(f"  skipped: {section['skipped']}")
        return
    width = max(len(row["cutover"]) for row in section["rows"])
    print(f"  {'server':<14} {'start-up':<8} {'cutover':<{width}} {'requests':>8} {'failed':>6} {'p99 st ms':>9} "
          f"{'p99 up ms':>9} {'up/st':>6} {'bs/st':>6} {'gap ms':>8} {'→gone s':>8}  failures by kind")
    for row in section["rows"]:
        print(f"  {row['server']:<14} {row['startup']:<8} {row['cutover']:<{width}} {row['requests']:>8} "
              f"{row['failed']:>6} "
              f"{fmt(row['p99_steady_ms'], 2):>9} {fmt(row['p99_upgrading_ms'], 2):>9} {fmt(row['p99_ratio'], 2):>6} "
              f"{fmt(row.get('p99_beside_ratio'), 2):>6} "
              f"{fmt(row['longest_gap_ms'], 1):>8} {fmt(row['old_gone_median_s'], 2):>8}  {errors_text(row['errors'])}"
              + ("" if set(row["verdicts"]) <= {"promoted", "re-executed"} else f"  verdicts {row['verdicts']}"))
    print("  start-up: io:S sleeps S s, cpu:S burns S s of CPU before the server starts (benchmarks/slow_start.py);\n"
          "  up/st = p99 upgrading / p99 steady; bs/st = p99 while the same start-up runs beside the server with no\n"
          "  upgrade at all (standalone on another port, its autogroup at nice 19 as supervise lowers a passive\n"
          "  generation): what this host charges for a start-up; gap = longest time inside the upgrade windows with\n"
          "  no successful request; →gone = signal (SIGHUP; gunicorn: USR2) → old generation gone, median.\n"
          "  supervise: app with --ready notify, uvicorn and hypercorn with the default /readyz probe,\n"
          "  --drain-delay at its default; gunicorn: --preload, so the start-up runs once per master, while the old\n"
          "  workers serve. 'normal priority': --start-priority normal, the start-up not lowered while passive (the\n"
          "  default lowers it); '--ramp 2s': the new generation's share of new connections grows over 2 s.")


def cutover_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Steered rows: 0 failed requests, and p99 upgrading ≤ 1.1 × steady (the issue's target, with and without
    --ramp; the normal-priority row is a comparison, not a configuration we recommend)."""
    steered = [row for row in section.get("rows", []) if row["cutover"].startswith("steered")
               and "normal priority" not in row["cutover"]]
    if not steered:
        return []
    failed = sum(row["failed"] for row in steered)
    targets = [{"name": f"steered cutover: 0 failed requests ({', '.join(row['key'] for row in steered)})",
                "ok": failed == 0, "measured": failed}]
    for row in steered:
        shared = next((r for r in section["rows"] if r["key"] == row["key"].split("-steered")[0] + "-shared"), None)
        targets.append({"name": f"steered cutover: p99 upgrading ≤ 1.1 × steady — {row['key']}",
                        "ok": row["p99_ratio"] is not None and row["p99_ratio"] <= 1.1,
                        "measured": f"×{row['p99_ratio']}" + (f" (shared: ×{shared['p99_ratio']})" if shared else "")})
    return targets
