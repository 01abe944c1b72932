"""Where the alert thresholds come from, and the fixed facts the rules use.

The SLO thresholds (TTFT, inter-token latency, error rate, availability) come from the
inventory's `slo` section, the GPU memory limit and GPU count of each host from its `serving`
and `gpus` sections, and the other thresholds from `monitoring.alerts` (defaults in
roles/prometheus/defaults.yml); see rules.py. XID codes and throttle reasons are facts about
NVIDIA's GPUs, not settings.
"""

from __future__ import annotations

from gpufleet.errors import ConfigError, Problem
from gpufleet.fleet import Fleet, FleetHost
from gpufleet.schema.sections import AlertThresholds

# XID codes that need an operator (NVIDIA's XID catalogue; docs/exporter.md): 48 double-bit ECC,
# 62 internal micro-controller halt, 64 ECC page retirement or row remap failure, 74 NVLink,
# 79 fallen off the bus, 94/95 contained/uncontained ECC, 119/120 GSP errors. Application XIDs
# (13, 31, 43) and informational ones (63, 92) are left out.
ACTIONABLE_XIDS = (48, 62, 64, 74, 79, 94, 95, 119, 120)

# Clock event reasons that mean the GPU is slowed by heat or its power supply, not by policy
# (sw_power_cap is the normal state of a busy GPU at its power limit, gpu_idle of an idle one).
THROTTLE_REASONS = ("hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "sw_thermal_slowdown")


def fleet_thresholds(fleet: Fleet) -> AlertThresholds:
    """The monitoring hosts' `monitoring.alerts` (role defaults unless the inventory overrides them).

    Every host carries the section (role defaults are every host's lowest layer); the monitoring
    hosts' values are the ones their Prometheus evaluates, so theirs count, and they must agree.
    """
    hosts = [h for h in fleet.hosts if h.in_group("monitoring")] or list(fleet.hosts)
    chosen = hosts[0].config.monitoring.alerts
    for other in hosts[1:]:
        if other.config.monitoring.alerts != chosen:
            origin = other.source.origin_of(("monitoring", "alerts")) or other.source.defined_at
            raise ConfigError([Problem(
                file=origin.file, line=origin.line, key="monitoring.alerts", host=other.name,
                message=f"differs from {hosts[0].name}'s; the monitoring hosts evaluate one set of rules",
                fix="set monitoring.alerts once, in group_vars/monitoring.yml",
            )])
    return chosen


def gpu_memory_limit(host: FleetHost, thresholds: AlertThresholds) -> float:
    """A GPU host's GpuMemoryHigh limit: the seed's ratio, or, where the engines are planned above it
    (vLLM takes its whole share at start-up), their planned share plus the margin."""
    share = host.config.serving.gpu_memory_utilization
    return round(max(thresholds.gpu_memory_ratio, share + thresholds.gpu_memory_margin), 4)
