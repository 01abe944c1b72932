"""How long validating and planning a fleet takes before pyinfra contacts any host.

Principle 2 puts `load_fleet` (read every YAML file, merge, validate, plan every GPU host) in
front of every deploy, so it must stay fast for large fleets. This writes synthetic inventories
of the example fleet's shape (GPU hosts in racks of 8 as child groups, a host_vars file for every
tenth host) and times `load_fleet` on them.

    .venv/bin/python benchmarks/bench_inventory.py [--hosts 10,100,1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from gpufleet.fleet import load_fleet

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "inventories" / "example"


def write_fleet(root: Path, gpu_hosts: int) -> None:
    shutil.copytree(EXAMPLE / "group_vars", root / "group_vars")
    (root / "host_vars").mkdir()
    racks: dict[str, list[str]] = {}
    for i in range(gpu_hosts):
        racks.setdefault(f"rack_{i // 8:03d}", []).append(f"gpu-{i:04d}")
        if i % 10 == 0:
            (root / "host_vars" / f"gpu-{i:04d}.yml").write_text("engine:\n  port: 8100\n")
    lines = ["all:", "  children:", "    gpu:", "      children:"]
    for rack, hosts in racks.items():
        lines += [f"        {rack}:", "          hosts:"]
        for host in hosts:
            lines.append(f"            {host}: {{ansible_host: {host}.fleet.example}}")  # never contacted
    lines += ["    gateway:", "      hosts:", "        gw-01: {ansible_host: 192.0.2.10}",
              "    monitoring:", "      hosts:", "        mon-01: {ansible_host: 192.0.2.20}"]
    (root / "hosts.yml").write_text("\n".join(lines) + "\n")
    (root / "secrets").mkdir()
    keys = root / "secrets" / "api_keys"
    keys.write_text("bench sk-gf-0123456789abcdefghijklmnopqrstuvwxyz\n")
    keys.chmod(0o600)


def measure(gpu_hosts: int, repeat: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_fleet(root, gpu_hosts)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fleet = load_fleet(root)
            times.append(time.perf_counter() - start)
        assert len(fleet.in_group("gpu")) == gpu_hosts
        tracemalloc.start()
        load_fleet(root)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return statistics.median(times), min(times), peak / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="10,100,1000", help="GPU host counts, comma-separated")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.system()}")
    print(f"{'GPU hosts':>10} {'median s':>10} {'min s':>10} {'ms/host':>9} {'peak MB':>9}")
    for count in (int(c) for c in args.hosts.split(",")):
        median, best, peak = measure(count, args.repeat)
        print(f"{count:>10} {median:>10.3f} {best:>10.3f} {median / count * 1000:>9.2f} {peak:>9.1f}")


if __name__ == "__main__":
    main()
