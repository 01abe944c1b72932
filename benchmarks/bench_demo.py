"""`make demo` cold and warm: wall time of the whole chain and of each of its steps.

Cold: after `make demo-down` (no test bed hosts, images or image cache; the apt packages, the
virtualenv and the Docker daemon stay, as `make demo-down` leaves them), so the run debootstraps
the base image, builds the host, simulator and check images, starts and provisions every host
from nothing, and runs the ramp. Warm: `make demo` again right after, as a user re-running it does
(cached images, the running hosts reused, a site run that changes nothing). The targets: cold under
15 minutes and warm under 3 on 2 cores (issue 8).

The step times come from each run's demo.json (gpufleet/demo/run.py); the total is `make demo`'s
wall time, set-up (scripts/bootstrap.sh) included.

    .venv/bin/python benchmarks/bench_demo.py [--warm-only] [--keep]

It removes whatever test bed `inventories/local` has, and (without --warm-only) the images: do
not run it while tests use them. --keep leaves the test bed up at the end (else: demo-down).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from gpufleet.demo.progress import clock
from gpufleet.paths import REPO_ROOT

REPORTS = REPO_ROOT / "reports"


def make(target: str) -> tuple[float, int]:
    """Run `make TARGET` with its output passing through; (wall seconds, exit code)."""
    started = time.monotonic()
    code = subprocess.run(["make", "--no-print-directory", target], cwd=REPO_ROOT, check=False).returncode
    return time.monotonic() - started, code


def newest_run(after: float) -> dict:
    runs = [p for p in REPORTS.glob("demo-*/demo.json") if p.stat().st_mtime >= after]
    if not runs:
        raise SystemExit("bench_demo: make demo wrote no demo.json; see its output above")
    return json.loads(max(runs, key=lambda p: p.stat().st_mtime).read_text())


def timed_demo() -> tuple[float, int, dict]:
    mark = time.time() - 1
    seconds, code = make("demo")
    return seconds, code, newest_run(mark)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-only", action="store_true", help="skip the cold run (keeps the images)")
    parser.add_argument("--keep", action="store_true", help="leave the test bed up afterwards")
    args = parser.parse_args()
    runs: list[tuple[str, float, int, dict]] = []
    if not args.warm_only:
        make("demo-down")
        runs.append(("cold", *timed_demo()))
    else:
        timed_demo()  # whatever state the machine is in: this run makes the next one warm
    runs.append(("warm", *timed_demo()))
    if not args.keep:
        make("demo-down" if not args.warm_only else "testbed-down")

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, CPython {platform.python_version()}, "
          f"{platform.system()}")
    titles = ["images", "hosts", "site.py", "ramp"]
    print(f"{'run':<6}" + "".join(f"{t:>10}" for t in titles) + f"{'make demo':>12}  verdict")
    failed = False
    for name, seconds, code, run in runs:
        steps = [clock(step["seconds"]) for step in run["steps"]]
        steps += ["-"] * (len(titles) - len(steps))
        verdict = run.get("verdict") or {}
        print(f"{name:<6}" + "".join(f"{s:>10}" for s in steps) + f"{clock(seconds):>12}  "
              f"{verdict.get('status', 'no verdict')} (exit {code}) {verdict.get('headline', '')}")
        failed |= code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
