"""The GPU exporter's scrape and sample times with 8 fake GPUs.

Eight `FakeNvml` GPUs with every field supported, 4 compute processes each and a few XID counts
(the largest output a real 8-GPU inference host gives: 8 x ~40 series plus processes). Measured:

* sample: one `Sampler.run_once()` over all 8 GPUs (the exporter's own work per cycle; the fake
  answers at once, so a real driver's call time comes on top: NVML calls take microseconds to
  milliseconds each, ~35 per GPU);
* scrape: `generate_latest(registry)`, the whole exposition text a scrape returns (collector,
  process metrics, encoding), and a full HTTP GET of /metrics on loopback;
* scrape while the sampler is stuck in a driver call that never returns: the same, to show a
  hung NVML call does not reach Prometheus.

    .venv/bin/python benchmarks/bench_exporter.py [--scrapes 1000]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pynvml
from prometheus_client import generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpufleet.exporter.fake import MIB, FakeNvml, FakeProcess, make_gpus
from gpufleet.exporter.nvml import Nvml
from gpufleet.exporter.service import Exporter
from tests.integration.gateway_harness import percentile

GPUS = 8
PROCESSES = 4


def busy_fleet() -> FakeNvml:
    gpus = make_gpus(GPUS, utilization=93, memory_utilization=61, memory_used=22_000 * MIB, temperature=74,
                     fan_speed=68, power_mw=398_000, energy_mj=123_456_789, sm_clock=2520, memory_clock=10501,
                     pstate=2, clock_events=pynvml.nvmlClocksEventReasonSwPowerCap, pcie_generation=4)
    for i, gpu in enumerate(gpus):
        gpu.processes = [FakeProcess(10_000 + 10 * i + p, 5_000 * MIB, f"worker{p}") for p in range(PROCESSES)]
    return FakeNvml(gpus)


def timed(fn: Callable[[], object], count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return times


def show(what: str, times_ms: list[float]) -> None:
    print(f"  {what:34} p50 {percentile(times_ms, 50):7.3f} ms  p99 {percentile(times_ms, 99):7.3f} ms  "
          f"max {max(times_ms):7.3f} ms  (n={len(times_ms)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    logging.getLogger("gpufleet.exporter").setLevel(logging.ERROR)  # the XIDs below are not news
    print(f"machine: {os.uname().machine}, {os.cpu_count()} CPUs, CPython {sys.version.split()[0]}")

    fake = busy_fleet()
    exporter = Exporter(Nvml(fake), interval=3600, process_name=fake.process_name, xid_wait_ms=50)
    sampler = exporter.sampler
    sampler.run_once()
    exporter.watcher.run_once()
    for gpu, xid in ((0, 79), (3, 48), (3, 48), (5, 13)):
        fake.emit_xid(gpu, xid)
        exporter.watcher.run_once()
    text = generate_latest(exporter.registry)
    gpu_lines = sum(1 for line in text.decode().splitlines() if line.startswith("gpufleet_gpu_"))
    print(f"{GPUS} GPUs x {PROCESSES} processes: {len(text):,} bytes a scrape, {gpu_lines} gpufleet_gpu_* series")

    calls_before = sum(fake.calls.values())
    sample_ms = timed(sampler.run_once, args.samples)
    calls = (sum(fake.calls.values()) - calls_before) / args.samples
    show(f"sample (8 GPUs, {calls:.0f} NVML calls)", sample_ms)

    scrape_ms = timed(lambda: generate_latest(exporter.registry), args.scrapes)
    show("scrape: generate_latest", scrape_ms)

    port = exporter.listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}/metrics"

    def get() -> None:
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()

    http_ms = timed(get, args.scrapes)
    show("scrape: HTTP GET /metrics", http_ms)

    fake.hold("nvmlDeviceGetUtilizationRates")
    stuck = threading.Thread(target=sampler.run_once, daemon=True)
    stuck.start()
    time.sleep(0.05)
    hung_ms = timed(get, args.scrapes)
    show("scrape: HTTP, sampler hung in NVML", hung_ms)
    fake.release("nvmlDeviceGetUtilizationRates")
    stuck.join(5)
    exporter.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
