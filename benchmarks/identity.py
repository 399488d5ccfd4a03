#!/usr/bin/env python3
"""What release identity adds to every upgrade: the time to identify a release by the size of its directory.

    python benchmarks/identity.py [--sizes 100,1000,10000,100000] [--runs 5] [--json out.json]

For each size a temporary working directory holds that many small files (in directories of 1,000) beside a
release script; the release is identified as an upgrade does it (supervisor.identity.identify: content of the
executable and of files named in argv, bounded metadata walk of the tree and of the executable's directory).
Reported per size: median and worst time of `--runs` identifications (after one warm-up, so the page cache is
as warm as on a host that deploys there), entries walked, and whether the identity is known or "unknown"
(past the bound of 20,000 entries or 0.2 s, where nothing is ever refused). Each upgrade identifies the new
release once, before anything starts; that time is what it adds. Only files under the temporary directory
are written; they are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from supervisor.identity import identify  # noqa: E402
from supervisor.release import resolve  # noqa: E402

PER_DIRECTORY = 1000


def build_tree(root: Path, files: int) -> None:
    """`files` empty files in directories of PER_DIRECTORY, and an executable release script."""
    for number in range(files):
        directory = root / "data" / f"d{number // PER_DIRECTORY}"
        if number % PER_DIRECTORY == 0:
            directory.mkdir(parents=True)
        os.close(os.open(directory / f"f{number}", os.O_CREAT | os.O_WRONLY, 0o644))
    script = root / "run"
    script.write_text("#!/bin/sh\nexec sleep 1\n")
    script.chmod(0o755)


def measure(files: int, runs: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="supervise-identity-"))
    try:
        build_tree(root, files)
        release = resolve(["./run", "settings.json"], str(root), (), os.environ.get("PATH"))
        identify(release)  # warm-up
        times, identity = [], None
        for _ in range(runs):
            began = time.perf_counter()
            identity = identify(release)
            times.append(time.perf_counter() - began)
        assert identity is not None
        return {"files": files, "median_ms": round(statistics.median(times) * 1000, 2),
                "max_ms": round(max(times) * 1000, 2), "known": identity.known, "covers": identity.covers}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000,100000", help="comma-separated file counts")
    parser.add_argument("--runs", type=int, default=5, help="identifications per size (after one warm-up)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    try:
        sizes = [int(size) for size in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes: comma-separated whole numbers, like 100,1000")
    if not 1 <= args.runs <= 100 or any(not 0 <= size <= 1_000_000 for size in sizes):
        parser.error("--runs must be 1-100 and every size 0-1,000,000")
    results = [measure(size, args.runs) for size in sizes]
    print(f"{'files':>8} {'median ms':>10} {'max ms':>8}  identity")
    for result in results:
        print(f"{result['files']:>8} {result['median_ms']:>10} {result['max_ms']:>8}  "
              f"{result['covers']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
