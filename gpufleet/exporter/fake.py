"""An injectable fake NVML: N GPUs behind the pynvml functions the exporter calls.

`FakeNvml` has pynvml's function names, arguments, return shapes (objects with `.gpu`, `.used`,
`.busId`, `.pid`, `.usedGpuMemory`, `.eventData`, ...), units (percent, mW, mJ, MHz, bytes) and
init/shutdown reference counting, and raises the real `pynvml.NVMLError_*` classes, so
`Nvml(FakeNvml(...))` exercises the same code paths as `Nvml(pynvml)` on a GPU host. It is a labelled
stand-in: the tests and `gpufleet exporter --simulate` use it, never a production exporter.

Failure injection, all changeable while the exporter runs:

* `gpu.fail("nvmlDeviceGetFanSpeed", pynvml.NVMLError_NotSupported)`: that call raises for that GPU
  (`gpu.not_supported(*names)` for several); `gpu.lost = True`: every call for it raises GpuIsLost;
* `fake.library_error = pynvml.NVMLError_DriverNotLoaded`: every call, nvmlInit included, raises it;
  `fake.fail("nvmlDeviceGetCount", pynvml.NVMLError_Unknown)` for one system-level call;
* `fake.hold("nvmlDeviceGetUtilizationRates")` makes that call block until `fake.release(...)`
  (a driver call that hangs);
* `fake.emit_xid(index, 79)` delivers an XID event to every event set that GPU is registered in.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NoReturn

import pynvml
from pynvml import NVMLError

MIB = 1024 * 1024
ErrorSpec = type[NVMLError] | NVMLError


def raise_error(spec: ErrorSpec) -> NoReturn:
    """Raise a fresh instance of the real pynvml class (instances carry their traceback otherwise)."""
    code = spec.value if isinstance(spec, NVMLError) else spec().value
    raise NVMLError(code)


@dataclass
class FakeProcess:
    pid: int
    used_bytes: int | None  # None: as the driver reports under Windows WDDM
    name: str = "python3"


@dataclass
class FakeGpu:
    """One GPU's state, in NVML's units. Defaults: an idle RTX 4090 D with every field supported."""

    uuid: str
    name: str = "NVIDIA GeForce RTX 4090 D"
    pci_bus_id: str = "00000000:01:00.0"
    memory_total: int = 24564 * MIB
    memory_used: int = 0
    memory_reserved: int = 329 * MIB
    utilization: int = 0  # percent
    memory_utilization: int = 0
    temperature: int = 35  # Celsius
    fan_speed: int = 30  # percent
    power_mw: int = 25_000
    power_limit_mw: int = 425_000
    energy_mj: int = 0
    sm_clock: int = 210  # MHz
    memory_clock: int = 405
    sm_clock_max: int = 3105
    memory_clock_max: int = 10501
    pstate: int = 8
    clock_events: int = pynvml.nvmlClocksThrottleReasonGpuIdle
    supported_clock_events: int = pynvml.nvmlClocksThrottleReasonAll
    pcie_generation: int = 1  # an idle GPU's link trains down
    pcie_max_generation: int = 4
    pcie_width: int = 16
    pcie_max_width: int = 16
    pcie_replays: int = 0
    ecc: dict[tuple[int, int], int] = field(default_factory=dict)  # (error type, counter type) -> count
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)  # corrected, uncorrected, pending, failure
    processes: list[FakeProcess] = field(default_factory=list)
    lost: bool = False
    errors: dict[str, ErrorSpec] = field(default_factory=dict)  # pynvml function name -> error it raises

    def fail(self, function: str, error: ErrorSpec) -> None:
        self.errors[function] = error

    def not_supported(self, *functions: str) -> None:
        for function in functions:
            self.errors[function] = pynvml.NVMLError_NotSupported

    def heal(self) -> None:
        self.errors.clear()
        self.lost = False


class FakeHandle:
    """A device handle: compared by identity, like the device a real handle points at."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<FakeHandle {self.index}>"


class FakeEventSet:
    def __init__(self) -> None:
        self.events: queue.Queue[SimpleNamespace] = queue.Queue()
        self.registered: dict[FakeHandle, int] = {}
        self.freed = False


def make_gpus(count: int, **values: Any) -> list[FakeGpu]:
    """`count` healthy GPUs with distinct UUIDs and bus ids (00000000:01:00.0, 00000000:02:00.0, ...)."""
    return [
        FakeGpu(uuid=f"GPU-fa4e0000-0000-4000-8000-{i:012x}", pci_bus_id=f"00000000:{i + 1:02X}:00.0", **values)
        for i in range(count)
    ]


class FakeNvml:
    """A stand-in for the `pynvml` module (the parts gpufleet's exporter calls)."""

    def __init__(
        self,
        gpus: int | Iterable[FakeGpu],
        *,
        driver_version: str = "550.54.15",
        cuda_driver_version: int | None = 12040,
        nvml_version: str = "12.550.54.15",
    ) -> None:
        self.gpus = make_gpus(gpus) if isinstance(gpus, int) else list(gpus)
        self.handles = [FakeHandle(i) for i in range(len(self.gpus))]
        self.driver_version = driver_version
        self.cuda_driver_version = cuda_driver_version
        self.nvml_version = nvml_version
        self.library_error: ErrorSpec | None = None
        self.errors: dict[str, ErrorSpec] = {}  # system-level function name -> error
        self.calls: Counter[str] = Counter()
        self.init_count = 0
        self._held: dict[str, threading.Event] = {}
        self._sets: list[FakeEventSet] = []
        self._lock = threading.Lock()

    # ---- test controls ------------------------------------------------------------------------

    def fail(self, function: str, error: ErrorSpec) -> None:
        self.errors[function] = error

    def hold(self, function: str) -> None:
        self._held[function] = threading.Event()

    def release(self, function: str) -> None:
        gate = self._held.pop(function, None)
        if gate is not None:
            gate.set()

    def emit_xid(self, index: int, xid: int) -> None:
        handle = self.handles[index]
        event = SimpleNamespace(device=handle, eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=xid,
                                gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
        with self._lock:
            for event_set in self._sets:
                if event_set.registered.get(handle, 0) & pynvml.nvmlEventTypeXidCriticalError:
                    event_set.events.put(event)

    def process_name(self, pid: int) -> str:
        for gpu in self.gpus:
            for proc in gpu.processes:
                if proc.pid == pid:
                    return proc.name
        return ""

    # ---- plumbing -----------------------------------------------------------------------------

    def _enter(self, function: str, *, needs_init: bool = True) -> None:
        self.calls[function] += 1
        gate = self._held.get(function)
        if gate is not None:
            gate.wait()
        if self.library_error is not None:
            raise_error(self.library_error)
        if needs_init and self.init_count == 0:
            raise_error(pynvml.NVMLError_Uninitialized)
        error = self.errors.get(function)
        if error is not None:
            raise_error(error)

    def _gpu(self, function: str, handle: FakeHandle) -> FakeGpu:
        self._enter(function)
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise_error(pynvml.NVMLError_GpuIsLost)
        error = gpu.errors.get(function)
        if error is not None:
            raise_error(error)
        return gpu

    # ---- library and system -------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._enter("nvmlInit", needs_init=False)
        with self._lock:
            self.init_count += 1

    def nvmlShutdown(self) -> None:
        held = self.init_count > 0
        try:
            self._enter("nvmlShutdown")
        finally:  # even when it fails, a library that is gone holds no reference
            if held:
                with self._lock:
                    self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._enter("nvmlSystemGetCudaDriverVersion")
        if self.cuda_driver_version is None:
            raise_error(pynvml.NVMLError_NotSupported)
        return int(self.cuda_driver_version)  # type: ignore[arg-type]

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._enter("nvmlSystemGetNVMLVersion")
        return self.nvml_version

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        if not 0 <= index < len(self.gpus):
            self._enter("nvmlDeviceGetHandleByIndex")
            raise_error(pynvml.NVMLError_InvalidArgument)
        handle = self.handles[index]
        self._gpu("nvmlDeviceGetHandleByIndex", handle)
        return handle

    # ---- identity -----------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> SimpleNamespace:
        return SimpleNamespace(busId=self._gpu("nvmlDeviceGetPciInfo", handle).pci_bus_id)

    # ---- readings -----------------------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> SimpleNamespace:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=gpu.utilization, memory=gpu.memory_utilization)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> SimpleNamespace:
        if version:  # pynvml calls nvmlDeviceGetMemoryInfo_v2 then
            gpu = self._gpu("nvmlDeviceGetMemoryInfo_v2", handle)
            free = gpu.memory_total - gpu.memory_reserved - gpu.memory_used
            return SimpleNamespace(version=version, total=gpu.memory_total, reserved=gpu.memory_reserved,
                                   free=free, used=gpu.memory_used)
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        # v1 counts the reserved memory as used
        used = gpu.memory_used + gpu.memory_reserved
        return SimpleNamespace(total=gpu.memory_total, free=gpu.memory_total - used, used=used)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        return self._gpu("nvmlDeviceGetTemperature", handle).temperature

    def nvmlDeviceGetTemperatureV(self, handle: FakeHandle, sensor: int) -> int:
        return self._gpu("nvmlDeviceGetTemperatureV", handle).temperature

    def nvmlDeviceGetFanSpeed(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetFanSpeed", handle).fan_speed

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetTotalEnergyConsumption", handle).energy_mj

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock: int) -> int:
        gpu = self._gpu("nvmlDeviceGetClockInfo", handle)
        return gpu.sm_clock if clock == pynvml.NVML_CLOCK_SM else gpu.memory_clock

    def nvmlDeviceGetMaxClockInfo(self, handle: FakeHandle, clock: int) -> int:
        gpu = self._gpu("nvmlDeviceGetMaxClockInfo", handle)
        return gpu.sm_clock_max if clock == pynvml.NVML_CLOCK_SM else gpu.memory_clock_max

    def nvmlDeviceGetPerformanceState(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPerformanceState", handle).pstate

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksEventReasons", handle).clock_events

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksThrottleReasons", handle).clock_events

    def nvmlDeviceGetSupportedClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetSupportedClocksEventReasons", handle).supported_clock_events

    def nvmlDeviceGetSupportedClocksThrottleReasons(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetSupportedClocksThrottleReasons", handle).supported_clock_events

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrPcieLinkGeneration", handle).pcie_generation

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetMaxPcieLinkGeneration", handle).pcie_max_generation

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrPcieLinkWidth", handle).pcie_width

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetMaxPcieLinkWidth", handle).pcie_max_width

    def nvmlDeviceGetPcieReplayCounter(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPcieReplayCounter", handle).pcie_replays

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, error_type: int, counter_type: int) -> int:
        return self._gpu("nvmlDeviceGetTotalEccErrors", handle).ecc.get((error_type, counter_type), 0)

    def nvmlDeviceGetRemappedRows(self, handle: FakeHandle) -> tuple[int, int, int, int]:
        return self._gpu("nvmlDeviceGetRemappedRows", handle).remapped_rows

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[SimpleNamespace]:
        gpu = self._gpu("nvmlDeviceGetComputeRunningProcesses", handle)
        return [
            SimpleNamespace(pid=p.pid, usedGpuMemory=p.used_bytes, gpuInstanceId=0xFFFFFFFF,
                            computeInstanceId=0xFFFFFFFF)
            for p in gpu.processes
        ]

    # ---- events -------------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._enter("nvmlEventSetCreate")
        event_set = FakeEventSet()
        with self._lock:
            self._sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, event_types: int, event_set: FakeEventSet) -> None:
        self._gpu("nvmlDeviceRegisterEvents", handle)
        event_set.registered[handle] = event_set.registered.get(handle, 0) | event_types

    def nvmlEventSetWait(self, event_set: FakeEventSet, timeout_ms: int) -> SimpleNamespace:
        self._enter("nvmlEventSetWait")
        if event_set.freed:
            raise_error(pynvml.NVMLError_InvalidArgument)
        try:
            return event_set.events.get(timeout=timeout_ms / 1000.0)
        except queue.Empty:
            raise_error(pynvml.NVMLError_Timeout)

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        self._enter("nvmlEventSetFree")
        event_set.freed = True
        with self._lock:
            if event_set in self._sets:
                self._sets.remove(event_set)
