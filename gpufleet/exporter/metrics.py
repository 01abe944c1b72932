"""Every metric the exporter exposes: name, type, help and labels, in exposition order.

The sampler and the event watcher fill these by name, the collector renders them, and
docs/exporter.md's table is checked against this list by tests/unit/test_exporter_docs.py.
Names are Prometheus base units (`_bytes`, `_celsius`, `_watts`, `_hertz`, `_ratio`, `_joules_total`).
Every per-GPU series carries `gpu` (the NVML index), `uuid` and `name`; `LABELS` below are the extra ones.
A counter's name here is its exposed name, with `_total`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GPU_LABELS = ("gpu", "uuid", "name")


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Literal["gauge", "counter"]
    help: str
    labels: tuple[str, ...] = ()  # besides GPU_LABELS for per-GPU metrics
    per_gpu: bool = True

    @property
    def family(self) -> str:
        """The family name: a counter's without `_total`."""
        if self.kind == "counter":
            return self.name.removesuffix("_total")
        return self.name


def _gpu(name: str, kind: Literal["gauge", "counter"], help_text: str, *labels: str) -> MetricDef:
    return MetricDef(f"gpufleet_gpu_{name}", kind, help_text, labels)


def _self(name: str, kind: Literal["gauge", "counter"], help_text: str, *labels: str) -> MetricDef:
    return MetricDef(f"gpufleet_exporter_{name}", kind, help_text, labels, per_gpu=False)


UP = _gpu("up", "gauge", "1 if the GPU answered NVML in the latest sample, 0 if it is lost, NVML is down or the "
          "sample is stale; its other series are omitted while 0.")
INFO = _gpu("info", "gauge", "GPU identity; always 1.", "pci_bus_id")
DRIVER_INFO = MetricDef("gpufleet_gpu_driver_info", "gauge", "NVIDIA driver, CUDA driver API and NVML versions of "
                        "the host; always 1.", ("driver_version", "cuda_driver_version", "nvml_version"),
                        per_gpu=False)
UTILIZATION = _gpu("utilization_ratio", "gauge", "Share of the last sample period in which a kernel ran (0-1).")
MEMORY_UTILIZATION = _gpu("memory_utilization_ratio", "gauge", "Share of the last sample period in which device "
                          "memory was read or written (0-1).")
MEMORY_USED = _gpu("memory_used_bytes", "gauge", "Device memory allocated.")
MEMORY_FREE = _gpu("memory_free_bytes", "gauge", "Device memory free.")
MEMORY_TOTAL = _gpu("memory_total_bytes", "gauge", "Device memory installed.")
MEMORY_RESERVED = _gpu("memory_reserved_bytes", "gauge", "Device memory reserved by the driver and firmware.")
TEMPERATURE = _gpu("temperature_celsius", "gauge", "GPU core temperature.")
FAN_SPEED = _gpu("fan_speed_ratio", "gauge", "Intended fan speed as a share of its maximum (0-1).")
POWER_USAGE = _gpu("power_usage_watts", "gauge", "Power drawn by the board.")
POWER_LIMIT = _gpu("power_limit_watts", "gauge", "Power limit the driver enforces.")
ENERGY = _gpu("energy_consumed_joules_total", "counter", "Energy consumed since the driver was loaded.")
SM_CLOCK = _gpu("sm_clock_hertz", "gauge", "SM (shader) clock.")
MEMORY_CLOCK = _gpu("memory_clock_hertz", "gauge", "Memory clock.")
SM_CLOCK_MAX = _gpu("sm_clock_max_hertz", "gauge", "Highest SM clock the GPU supports.")
MEMORY_CLOCK_MAX = _gpu("memory_clock_max_hertz", "gauge", "Highest memory clock the GPU supports.")
PSTATE = _gpu("performance_state", "gauge", "Performance state: 0 (P0, most performance) to 15 (P15, least).")
CLOCK_EVENT = _gpu("clock_event_active", "gauge", "1 while the reason holds the clocks down (throttle reason), 0 "
                   "otherwise; only the reasons the GPU supports.", "reason")
PCIE_GENERATION = _gpu("pcie_link_generation", "gauge", "PCIe link generation, current and the most the "
                       "GPU and system support.", "link")
PCIE_WIDTH = _gpu("pcie_link_width", "gauge", "PCIe link width (lanes), current and the most supported.", "link")
PCIE_REPLAYS = _gpu("pcie_replays_total", "counter", "PCIe replays (link-level retransmissions) since the driver "
                    "was loaded.")
ECC_ERRORS = _gpu("ecc_errors_total", "counter", "ECC memory errors: volatile since the driver was loaded, "
                  "aggregate over the board's life.", "error_type", "scope")
REMAPPED_ROWS = _gpu("remapped_rows_total", "counter", "Memory rows remapped for corrected or uncorrected "
                     "errors.", "error_type")
REMAP_PENDING = _gpu("remapped_rows_pending", "gauge", "1 if a row remapping waits for a GPU reset.")
REMAP_FAILURE = _gpu("remapped_rows_failure", "gauge", "1 if a row remapping failed (the GPU needs service).")
PROCESSES = _gpu("processes", "gauge", "Compute processes running on the GPU.")
PROCESS_MEMORY = _gpu("process_memory_used_bytes", "gauge", "Device memory used by a compute process (host PID; "
                      "`process` is its /proc comm, empty where unreadable).", "pid", "process")
XID_ERRORS = _gpu("xid_errors_total", "counter", "XID critical error events reported by the driver, by XID code.",
                  "xid")
XID_LAST_SEEN = _gpu("xid_last_seen_timestamp_seconds", "gauge", "When the exporter last received this XID "
                     "code (Unix time).", "xid")

EXPORTER_INFO = _self("info", "gauge", "The exporter's version and mode (`nvml`, or `simulate` with stand-in "
                      "GPUs); always 1.", "version", "mode")
NVML_UP = _self("nvml_up", "gauge", "1 if NVML answered the latest sample, 0 while it is down or re-initialising "
                "or the sample is stale.")
SAMPLE_DURATION = _self("sample_duration_seconds", "gauge", "How long the latest completed sample of all GPUs "
                        "took.")
SAMPLE_AGE = _self("sample_age_seconds", "gauge", "Time since the latest completed sample (grows while NVML "
                   "hangs).")
LAST_SAMPLE = _self("last_sample_timestamp_seconds", "gauge", "When the latest completed sample was taken (Unix "
                    "time).")
SAMPLES = _self("samples_total", "counter", "Sampling cycles completed, including those in which NVML was down.")
ERRORS = _self("errors_total", "counter", "Errors by kind (`library`: NVML down, `device`: a GPU failed, "
               "`event`: the XID watcher failed) and NVML error name.", "kind", "error")
XID_WATCH_UP = _self("xid_watch_up", "gauge", "1 while the XID event watcher is waiting on at least one GPU.")
SCRAPES = _self("scrapes_total", "counter", "Scrapes served.")
SCRAPE_DURATION = _self("scrape_duration_seconds", "gauge", "How long this scrape took to build its metrics "
                        "(it reads the latest sample and never calls NVML).")

GPU_METRICS: tuple[MetricDef, ...] = (
    UP, INFO, UTILIZATION, MEMORY_UTILIZATION, MEMORY_USED, MEMORY_FREE, MEMORY_TOTAL, MEMORY_RESERVED, TEMPERATURE,
    FAN_SPEED, POWER_USAGE, POWER_LIMIT, ENERGY, SM_CLOCK, MEMORY_CLOCK, SM_CLOCK_MAX, MEMORY_CLOCK_MAX, PSTATE,
    CLOCK_EVENT, PCIE_GENERATION, PCIE_WIDTH, PCIE_REPLAYS, ECC_ERRORS, REMAPPED_ROWS, REMAP_PENDING, REMAP_FAILURE,
    PROCESSES, PROCESS_MEMORY, XID_ERRORS, XID_LAST_SEEN,
)
HOST_METRICS: tuple[MetricDef, ...] = (DRIVER_INFO,)
SELF_METRICS: tuple[MetricDef, ...] = (
    EXPORTER_INFO, NVML_UP, SAMPLE_DURATION, SAMPLE_AGE, LAST_SAMPLE, SAMPLES, ERRORS, XID_WATCH_UP, SCRAPES,
    SCRAPE_DURATION,
)
ALL_METRICS: tuple[MetricDef, ...] = GPU_METRICS + HOST_METRICS + SELF_METRICS
