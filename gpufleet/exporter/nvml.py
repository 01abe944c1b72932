"""A thin interface over the pynvml functions the exporter uses, so a fake library can be injected.

`Nvml` wraps a *library*: the `pynvml` module itself (nvidia-ml-py) in production, or an object
with the same function names, arguments, return shapes and exceptions (`gpufleet.exporter.fake`)
in tests and in `--simulate` mode. Everything above this module (sampler, event watcher) calls
`Nvml`'s methods and never pynvml directly, and every method returns plain Python values.

What the wrapper adds to the raw binding:

* version fallbacks: `nvmlDeviceGetCurrentClocksEventReasons` (R535+) falls back to the deprecated
  `...ClocksThrottleReasons`, `nvmlDeviceGetTemperatureV` (R550+) to `nvmlDeviceGetTemperature`,
  `nvmlDeviceGetMemoryInfo(version=nvmlMemory_v2)` (R510+, adds `reserved`) to the v1 call;
* a function missing from the binding (an older nvidia-ml-py) or from the driver raises
  `NVMLError_FunctionNotFound`, a field-level error like NotSupported (pynvml's own
  `NVMLLibraryMismatchError` for unversioned calls is turned into the same);
* `classify()`: which errors omit one field, which take one GPU down, which take NVML down.

pynvml can be imported without a driver (it loads libnvidia-ml.so.1 in `nvmlInit`), so the error
classes and constants below always come from the real binding.
"""

from __future__ import annotations

import ctypes
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Literal

import pynvml
from pynvml import NVMLError

ErrorLevel = Literal["field", "device", "library"]

# Omit the one field (the GPU or driver cannot give it); never an error worth alerting on.
FIELD_ERROR_CODES = frozenset({
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_NO_PERMISSION,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_NOT_FOUND,
    pynvml.NVML_ERROR_NO_DATA,
    pynvml.NVML_ERROR_DEPRECATED,
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
    pynvml.NVML_ERROR_INVALID_ARGUMENT,
    pynvml.NVML_ERROR_VGPU_ECC_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FREQ_NOT_SUPPORTED,
})
# NVML itself is unusable: shut it down and initialise again (with backoff).
LIBRARY_ERROR_CODES = frozenset({
    pynvml.NVML_ERROR_UNINITIALIZED,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
})
# Everything else from a per-GPU call (GpuIsLost, GpuNotFound, ResetRequired, Unknown, Timeout,
# CorruptedInforom, ...) takes that GPU down for the cycle; the others still report.

# The clock event ("throttle") reason bits: pynvml constant suffix -> label value. The first nine are
# nvmlClocksEventReason*; BoardLimit and Reliability exist only as the legacy nvmlClocksThrottleReason*.
CLOCK_EVENT_REASONS: tuple[tuple[str, str], ...] = (
    ("GpuIdle", "gpu_idle"),
    ("ApplicationsClocksSetting", "applications_clocks_setting"),
    ("SwPowerCap", "sw_power_cap"),
    ("HwSlowdown", "hw_slowdown"),
    ("SyncBoost", "sync_boost"),
    ("SwThermalSlowdown", "sw_thermal_slowdown"),
    ("HwThermalSlowdown", "hw_thermal_slowdown"),
    ("HwPowerBrakeSlowdown", "hw_power_brake_slowdown"),
    ("DisplayClockSetting", "display_clock_setting"),
    ("BoardLimit", "board_limit"),
    ("Reliability", "reliability"),
)


def clock_event_bits() -> tuple[tuple[int, str], ...]:
    """(bit, label) for every reason the installed pynvml names, from its own constants."""
    found = []
    for suffix, label in CLOCK_EVENT_REASONS:
        bit = getattr(pynvml, f"nvmlClocksEventReason{suffix}", None)
        if bit is None:
            bit = getattr(pynvml, f"nvmlClocksThrottleReason{suffix}", None)
        if bit:
            found.append((int(bit), label))
    return tuple(found)


CLOCK_EVENT_BITS = clock_event_bits()

ECC_ERROR_TYPES = (
    (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, "corrected"),
    (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "uncorrected"),
)
ECC_COUNTERS = ((pynvml.NVML_VOLATILE_ECC, "volatile"), (pynvml.NVML_AGGREGATE_ECC, "aggregate"))
XID_EVENT = pynvml.nvmlEventTypeXidCriticalError
# newer nvidia-ml-py (13.x) raises this for unversioned calls the driver lacks; 12.535 has no such class
_LIBRARY_MISMATCH: type[Exception] | tuple[()] = getattr(pynvml, "NVMLLibraryMismatchError", ())

# Every library function the exporter may call. The first group must exist; the rest are used
# when present (older bindings and drivers lack them). tests/unit check both against the installed
# pynvml and against the fake.
REQUIRED_FUNCTIONS = (
    "nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetPciInfo", "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetMaxClockInfo", "nvmlDeviceGetFanSpeed", "nvmlDeviceGetPerformanceState",
    "nvmlDeviceGetCurrentClocksThrottleReasons", "nvmlDeviceGetSupportedClocksThrottleReasons",
    "nvmlDeviceGetCurrPcieLinkGeneration", "nvmlDeviceGetMaxPcieLinkGeneration", "nvmlDeviceGetCurrPcieLinkWidth",
    "nvmlDeviceGetMaxPcieLinkWidth", "nvmlDeviceGetPcieReplayCounter", "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetRemappedRows", "nvmlDeviceGetComputeRunningProcesses", "nvmlEventSetCreate",
    "nvmlDeviceRegisterEvents", "nvmlEventSetWait", "nvmlEventSetFree",
)
OPTIONAL_FUNCTIONS = (
    "nvmlSystemGetCudaDriverVersion", "nvmlSystemGetNVMLVersion", "nvmlDeviceGetTemperatureV",
    "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetSupportedClocksEventReasons",
)


def error_name(exc: BaseException) -> str:
    """`GpuIsLost` for NVMLError_GpuIsLost; the class name otherwise."""
    return type(exc).__name__.removeprefix("NVMLError_")


def nvml_error(code: int) -> NVMLError:
    """The real pynvml exception for an NVML return code (NVMLError_NotSupported for 3, ...)."""
    return NVMLError(code)


def classify(exc: NVMLError) -> ErrorLevel:
    """Whether an error from a per-GPU call omits a field, takes the GPU down, or takes NVML down."""
    code = getattr(exc, "value", None)
    if code in FIELD_ERROR_CODES:
        return "field"
    if code in LIBRARY_ERROR_CODES:
        return "library"
    return "device"


def is_timeout(exc: NVMLError) -> bool:
    return getattr(exc, "value", None) == pynvml.NVML_ERROR_TIMEOUT


@dataclass(frozen=True)
class MemoryInfo:
    total: int
    used: int
    free: int
    reserved: int | None  # None where only the v1 call answered


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    used_bytes: int | None  # None: the driver does not say (Windows WDDM)


@dataclass(frozen=True)
class XidEvent:
    device: Hashable  # Nvml.device_key() of the GPU that raised it
    xid: int


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Nvml:
    """The NVML calls the exporter makes, over pynvml or an object with pynvml's surface."""

    def __init__(self, library: Any = pynvml) -> None:
        self.lib = library

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.lib, name, None)
        if fn is None:
            raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        try:
            return fn(*args, **kwargs)
        except _LIBRARY_MISMATCH as exc:  # an unversioned call the driver lacks
            raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND) from exc

    def _with_fallback(self, first: str, second: str, *args: Any) -> Any:
        try:
            return self._call(first, *args)
        except NVMLError as exc:
            if exc.value != pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                raise
        return self._call(second, *args)

    # ---- library ------------------------------------------------------------------------------

    def init(self) -> None:
        self._call("nvmlInit")

    def shutdown(self) -> None:
        self._call("nvmlShutdown")

    def driver_version(self) -> str:
        return _text(self._call("nvmlSystemGetDriverVersion"))

    def cuda_driver_version(self) -> str:
        """`12.4` from nvmlSystemGetCudaDriverVersion's 12040."""
        value = int(self._call("nvmlSystemGetCudaDriverVersion"))
        return f"{value // 1000}.{value % 1000 // 10}"

    def nvml_version(self) -> str:
        return _text(self._call("nvmlSystemGetNVMLVersion"))

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def handle(self, index: int) -> Any:
        return self._call("nvmlDeviceGetHandleByIndex", index)

    @staticmethod
    def device_key(handle: Any) -> Hashable:
        """A key equal for every object that points at the same device (event data carries a new pointer)."""
        if isinstance(handle, ctypes._Pointer):
            return ctypes.cast(handle, ctypes.c_void_p).value
        return handle

    # ---- identity -----------------------------------------------------------------------------

    def uuid(self, handle: Any) -> str:
        return _text(self._call("nvmlDeviceGetUUID", handle))

    def name(self, handle: Any) -> str:
        return _text(self._call("nvmlDeviceGetName", handle))

    def pci_bus_id(self, handle: Any) -> str:
        return _text(self._call("nvmlDeviceGetPciInfo", handle).busId)

    # ---- readings -----------------------------------------------------------------------------

    def utilization(self, handle: Any) -> tuple[int, int]:
        """(GPU, memory controller) busy percent over the driver's last sample period."""
        rates = self._call("nvmlDeviceGetUtilizationRates", handle)
        return int(rates.gpu), int(rates.memory)

    def memory(self, handle: Any) -> MemoryInfo:
        try:
            info = self._call("nvmlDeviceGetMemoryInfo", handle, version=pynvml.nvmlMemory_v2)
        except NVMLError as exc:
            if classify(exc) != "field":
                raise
        else:
            return MemoryInfo(int(info.total), int(info.used), int(info.free), int(info.reserved))
        info = self._call("nvmlDeviceGetMemoryInfo", handle)
        return MemoryInfo(int(info.total), int(info.used), int(info.free), None)

    def temperature(self, handle: Any) -> int:
        sensor = pynvml.NVML_TEMPERATURE_GPU
        return int(self._with_fallback("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature", handle, sensor))

    def power_usage_mw(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetPowerUsage", handle))

    def power_limit_mw(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetEnforcedPowerLimit", handle))

    def energy_mj(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetTotalEnergyConsumption", handle))

    def clock_mhz(self, handle: Any, clock: int) -> int:
        return int(self._call("nvmlDeviceGetClockInfo", handle, clock))

    def max_clock_mhz(self, handle: Any, clock: int) -> int:
        return int(self._call("nvmlDeviceGetMaxClockInfo", handle, clock))

    def fan_speed_percent(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetFanSpeed", handle))

    def performance_state(self, handle: Any) -> int | None:
        state = int(self._call("nvmlDeviceGetPerformanceState", handle))
        return None if state == pynvml.NVML_PSTATE_UNKNOWN else state

    def clock_events(self, handle: Any) -> int:
        return int(self._with_fallback(
            "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons", handle))

    def supported_clock_events(self, handle: Any) -> int:
        return int(self._with_fallback(
            "nvmlDeviceGetSupportedClocksEventReasons", "nvmlDeviceGetSupportedClocksThrottleReasons", handle))

    def pcie_generation(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetCurrPcieLinkGeneration", handle))

    def pcie_max_generation(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetMaxPcieLinkGeneration", handle))

    def pcie_width(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetCurrPcieLinkWidth", handle))

    def pcie_max_width(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetMaxPcieLinkWidth", handle))

    def pcie_replays(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetPcieReplayCounter", handle))

    def ecc_errors(self, handle: Any, error_type: int, counter: int) -> int:
        return int(self._call("nvmlDeviceGetTotalEccErrors", handle, error_type, counter))

    def remapped_rows(self, handle: Any) -> tuple[int, int, bool, bool]:
        """(corrected rows, uncorrected rows, remapping pending, remapping failed)."""
        corrected, uncorrected, pending, failure = self._call("nvmlDeviceGetRemappedRows", handle)
        return int(corrected), int(uncorrected), bool(pending), bool(failure)

    def compute_processes(self, handle: Any) -> list[ProcessInfo]:
        found = []
        for proc in self._call("nvmlDeviceGetComputeRunningProcesses", handle):
            used = proc.usedGpuMemory
            found.append(ProcessInfo(int(proc.pid), None if used is None else int(used)))
        return found

    # ---- events -------------------------------------------------------------------------------

    def event_set_create(self) -> Any:
        return self._call("nvmlEventSetCreate")

    def register_xid_events(self, handle: Any, event_set: Any) -> None:
        self._call("nvmlDeviceRegisterEvents", handle, XID_EVENT, event_set)

    def event_wait(self, event_set: Any, timeout_ms: int) -> XidEvent | None:
        """The next event (None for a non-XID event); NVMLError_Timeout when none came in time."""
        data = self._call("nvmlEventSetWait", event_set, timeout_ms)
        if not int(data.eventType) & XID_EVENT:
            return None
        return XidEvent(self.device_key(data.device), int(data.eventData))

    def event_set_free(self, event_set: Any) -> None:
        self._call("nvmlEventSetFree", event_set)
