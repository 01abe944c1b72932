"""`gpufleet exporter --simulate N`: stand-in GPUs whose readings follow the simulated engines' load.

For the one-machine test bed, where the engines are `gpufleet sim serve` processes and there is no
GPU. The exporter runs its ordinary sampler, collector and XID watcher over a `FakeNvml` of N GPUs;
before each sample, `Simulation.refresh` reads each engine's `/metrics` (the URLs given with
`--engine-url`, each with the GPU indices it runs on, `--engine-gpus`, as CUDA_VISIBLE_DEVICES
lists them) and sets every GPU of that engine from its load. `gpufleet_exporter_info{mode="simulate"}`
and the driver version `simulated` label the output as a stand-in.

The derivation, per engine (vLLM's series, or TGI's in brackets), is deliberately simple:

* running requests r = `vllm:num_requests_running` [`tgi_batch_current_size`];
  KV cache usage k = `vllm:kv_cache_usage_perc` or the older `vllm:gpu_cache_usage_perc`
  [`tgi_batch_current_max_tokens / tgi_batch_max_total_tokens`];
  memory share g = `gpu_memory_utilization` of `vllm:cache_config_info` [0.9];
* utilization u = min(1, r / 8): 8 running requests keep a GPU busy; memory-controller
  utilization 0.7 u;
* memory used = g x total x (0.25 + 0.75 k): of the engine's share, a quarter is weights,
  activations and runtime (the capacity plan of the reference fleet: 5.3 of 22.8 GiB) and the
  rest the KV cache, counted as far as it is in use. A real vLLM allocates its whole share at
  start-up, so a real GPU's used memory stays flat; the stand-in shows the KV cache filling
  instead, as the seed's table does. One compute process per GPU (`gpufleet-sim`, PID 0) holds it;
* power = idle + (0.9 x limit - idle) x u, idle = 6 % of the board's limit; energy is its integral;
* temperature moves toward 35 + 45 u °C with a 30 s time constant; fan 30 % + 1.5 % per °C over 35;
* clocks, P-state and PCIe link: idle (210 MHz SM, P8, PCIe gen 1, clock reason `gpu_idle`) at
  u = 0, busy (2520 MHz SM, P2, PCIe at its maximum generation) otherwise.

An engine that does not answer leaves its GPUs idle with no process and no memory used (its
container is not running). GPUs no engine claims stay idle.
"""

from __future__ import annotations

import logging
import math
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import pynvml
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.exporter.fake import FakeGpu, FakeNvml, FakeProcess
from gpufleet.planner.catalogue import GpuSpec, gpus
from gpufleet.testbed.pci import KNOWN_GPUS, MAX_GPUS, simulated_gpus

log = logging.getLogger("gpufleet.exporter")

DEFAULT_GPU = "rtx-4090d"
SIMULATED_VERSION = "simulated"
FETCH_TIMEOUT_S = 1.0
SATURATING_REQUESTS = 8
FIXED_MEMORY_SHARE = 0.25
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
IDLE_POWER_SHARE = 0.06
BUSY_POWER_SHARE = 0.9
IDLE_C, BUSY_RISE_C, THERMAL_TIME_CONSTANT_S = 35.0, 45.0, 30.0
IDLE_SM_MHZ, BUSY_SM_MHZ, IDLE_MEM_MHZ, BUSY_MEM_MHZ = 210, 2520, 405, 10501
PROCESS_NAME = "gpufleet-sim"
# Board power limits (W) of the catalogue's GPUs; another GPU gets 300 W.
POWER_LIMIT_W = {
    "rtx-4090": 450, "rtx-4090d": 425, "l40s": 350, "a100-40gb": 400, "a100-80gb": 400, "h100-80gb": 700,
    "h200": 700,
}


@dataclass(frozen=True)
class EngineSource:
    url: str  # the engine's /metrics URL
    gpus: tuple[int, ...]  # the host GPU indices it runs on


@dataclass(frozen=True)
class EngineLoad:
    running: float
    kv_usage: float
    gpu_memory_utilization: float


def metrics_url(url: str) -> str:
    """The engine's metrics URL from its base URL (`http://127.0.0.1:8000` -> `.../metrics`); ValueError if bad."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"engine URL {url!r}: expected http://HOST:PORT (e.g. http://127.0.0.1:8000)")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError as exc:
        raise ValueError(f"engine URL {url!r}: {exc}") from None
    path = parts.path.rstrip("/")
    return url if path.endswith("/metrics") else f"{parts.scheme}://{parts.netloc}{path}/metrics"


def parse_load(text: str) -> EngineLoad:
    """The load of a vLLM (or TGI) engine from its Prometheus text."""
    values: dict[str, float] = {}
    gmu = DEFAULT_GPU_MEMORY_UTILIZATION
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:cache_config_info":
                gmu = float(sample.labels.get("gpu_memory_utilization", gmu))
            else:
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    if "vllm:num_requests_running" in values:
        running = values["vllm:num_requests_running"]
        kv = values.get("vllm:kv_cache_usage_perc", values.get("vllm:gpu_cache_usage_perc", 0.0))
    else:
        running = values.get("tgi_batch_current_size", 0.0)
        capacity = values.get("tgi_batch_max_total_tokens", 0.0)
        kv = values.get("tgi_batch_current_max_tokens", 0.0) / capacity if capacity else 0.0
    return EngineLoad(running, min(1.0, max(0.0, kv)), gmu)


def fetch_load(url: str, timeout: float = FETCH_TIMEOUT_S) -> EngineLoad | None:
    """The engine's load, or None when it does not answer (not running, starting, refusing)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return parse_load(response.read().decode("utf-8", "replace"))
    except (OSError, urllib.error.URLError, ValueError) as exc:
        log.debug("engine %s: %s", url, exc)
        return None


def gpu_spec(gpu_id: str) -> GpuSpec:
    """The catalogue GPU; ValueError naming the known ones."""
    catalogue = gpus()
    if gpu_id not in catalogue:
        from gpufleet.suggest import hint

        raise ValueError(f"unknown GPU {gpu_id!r}: {hint(gpu_id, catalogue, 'GPU id')}")
    return catalogue[gpu_id]


def check_engines(count: int, engines: Sequence[EngineSource]) -> None:
    """ValueError unless every GPU index exists and belongs to at most one engine."""
    owner: dict[int, str] = {}
    for engine in engines:
        if not engine.gpus:
            raise ValueError(f"engine {engine.url}: no GPUs")
        for index in engine.gpus:
            if not 0 <= index < count:
                raise ValueError(f"engine {engine.url}: GPU {index} does not exist (--simulate {count}: GPUs 0-"
                                 f"{count - 1})")
            if index in owner:
                raise ValueError(f"GPU {index} is given to two engines: {owner[index]} and {engine.url}")
            owner[index] = engine.url


class Simulation:
    """N stand-in GPUs of one catalogue model, driven by the engines' load."""

    def __init__(
        self,
        count: int,
        engines: Sequence[EngineSource] = (),
        *,
        gpu_id: str = DEFAULT_GPU,
        host: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        fetch: Callable[[str], EngineLoad | None] = fetch_load,
    ) -> None:
        if not 1 <= count <= MAX_GPUS:
            raise ValueError(f"--simulate takes 1 to {MAX_GPUS} GPUs, not {count}")
        check_engines(count, engines)
        spec = gpu_spec(gpu_id)
        self.engines = tuple(engines)
        self.clock = clock
        self.fetch = fetch
        self.power_limit_mw = POWER_LIMIT_W.get(gpu_id, 300) * 1000
        # the test bed's UUIDs and bus ids for this host (gpufleet/testbed/pci.py): the stand-in
        # nvidia-smi and this exporter name the same GPUs the same way
        identities = simulated_gpus(host or socket.gethostname(), count, name=spec.name, memory_mib=spec.memory_mib,
                                    pci_device=None if spec.name in KNOWN_GPUS else 0)
        self.fake = FakeNvml(
            [
                FakeGpu(uuid=ident.uuid, name=ident.name, pci_bus_id=ident.bus_id, memory_total=spec.memory_bytes,
                        power_limit_mw=self.power_limit_mw, power_mw=int(self.power_limit_mw * IDLE_POWER_SHARE),
                        temperature=int(IDLE_C))
                for ident in identities
            ],
            driver_version=SIMULATED_VERSION, cuda_driver_version=None, nvml_version=SIMULATED_VERSION,
        )
        self._temperature = [IDLE_C] * count  # kept unrounded: NVML reports whole degrees
        self._last_refresh: float | None = None

    def refresh(self) -> None:
        """Read every engine's load and set its GPUs (the sampler calls this before each sample)."""
        now = self.clock()
        dt = 0.0 if self._last_refresh is None else max(0.0, now - self._last_refresh)
        self._last_refresh = now
        loads: dict[int, EngineLoad | None] = dict.fromkeys(range(len(self.fake.gpus)))
        for engine in self.engines:
            load = self.fetch(engine.url)
            for index in engine.gpus:
                loads[index] = load
        for index, load in loads.items():
            self._apply(index, load, dt)

    def _apply(self, index: int, load: EngineLoad | None, dt: float) -> None:
        gpu = self.fake.gpus[index]
        util = 0.0 if load is None else min(1.0, load.running / SATURATING_REQUESTS)
        gpu.utilization = round(100 * util)
        gpu.memory_utilization = round(70 * util)
        if load is None:
            gpu.memory_used = 0
            gpu.processes = []
        else:
            share = load.gpu_memory_utilization * gpu.memory_total
            used = int(share * (FIXED_MEMORY_SHARE + (1 - FIXED_MEMORY_SHARE) * load.kv_usage))
            gpu.memory_used = min(used, gpu.memory_total - gpu.memory_reserved)
            gpu.processes = [FakeProcess(0, gpu.memory_used, PROCESS_NAME)]
        idle_mw = self.power_limit_mw * IDLE_POWER_SHARE
        gpu.power_mw = int(idle_mw + (self.power_limit_mw * BUSY_POWER_SHARE - idle_mw) * util)
        gpu.energy_mj += int(gpu.power_mw * dt)  # mW x s = mJ
        target = IDLE_C + BUSY_RISE_C * util
        current = self._temperature[index]
        self._temperature[index] = current + (target - current) * (1 - math.exp(-dt / THERMAL_TIME_CONSTANT_S))
        gpu.temperature = round(self._temperature[index])
        gpu.fan_speed = min(100, round(30 + 1.5 * max(0.0, gpu.temperature - IDLE_C)))
        busy = gpu.utilization > 0
        gpu.sm_clock = BUSY_SM_MHZ if busy else IDLE_SM_MHZ
        gpu.memory_clock = BUSY_MEM_MHZ if busy else IDLE_MEM_MHZ
        gpu.pstate = 2 if busy else 8
        gpu.pcie_generation = gpu.pcie_max_generation if busy else 1
        gpu.clock_events = 0 if busy else pynvml.nvmlClocksThrottleReasonGpuIdle
