"""Alert thresholds the inventory's schema has no key for yet, each defined once, here.

The SLO thresholds (TTFT, inter-token latency, error rate, availability) come from the
inventory's `slo` section, and the GPU memory limit and GPU count of each host from its `serving`
and `gpus` sections; see rules.py. The values below have no inventory key: `render_rules` takes an
`AlertThresholds`, so moving them into the schema (a `monitoring.alerts` section with these
defaults in roles/prometheus/defaults.yml) changes only where the object is built.
"""

from __future__ import annotations

from dataclasses import dataclass

# XID codes that need an operator (NVIDIA's XID catalogue; docs/exporter.md): 48 double-bit ECC,
# 62 internal micro-controller halt, 64 ECC page retirement or row remap failure, 74 NVLink,
# 79 fallen off the bus, 94/95 contained/uncontained ECC, 119/120 GSP errors. Application XIDs
# (13, 31, 43) and informational ones (63, 92) are left out.
ACTIONABLE_XIDS = (48, 62, 64, 74, 79, 94, 95, 119, 120)

# Clock event reasons that mean the GPU is slowed by heat or its power supply, not by policy
# (sw_power_cap is the normal state of a busy GPU at its power limit, gpu_idle of an idle one).
THROTTLE_REASONS = ("hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "sw_thermal_slowdown")


@dataclass(frozen=True)
class AlertThresholds:
    # The seed: GPU memory in use "不超过 90%, 防止 OOM" (no more than 90%, to avoid OOM). vLLM
    # allocates its whole gpu_memory_utilization share at start-up, so on a host whose engines are
    # planned above that (the seed's own 0.95) the limit is the planned share plus this margin:
    # memory beyond what the engines were given (another process, a leak) still alerts.
    gpu_memory_ratio: float = 0.90
    gpu_memory_margin: float = 0.02
    kv_cache_ratio: float = 0.90  # engine KV cache usage (0-1)
    gpu_temperature_celsius: float = 85.0  # core temperature; NVIDIA gives 90 °C as the RTX 4090's maximum
    xid_recent_s: int = 300  # an actionable XID alerts for this long after it was last seen
    gateway_limited_ratio: float = 0.10  # share of the gateway's requests answered 429
    host_memory_ratio: float = 0.90  # host memory in use (1 - MemAvailable / MemTotal)
    disk_free_ratio: float = 0.10  # free space of a filesystem below this share


DEFAULT_THRESHOLDS = AlertThresholds()
