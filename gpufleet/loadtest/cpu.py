"""The load generator's own CPU, sampled in every Locust process, for the gate's saturation check.

A load generator whose CPU is saturated stamps tokens late and reports the delay as the server's
latency; the gate (gate.py) makes such a step invalid rather than failed. Locust samples its own
CPU only every 10 s, too coarse for steps of a minute, so each process that runs users samples
itself once a second (`psutil.Process.cpu_percent`, the share of one CPU since the last sample:
the same measure as Locust's). Workers send their samples to the master with the records'
batching (collect.Collector under its own message); the master and a single process keep them.

No Locust import: locust_gate.py wires it to the runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psutil

from gpufleet.loadtest import collect
from gpufleet.loadtest.collect import Collector
from gpufleet.loadtest.gate import CpuSample

MESSAGE = "gpufleet_cpu"
SAMPLE_INTERVAL_S = 1.0

def encode(sample: CpuSample) -> list[Any]:
    return [sample.epoch, sample.percent, sample.worker]


def decode(item: Any) -> CpuSample:
    epoch, percent, worker = item
    return CpuSample(epoch=float(epoch), percent=float(percent), worker=str(worker))


def collector(role: str, send: Callable[[str, Any], None] | None = None) -> Collector[CpuSample]:
    return Collector(role, send, message=MESSAGE, encode=encode, decode=decode)


def collector_of(environment: Any) -> Collector[CpuSample] | None:
    return collect.collector_of(environment, MESSAGE)


def collected_samples(environment: Any) -> list[CpuSample]:
    """Every CPU sample of the run so far (the master's: all workers'); empty on a worker."""
    return collect.collected(environment, MESSAGE)


class CpuSampler:
    """Samples one process's CPU into a collector; `sample()` is called about once a second."""

    def __init__(self, kept: Collector[CpuSample], worker: str, process: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.collector = kept
        self.worker = worker
        self.process = process or psutil.Process()
        self.clock = clock
        self.process.cpu_percent(None)  # the first call only starts the interval

    def sample(self) -> CpuSample:
        reading = CpuSample(epoch=self.clock(), percent=float(self.process.cpu_percent(None)), worker=self.worker)
        self.collector.add(reading)
        self.collector.flush_due()
        return reading
