"""The load generator's own CPU: each process samples itself without blocking, a single process keeps its
samples, a worker sends them to the master in batches, and the master rebuilds them for the gate."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from gpufleet.loadtest import collect, cpu
from gpufleet.loadtest.gate import CpuSample

pytestmark = pytest.mark.unit


class FakeProcess:
    """A psutil.Process whose cpu_percent readings are scripted; it records the intervals asked for."""

    def __init__(self, readings: Iterable[float]) -> None:
        self.readings = iter(readings)
        self.intervals: list[float | None] = []

    def cpu_percent(self, interval: float | None = None) -> float:
        self.intervals.append(interval)
        return next(self.readings)


def ticking(*times: float) -> Callable[[], float]:
    values = iter(times)
    return lambda: next(values)


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Environment:
    """What collect.attach reads of a Locust Environment (a plain class: collectors are keyed weakly)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner


class MasterRunner:
    def __init__(self) -> None:
        self.handlers: dict[str, Callable[..., None]] = {}

    def register_message(self, name: str, handler: Callable[..., None]) -> None:
        self.handlers[name] = handler

    def deliver(self, name: str, data: Any) -> None:
        """A worker's message as the master's runner hands it over, after Locust's msgpack wire."""
        self.handlers[name](environment=None, msg=SimpleNamespace(data=msgpack.unpackb(msgpack.packb(data))))


def test_a_single_process_keeps_its_samples_and_the_first_reading_is_discarded() -> None:
    kept = cpu.collector(collect.LOCAL)
    process = FakeProcess([0.0, 35.0, 97.5])  # psutil's first call only starts the interval: it reads 0
    sampler = cpu.CpuSampler(kept, "local", process=process, clock=ticking(1000.0, 1001.0))
    first, second = sampler.sample(), sampler.sample()
    assert first == CpuSample(epoch=1000.0, percent=35.0, worker="local")
    assert second == CpuSample(epoch=1001.0, percent=97.5, worker="local")
    assert kept.records == [first, second]
    assert process.intervals == [None, None, None]  # never a blocking interval: Locust's loop keeps running


def test_a_worker_sends_its_samples_about_once_a_second_and_the_master_rebuilds_them() -> None:
    sent: list[tuple[str, Any]] = []
    monotonic = Clock(0.0)
    worker = collect.Collector(collect.WORKER, lambda name, data: sent.append((name, data)), clock=monotonic,
                               message=cpu.MESSAGE, encode=cpu.encode, decode=cpu.decode)
    sampler = cpu.CpuSampler(worker, "worker-a", process=FakeProcess([0.0, 50.0, 75.0, 80.0]),
                             clock=ticking(2000.0, 2001.0, 2002.0))
    monotonic.now = 0.5
    first = sampler.sample()
    assert sent == [] and worker.records == []  # batched, and a worker keeps nothing itself
    monotonic.now = 1.0
    second = sampler.sample()
    assert [name for name, _ in sent] == ["gpufleet_cpu"]
    monotonic.now = 1.5
    third = sampler.sample()
    assert len(sent) == 1  # the next batch waits for its second
    worker.flush()  # the test stops
    assert [len(batch) for _, batch in sent] == [2, 1]

    runner = MasterRunner()
    master = collect.attach(Environment(runner), cpu.collector(collect.MASTER))
    for name, data in sent:
        runner.deliver(name, data)
    assert master.records == [first, second, third]
    assert master.records[0] == CpuSample(epoch=2000.0, percent=50.0, worker="worker-a")


def test_the_master_gathers_every_workers_samples_for_the_gate() -> None:
    runner = MasterRunner()
    environment = Environment(runner)
    collect.attach(environment, cpu.collector(collect.MASTER))
    assert list(runner.handlers) == [cpu.MESSAGE]
    for name, epoch in (("worker-a", 10.0), ("worker-b", 10.2)):
        outbox: list[tuple[str, Any]] = []
        worker = cpu.collector(collect.WORKER, lambda message, data, outbox=outbox: outbox.append((message, data)))
        worker.add(CpuSample(epoch, 90.0, name))
        worker.flush()
        runner.deliver(*outbox[0])
    assert cpu.collected_samples(environment) == [CpuSample(10.0, 90.0, "worker-a"), CpuSample(10.2, 90.0, "worker-b")]


def test_a_worker_holds_no_samples_for_the_gate() -> None:
    environment = Environment(SimpleNamespace())
    worker = collect.attach(environment, cpu.collector(collect.WORKER, lambda message, data: None))
    worker.add(CpuSample(1.0, 20.0, "w"))
    assert cpu.collected_samples(environment) == []
    assert cpu.collected_samples(Environment(SimpleNamespace())) == []  # never attached


def test_a_worker_needs_a_way_to_send() -> None:
    with pytest.raises(ValueError, match="a worker needs `send`"):
        cpu.collector(collect.WORKER)


@pytest.mark.parametrize("sample", [CpuSample(1_700_000_000.25, 12.5, "worker-3"), CpuSample(0.0, 0.0, ""),
                                    CpuSample(1.0, 400.0, "local")])
def test_samples_survive_the_wire(sample: CpuSample) -> None:
    assert cpu.decode(msgpack.unpackb(msgpack.packb(cpu.encode(sample)))) == sample
