"""Converge the whole fleet: pyinfra inventories/<fleet>/inventory.py deploy/site.py

Run from the repository root (pyinfra puts the working directory on the import path, which is
how `roles` is found). The inventory has already been validated and planned by the time this
runs; roles read each host's typed configuration from `host.data.gpufleet`.
"""

from pyinfra import local

from roles import host_manifest

host_manifest.apply()
local.include("deploy/gpu.py")  # GPU hosts: driver, CUDA, Docker, container toolkit
local.include("deploy/serving.py")  # GPU hosts: the engine containers
local.include("deploy/gateway.py")  # gateway hosts: nginx with API keys and limits
local.include("deploy/monitoring.py")  # exporters everywhere; Prometheus, Alertmanager, Grafana on monitoring hosts
