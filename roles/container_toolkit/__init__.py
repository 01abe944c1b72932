"""Role container_toolkit: the NVIDIA Container Toolkit, Docker's nvidia runtime, CDI, and the
layered check that containers see the GPUs.

The repository is NVIDIA's (or a mirror), its key in a keyring named by `signed-by` (apt-key is
gone in Ubuntu 24.04). The four packages are pinned to one version and held. `nvidia-ctk runtime
configure` runs only when daemon.json has no nvidia runtime, dockerd restarts only then. The CDI
spec is regenerated when it does not match the loaded driver. Last, the check the GPU Operator's
validator makes: after `nvidia-smi` on the host (nvidia_driver role), `nvidia-smi -L` inside a
container started with `--gpus all` must list the inventory's GPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from io import StringIO
from typing import Any

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.facts.server import Command
from pyinfra.operations import apt, files, systemd
from pyinfra.operations.util import any_changed

from gpufleet.hostops import (
    apt_hold,
    cdi_spec,
    docker_nvidia_runtime,
    executing,
    fail_host,
    image_present,
    keyring_from_url,
    packages_installed,
)

KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
PACKAGES = ["nvidia-container-toolkit", "nvidia-container-toolkit-base", "libnvidia-container-tools",
            "libnvidia-container1"]
CDI_SPEC = "/etc/cdi/nvidia.yaml"


@operation()
def gpus_in_containers(image: str, count: int) -> Iterator[Any]:
    """The second layer of the check: a container started with --gpus all lists the GPUs."""
    if not executing():
        return
    output = host.get_fact(
        Command, command=f"docker run --rm --gpus all {image} nvidia-smi -L 2>&1; echo rc=$?",
    ) or ""
    lines = output.strip().splitlines()
    gpus = [line for line in lines if line.startswith("GPU ")]
    if not lines or lines[-1] != "rc=0" or len(gpus) != count:
        yield fail_host(
            f"`docker run --gpus all {image} nvidia-smi -L` listed {len(gpus)} GPU(s), the inventory says {count}:\n"
            + "\n".join(f"    {line}" for line in lines[-8:])
            + "\n  fix: check `nvidia-ctk runtime configure --runtime=docker` and restart Docker; "
            "`could not select device driver` means the toolkit is missing or Docker was not restarted"
        )


@deploy("nvidia container toolkit")
def apply() -> None:
    config = host.data.gpufleet.config
    settings = config.container_toolkit
    source_ops = [
        keyring_from_url(name="toolkit repository key", url=settings.gpg_key_url, dest=KEYRING),
        files.put(
            name="toolkit repository",
            src=StringIO(f"deb [signed-by={KEYRING}] {settings.repo_url} /\n"),
            dest="/etc/apt/sources.list.d/nvidia-container-toolkit.list", mode="644",
        ),
    ]
    sources_changed = any_changed(*source_ops)
    apt.update(name="apt lists after a source change",
               _if=lambda: sources_changed() or not packages_installed(PACKAGES, settings.version))
    apt.packages(
        name=f"container toolkit {settings.version}",
        packages=[f"{name}={settings.version}" for name in PACKAGES],
        allow_downgrades=True, extra_install_args="--allow-change-held-packages",
    )
    apt_hold(name="hold the toolkit packages", packages=PACKAGES)
    runtime = docker_nvidia_runtime(name="Docker's nvidia runtime")
    systemd.service(name="restart Docker for the nvidia runtime", service="docker", restarted=True,
                    _if=runtime.did_change)
    cdi_spec(name="CDI spec", path=CDI_SPEC)
    if settings.check_image_archive:
        image_present(name="check image from its archive", image=settings.check_image,
                      archive_url=settings.check_image_archive)
    gpus_in_containers(name="containers see the GPUs", image=settings.check_image, count=config.gpus.count)
