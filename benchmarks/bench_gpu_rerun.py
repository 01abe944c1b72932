"""A converged GPU fleet's no-change run of deploy/gpu.py: wall time on 1 host and on 4 hosts.

pyinfra runs the hosts in parallel, so the 4-host time over the 1-host time shows how much of
a run is per-host work done side by side (ratio near 1) and how much is serialised (near 4).
The hosts are test bed containers (gpufleet/testbed/hosts.py) with the stand-in mirror; they are
converged once, then each no-change run is timed `--repeat` times (the median is reported).

    .venv/bin/python benchmarks/bench_gpu_rerun.py [--hosts 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from gpufleet.paths import REPO_ROOT
from gpufleet.testbed import hosts as testbed
from gpufleet.testbed.bed import prepare_mirror

PYINFRA = str(Path(sys.executable).parent / "pyinfra")


def write_inventory(root: Path, names: list[str]) -> Path:
    shutil.copytree(REPO_ROOT / "inventories" / "local", root)
    lines = ["all:", "  vars:", "    ansible_connection: docker", "  children:", "    gpu:", "      hosts:"]
    lines += [f"        {name}: {{ansible_host: {testbed.container_name(name)}}}" for name in names]
    (root / "hosts.yml").write_text("\n".join(lines) + "\n")
    return root / "inventory.py"


def run(inventory: Path, *extra: str) -> tuple[float, str]:
    started = time.monotonic()
    proc = subprocess.run([PYINFRA, "-y", *extra, str(inventory), "deploy/gpu.py"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=1800, check=False)
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"pyinfra failed (exit {proc.returncode}):\n{output[-4000:]}")
    return elapsed, output


def totals(output: str) -> tuple[int, int]:
    """(operations run over all hosts, operations that changed something), from pyinfra's results table."""
    match = re.search(r"Grand total\s+(\S+)\s+(\S+)", output)
    if match is None:
        raise SystemExit(f"no results table in pyinfra's output:\n{output[-2000:]}")
    return tuple(0 if cell == "-" else int(cell) for cell in match.groups())  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpufleet-bench-"))
    try:
        mirror = prepare_mirror(work / "mirror")
        tag = uuid.uuid4().hex[:6]
        names = [f"bench-{tag}-{i}" for i in range(1, args.hosts + 1)]
        with testbed.testbed_hosts(names, mirror_dir=mirror):
            inventory = write_inventory(work / "local", names)
            single = write_inventory(work / "single", names[:1])  # the same first host, alone
            converge_s, _ = run(inventory)
            one, many = [], []
            for _ in range(args.repeat):
                elapsed, output = run(single)
                ran, changed = totals(output)
                assert ran > 0 and changed == 0, f"the 1-host run: {ran} operations, {changed} changed"
                one.append(elapsed)
                elapsed, output = run(inventory)
                ran, changed = totals(output)
                assert ran > 0 and changed == 0, f"the {args.hosts}-host run: {ran} operations, {changed} changed"
                many.append(elapsed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, CPython {platform.python_version()}")
    print(f"first converge of {args.hosts} fresh hosts: {converge_s:.1f} s")
    print(f"no-change run, 1 host:  median {statistics.median(one):.1f} s  "
          f"(runs: {', '.join(f'{t:.1f}' for t in one)})")
    print(f"no-change run, {args.hosts} hosts: median {statistics.median(many):.1f} s  "
          f"(runs: {', '.join(f'{t:.1f}' for t in many)})")
    print(f"ratio {args.hosts} hosts / 1 host: {statistics.median(many) / statistics.median(one):.2f}")


if __name__ == "__main__":
    main()
