"""Role gpu_exporter: `gpufleet exporter` (docs/exporter.md) as a systemd service on every GPU host.

It reads the GPUs through NVML (the driver's libnvidia-ml, installed by roles/nvidia_driver) and
serves them on `monitoring.exporter_address`. Where the engines are the simulator (the test bed,
`gpu_exporter.mode: auto` with engine.kind sim) it serves stand-in GPUs instead, labelled
mode="simulate", whose load follows each simulated instance on its own GPUs.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy

from gpufleet.fleet import FleetHost
from gpufleet.planner.reach import host_port, reach_address
from roles import agent

SERVICE = "gpufleet-gpu-exporter"


def exporter_command(fleet_host: FleetHost) -> list[str]:
    """The `gpufleet exporter` arguments for this host's settings and plan."""
    config = fleet_host.config
    monitoring, settings = config.monitoring, config.gpu_exporter
    command = [
        "exporter",
        "--listen", host_port(monitoring.exporter_address, monitoring.ports.gpu_exporter),
        "--interval", f"{settings.interval_s:g}",
    ]  # fmt: skip
    simulate = settings.mode == "simulate" or (settings.mode == "auto" and config.engine.kind == "sim")
    if not simulate:
        return command
    command += ["--simulate", str(config.gpus.count), "--simulate-gpu", config.gpus.model]
    address = reach_address(config.engine.listen_address, fleet_host, fleet_host)
    for instance in fleet_host.plan.instances:
        command += ["--engine-url", f"http://{host_port(address, instance.port)}",
                    "--engine-gpus", ",".join(str(g) for g in instance.gpus)]
    return command


@deploy("gpu exporter")
def apply() -> None:
    fleet_host = host.data.gpufleet
    uploaded = agent.install()
    agent.service(SERVICE, "gpufleet GPU exporter (NVML)", exporter_command(fleet_host), uploaded)
