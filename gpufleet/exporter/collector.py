"""The prometheus_client Collector: metric families built from the sampler's latest snapshot.

A scrape reads one immutable snapshot and the XID counts; it never calls NVML, so it answers in
about a millisecond even while a driver call hangs. Families are built fresh on every scrape, so a
process that exits or a GPU that disappears leaves no stale series behind.

Rules (docs/exporter.md):
* `gpufleet_gpu_up` is 1 only for a GPU that answered in a fresh sample; while it is 0 (GPU lost,
  NVML down, or the sample older than 3 intervals because the sampler is stuck) the GPU keeps its
  `gpufleet_gpu_info` and XID series, and every other series of it is omitted;
* before the first sample completes, no GPU series and no `nvml_up` are exposed (unknown, not 0);
* a field the GPU cannot give was never put in the snapshot: its series is absent, never -1 or 0.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gpufleet import __version__
from gpufleet.exporter import metrics as m
from gpufleet.exporter.events import XidWatcher
from gpufleet.exporter.sampler import Sampler

Mode = Literal["nvml", "simulate"]


class GpuCollector(Collector):
    def __init__(
        self,
        sampler: Sampler,
        watcher: XidWatcher | None = None,
        *,
        mode: Mode = "nvml",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.sampler = sampler
        self.watcher = watcher
        self.mode = mode
        self.clock = clock or sampler.clock
        self._scrapes = 0
        self._lock = threading.Lock()
        self._label_names = {
            d.name: (m.GPU_LABELS + d.labels if d.per_gpu else d.labels) for d in m.ALL_METRICS
        }

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to describe up front: registering must not trigger a collection

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        with self._lock:
            self._scrapes += 1
            scrapes = self._scrapes
        families: dict[str, Metric] = {}

        def add(metric: m.MetricDef, values: Sequence[str], value: float) -> None:
            family = families.get(metric.name)
            if family is None:
                family = families[metric.name] = Metric(metric.family, metric.help, metric.kind)
            # an empty value is an absent label to Prometheus: leave it out of the text as well
            labels = {k: v for k, v in zip(self._label_names[metric.name], values, strict=True) if v}
            family.add_sample(metric.name, labels, value)

        snapshot = self.sampler.snapshot
        now = self.clock()
        add(m.EXPORTER_INFO, (__version__, self.mode), 1)
        if snapshot is not None:
            age = now - snapshot.taken_monotonic
            nvml_up = snapshot.nvml_up and age <= self.sampler.stale_after
            add(m.NVML_UP, (), 1 if nvml_up else 0)
            for gpu in snapshot.gpus:
                labels = gpu.identity.labels
                up = nvml_up and gpu.up
                add(m.UP, labels, 1 if up else 0)
                add(m.INFO, (*labels, gpu.identity.pci_bus_id), 1)
                if up:
                    for metric, extra, value in gpu.series:
                        add(metric, labels + extra, value)
            if nvml_up and snapshot.versions is not None:
                v = snapshot.versions
                add(m.DRIVER_INFO, (v.driver, v.cuda_driver, v.nvml), 1)
            add(m.SAMPLE_DURATION, (), snapshot.duration_s)
            add(m.SAMPLE_AGE, (), max(0.0, age))
            add(m.LAST_SAMPLE, (), snapshot.taken_at)
        add(m.SAMPLES, (), self.sampler.samples_total)
        for (kind, error), count in self.sampler.errors.items():
            add(m.ERRORS, (kind, error), count)
        if self.watcher is not None:
            add(m.XID_WATCH_UP, (), 1 if self.watcher.up else 0)
            for xid in self.watcher.counts():
                labels = (*xid.identity.labels, str(xid.xid))
                add(m.XID_ERRORS, labels, xid.count)
                add(m.XID_LAST_SEEN, labels, xid.last_seen)
        add(m.SCRAPES, (), scrapes)
        add(m.SCRAPE_DURATION, (), time.perf_counter() - started)
        for metric in m.ALL_METRICS:
            family = families.get(metric.name)
            if family is not None:
                yield family


def build_registry(collector: GpuCollector, *, process_metrics: bool = True) -> CollectorRegistry:
    """A registry with the GPU collector and (by default) the exporter's own process and platform metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry
