"""A host's variables as one typed model: connection settings plus the gpufleet sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gpufleet.schema.sections import (
    ContainerToolkit,
    Cuda,
    Docker,
    Engine,
    Gateway,
    GpuExporter,
    Gpus,
    Layout,
    Limits,
    Model,
    Monitoring,
    NvidiaDriver,
    Port,
    Preflight,
    Section,
    Serving,
    Slo,
)

# Groups that give a host its roles. A host must be in at least one (directly or through a child).
ROLE_GROUPS = ("gpu", "gateway", "monitoring")

# Sections a host of each role group must have after defaults are merged.
REQUIRED_BY_GROUP: dict[str, tuple[str, ...]] = {
    "gpu": ("gpus", "engine", "model", "serving", "layout", "limits", "slo", "monitoring", "gpu_exporter"),
    "gateway": ("gateway", "slo", "monitoring"),
    "monitoring": ("monitoring", "slo"),
}


class HostVars(Section):
    """Everything one host's merged variables may say."""

    ansible_host: str | None = Field(default=None, description="address pyinfra connects to (ssh_hostname)")
    ansible_port: Port | None = Field(default=None, description="SSH port (ssh_port)")
    ansible_user: str | None = Field(default=None, description="SSH user (ssh_user)")
    ansible_ssh_private_key_file: str | None = Field(default=None, description="SSH private key (ssh_key)")
    ansible_become: bool | None = Field(default=None, description="run operations with sudo (_sudo)")
    ansible_connection: Literal["ssh", "local", "docker"] | None = Field(
        default=None, description="ssh (default), local, or docker (ansible_host names the container)"
    )

    gpus: Gpus | None = Field(default=None, description="the host's GPUs")
    engine: Engine | None = Field(default=None, description="the inference engine")
    model: Model | None = Field(default=None, description="the served model")
    serving: Serving | None = Field(default=None, description="engine scheduler and memory settings")
    layout: Layout | None = Field(default=None, description="instances and their GPUs")
    limits: Limits | None = Field(default=None, description="container cgroup limits per instance")
    gateway: Gateway | None = Field(default=None, description="the nginx gateway")
    slo: Slo | None = Field(default=None, description="service level objectives")
    monitoring: Monitoring | None = Field(default=None, description="monitoring services")
    gpu_exporter: GpuExporter | None = Field(default=None, description="the GPU exporter on GPU hosts")
    preflight: Preflight | None = Field(default=None, description="checks before a GPU host is touched")
    nvidia_driver: NvidiaDriver | None = Field(default=None, description="NVIDIA driver packages")
    cuda: Cuda | None = Field(default=None, description="CUDA toolkit")
    container_toolkit: ContainerToolkit | None = Field(default=None, description="NVIDIA container toolkit")
    docker: Docker | None = Field(default=None, description="Docker engine")
