"""Helpers for the exporter's unit tests: a settable clock, an exporter over a FakeNvml, and a parsed scrape."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.exporter.collector import GpuCollector, build_registry
from gpufleet.exporter.events import XidWatcher
from gpufleet.exporter.fake import FakeNvml
from gpufleet.exporter.nvml import Nvml
from gpufleet.exporter.sampler import ErrorCounts, Sampler


class Clock:
    """A clock the test moves: `clock()` reads it, `clock.now += 5` moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Scrape:
    """One scrape's samples by (sample name, labels), and the family types, from prometheus_client's parser."""

    text: str
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for family in text_string_to_metric_families(self.text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def find(self, metric: str, /, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of `metric` whose labels include `labels`."""
        wanted = set(labels.items())
        return [(dict(lbl), v) for (n, lbl), v in self.samples.items() if n == metric and wanted <= lbl]

    def value(self, metric: str, /, **labels: str) -> float:
        found = self.find(metric, **labels)
        assert len(found) == 1, f"{len(found)} samples of {metric}{labels}:\n{self.text}"
        return found[0][1]

    def has(self, metric: str, /, **labels: str) -> bool:
        return bool(self.find(metric, **labels))

    def names(self) -> set[str]:
        return {n for n, _ in self.samples}


class Rig:
    """Sampler, XID watcher and collector over one FakeNvml, driven by hand (no threads unless started)."""

    def __init__(self, fake: FakeNvml | int = 2, *, interval: float = 5.0, xid_wait_ms: int = 10) -> None:
        self.fake = fake if isinstance(fake, FakeNvml) else FakeNvml(fake)
        self.clock = Clock()
        self.wall = Clock(1_800_000_000.0)
        self.nvml = Nvml(self.fake)
        self.errors = ErrorCounts()
        self.sampler = Sampler(self.nvml, interval=interval, errors=self.errors, clock=self.clock,
                               wall_clock=self.wall, process_name=self.fake.process_name)
        self.watcher = XidWatcher(self.nvml, errors=self.errors, wait_ms=xid_wait_ms, wall_clock=self.wall)
        self.collector = GpuCollector(self.sampler, self.watcher)
        self.registry = build_registry(self.collector, process_metrics=False)

    def sample(self) -> float:
        return self.sampler.run_once()

    def scrape(self) -> Scrape:
        return Scrape(generate_latest(self.registry).decode())
