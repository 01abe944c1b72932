"""The NVML sampler: a background thread that reads every GPU each interval into an immutable snapshot.

A scrape only reads the latest `Snapshot` (see collector.py); it never calls NVML, so a driver call
that hangs can stall this thread but never Prometheus, and the snapshot's age shows the stall.

Errors are handled at three levels (`nvml.classify`):

* field (NotSupported, NoPermission, FunctionNotFound, ...): that reading's series are omitted for
  that GPU (logged once), never replaced by a sentinel value;
* device (GpuIsLost, GpuNotFound, ResetRequired, Unknown, ... from a per-GPU call): that GPU is
  reported `up` 0 with the identity it last had, its other series omitted, the others still report;
  its handle is fetched again next cycle;
* library (Uninitialized, DriverNotLoaded, LibRmVersionMismatch, LibraryNotFound, or any error from
  nvmlInit, the device count or the driver version): NVML is shut down and initialised again after
  1, 2, 4, ... up to 60 s; meanwhile `nvml_up` is 0 and every GPU last seen is `up` 0.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pynvml
from pynvml import NVMLError

from gpufleet.exporter import metrics as m
from gpufleet.exporter.nvml import CLOCK_EVENT_BITS, ECC_COUNTERS, ECC_ERROR_TYPES, Nvml, classify, error_name

log = logging.getLogger("gpufleet.exporter")

DEFAULT_INTERVAL_S = 5.0
BACKOFF_INITIAL_S = 1.0
BACKOFF_CAP_S = 60.0
STALE_AFTER_INTERVALS = 3  # a sample older than this many intervals is stale: the sampler is stuck

Series = tuple[m.MetricDef, tuple[str, ...], float]  # metric, its extra label values, value
Reading = Callable[[Any], Iterator[Series]]


@dataclass(frozen=True)
class GpuIdentity:
    index: int
    uuid: str = ""  # empty (the label is absent) for a GPU lost before it could be identified
    name: str = ""
    pci_bus_id: str = ""

    @property
    def labels(self) -> tuple[str, str, str]:
        """Values of (gpu, uuid, name); a negative index (a device never enumerated) leaves `gpu` empty."""
        return str(self.index) if self.index >= 0 else "", self.uuid, self.name


@dataclass(frozen=True)
class GpuSample:
    identity: GpuIdentity
    up: bool
    series: tuple[Series, ...] = ()


@dataclass(frozen=True)
class Versions:
    driver: str
    cuda_driver: str = ""  # empty where NVML does not say
    nvml: str = ""


@dataclass(frozen=True)
class Snapshot:
    """One sampling cycle's result. Immutable: the collector may read it while the next is taken."""

    nvml_up: bool
    taken_at: float  # Unix time at the end of the cycle
    taken_monotonic: float
    duration_s: float
    gpus: tuple[GpuSample, ...]
    versions: Versions | None = None


class ErrorCounts:
    """errors_total{kind, error}, shared by the sampler and the XID watcher."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def add(self, kind: str, error: str) -> None:
        with self._lock:
            self._counts[(kind, error)] = self._counts.get((kind, error), 0) + 1

    def items(self) -> list[tuple[tuple[str, str], int]]:
        with self._lock:
            return sorted(self._counts.items())


def proc_comm(pid: int) -> str:
    """The process's command name from /proc (a host PID; empty when it is gone or in another namespace)."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return ""


class _LibraryDown(Exception):
    def __init__(self, cause: NVMLError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Sampler:
    """Samples every GPU every `interval` seconds on its own thread; `snapshot` is the latest result."""

    def __init__(
        self,
        nvml: Nvml,
        *,
        interval: float = DEFAULT_INTERVAL_S,
        errors: ErrorCounts | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        process_name: Callable[[int], str] = proc_comm,
        before_sample: Callable[[], None] | None = None,
        backoff_initial: float = BACKOFF_INITIAL_S,
        backoff_cap: float = BACKOFF_CAP_S,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.nvml = nvml
        self.interval = interval
        self.stale_after = STALE_AFTER_INTERVALS * interval
        self.errors = errors or ErrorCounts()
        self.clock = clock
        self.wall_clock = wall_clock
        self.process_name = process_name
        self.before_sample = before_sample
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.samples_total = 0
        self._snapshot: Snapshot | None = None
        self._initialised = False
        self._backoff = 0.0
        self._next_attempt = 0.0
        self._last_library_error = ""
        self._versions: Versions | None = None
        self._count = 0
        self._handles: dict[int, Any] = {}
        self._identities: dict[int, GpuIdentity] = {}
        self._supported_events: dict[int, int] = {}
        self._down: set[int] = set()
        self._omitted: set[tuple[int, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    # ---- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gpufleet-nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (an NVML call in progress cannot be interrupted: wait at most `timeout`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # stuck in the driver: leave NVML to the process exit
                log.warning("the sampler is still in an NVML call after %.0f s; exiting without it", timeout)
                return
        if self._initialised:
            self._shutdown_quietly()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.run_once()
            except Exception:  # a bug must not end sampling: log it, count it, go on
                log.exception("sampling failed")
                self.errors.add("internal", "exception")
                delay = self.interval
            self._stop.wait(delay)

    # ---- one cycle ----------------------------------------------------------------------------

    def run_once(self) -> float:
        """Take one sample (or wait out the re-initialisation backoff); return seconds until the next."""
        start = self.clock()
        if not self._initialised:
            if start < self._next_attempt:
                self._publish_down(start)
                return min(self.interval, self._next_attempt - start)
            try:
                self._initialise()
            except NVMLError as exc:
                return self._library_failed(exc, start)
        if self.before_sample is not None:
            self.before_sample()
        try:
            gpus = tuple(self._sample_gpu(index) for index in range(self._count))
        except _LibraryDown as down:
            return self._library_failed(down.cause, start)
        end = self.clock()
        self._publish(Snapshot(True, self.wall_clock(), end, end - start, gpus, self._versions))
        return max(0.0, self.interval - (end - start))

    def _initialise(self) -> None:
        self.nvml.init()
        self._initialised = True
        count = self.nvml.device_count()
        versions = Versions(self.nvml.driver_version(), self._optional(self.nvml.cuda_driver_version),
                            self._optional(self.nvml.nvml_version))
        self._count, self._versions = count, versions
        self._handles.clear()
        self._supported_events.clear()
        self._down.clear()
        if self._last_library_error:
            log.info("NVML is back after %s: driver %s, %d GPU(s)", self._last_library_error, versions.driver, count)
        else:
            log.info("NVML initialised: driver %s, CUDA %s, %d GPU(s)", versions.driver,
                     versions.cuda_driver or "?", count)
        self._backoff = 0.0
        self._last_library_error = ""

    @staticmethod
    def _optional(read: Callable[[], str]) -> str:
        try:
            return read()
        except NVMLError as exc:
            if classify(exc) != "field":
                raise
            return ""

    def _library_failed(self, exc: NVMLError, now: float) -> float:
        name = error_name(exc)
        self.errors.add("library", name)
        if self._initialised:
            self._shutdown_quietly()
        self._backoff = min(self.backoff_cap, self._backoff * 2) if self._backoff else self.backoff_initial
        self._next_attempt = now + self._backoff
        if name != self._last_library_error:
            log.warning("NVML is down (%s: %s); initialising again in %.0f s, backing off up to %.0f s",
                        name, exc, self._backoff, self.backoff_cap)
        self._last_library_error = name
        self._publish_down(now)
        return min(self.interval, self._backoff)

    def _shutdown_quietly(self) -> None:
        self._initialised = False
        self._handles.clear()
        with contextlib.suppress(NVMLError):
            self.nvml.shutdown()

    def _publish_down(self, start: float) -> None:
        gpus = tuple(GpuSample(ident, False) for _, ident in sorted(self._identities.items()))
        self._publish(Snapshot(False, self.wall_clock(), self.clock(), self.clock() - start, gpus))

    def _publish(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot  # one reference assignment: readers see the old or the new, whole
        self.samples_total += 1

    # ---- one GPU ------------------------------------------------------------------------------

    def _sample_gpu(self, index: int) -> GpuSample:
        try:
            handle = self._handles.get(index)
            if handle is None:
                handle = self.nvml.handle(index)
                self._identities[index] = self._identify(index, handle)
                self._handles[index] = handle
            series = tuple(self._read(index, handle))
        except NVMLError as exc:
            if classify(exc) == "library":
                raise _LibraryDown(exc) from exc
            return self._gpu_failed(index, exc)
        if index in self._down:
            self._down.discard(index)
            log.info("GPU %d (%s) answers again", index, self._identities[index].uuid)
        return GpuSample(self._identities[index], True, series)

    def _identify(self, index: int, handle: Any) -> GpuIdentity:
        pci = self._optional(lambda: self.nvml.pci_bus_id(handle))
        return GpuIdentity(index, self.nvml.uuid(handle), self.nvml.name(handle), pci)

    def _gpu_failed(self, index: int, exc: NVMLError) -> GpuSample:
        name = error_name(exc)
        self.errors.add("device", name)
        self._handles.pop(index, None)
        self._supported_events.pop(index, None)
        identity = self._identities.setdefault(index, GpuIdentity(index))
        if index not in self._down:
            self._down.add(index)
            log.warning("GPU %d (%s) is down: %s (%s); the other GPUs still report", index,
                        identity.uuid or "uuid unknown", name, exc)
        return GpuSample(identity, False)

    def _read(self, index: int, handle: Any) -> Iterator[Series]:
        """Every reading of one GPU; a reading the GPU cannot give is left out (logged once)."""
        for label, reading in self._readings(index):
            try:
                yield from reading(handle)
            except NVMLError as exc:
                if classify(exc) != "field":
                    raise
                if (index, label) not in self._omitted:
                    self._omitted.add((index, label))
                    log.info("GPU %d: %s unavailable (%s); its series are omitted", index, label, error_name(exc))

    def _readings(self, index: int) -> tuple[tuple[str, Reading], ...]:
        nvml = self.nvml

        def utilization(h: Any) -> Iterator[Series]:
            gpu, memory = nvml.utilization(h)
            yield m.UTILIZATION, (), gpu / 100.0
            yield m.MEMORY_UTILIZATION, (), memory / 100.0

        def memory(h: Any) -> Iterator[Series]:
            info = nvml.memory(h)
            yield m.MEMORY_USED, (), info.used
            yield m.MEMORY_FREE, (), info.free
            yield m.MEMORY_TOTAL, (), info.total
            if info.reserved is not None:
                yield m.MEMORY_RESERVED, (), info.reserved

        def pstate(h: Any) -> Iterator[Series]:
            state = nvml.performance_state(h)
            if state is not None:
                yield m.PSTATE, (), state

        def clock_events(h: Any) -> Iterator[Series]:
            active = nvml.clock_events(h)
            supported = self._supported_events.get(index)
            if supported is None:
                try:
                    supported = nvml.supported_clock_events(h)
                except NVMLError as exc:
                    if classify(exc) != "field":
                        raise
                    supported = ~0  # the mask is unknown: every reason pynvml names
                self._supported_events[index] = supported
            for bit, reason in CLOCK_EVENT_BITS:
                if supported & bit:
                    yield m.CLOCK_EVENT, (reason,), 1.0 if active & bit else 0.0

        def remapped_rows(h: Any) -> Iterator[Series]:
            corrected, uncorrected, pending, failure = nvml.remapped_rows(h)
            yield m.REMAPPED_ROWS, ("corrected",), corrected
            yield m.REMAPPED_ROWS, ("uncorrected",), uncorrected
            yield m.REMAP_PENDING, (), 1.0 if pending else 0.0
            yield m.REMAP_FAILURE, (), 1.0 if failure else 0.0

        def processes(h: Any) -> Iterator[Series]:
            found = nvml.compute_processes(h)
            yield m.PROCESSES, (), len(found)
            for proc in found:
                if proc.used_bytes is not None:  # WDDM: the driver does not say; no sentinel
                    yield m.PROCESS_MEMORY, (str(proc.pid), self.process_name(proc.pid)), proc.used_bytes

        def one(metric: m.MetricDef, read: Callable[[Any], float], scale: float = 1.0,
                labels: tuple[str, ...] = ()) -> Reading:
            def reading(h: Any) -> Iterator[Series]:
                yield metric, labels, read(h) * scale
            return reading

        def ecc(error_type: int, counter: int, labels: tuple[str, str]) -> Reading:
            return one(m.ECC_ERRORS, lambda h: nvml.ecc_errors(h, error_type, counter), labels=labels)

        sm, mem = pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM
        return (
            ("utilization", utilization),
            ("memory", memory),
            ("temperature", one(m.TEMPERATURE, nvml.temperature)),
            ("fan speed", one(m.FAN_SPEED, nvml.fan_speed_percent, 0.01)),
            ("power usage", one(m.POWER_USAGE, nvml.power_usage_mw, 0.001)),
            ("power limit", one(m.POWER_LIMIT, nvml.power_limit_mw, 0.001)),
            ("energy", one(m.ENERGY, nvml.energy_mj, 0.001)),
            ("SM clock", one(m.SM_CLOCK, lambda h: nvml.clock_mhz(h, sm), 1e6)),
            ("memory clock", one(m.MEMORY_CLOCK, lambda h: nvml.clock_mhz(h, mem), 1e6)),
            ("max SM clock", one(m.SM_CLOCK_MAX, lambda h: nvml.max_clock_mhz(h, sm), 1e6)),
            ("max memory clock", one(m.MEMORY_CLOCK_MAX, lambda h: nvml.max_clock_mhz(h, mem), 1e6)),
            ("performance state", pstate),
            ("clock event reasons", clock_events),
            ("PCIe generation", one(m.PCIE_GENERATION, nvml.pcie_generation, labels=("current",))),
            ("PCIe max generation", one(m.PCIE_GENERATION, nvml.pcie_max_generation, labels=("max",))),
            ("PCIe width", one(m.PCIE_WIDTH, nvml.pcie_width, labels=("current",))),
            ("PCIe max width", one(m.PCIE_WIDTH, nvml.pcie_max_width, labels=("max",))),
            ("PCIe replays", one(m.PCIE_REPLAYS, nvml.pcie_replays)),
            *((f"ECC {etype} {scope}", ecc(e, c, (etype, scope))) for e, etype in ECC_ERROR_TYPES
              for c, scope in ECC_COUNTERS),
            ("remapped rows", remapped_rows),
            ("processes", processes),
        )
