"""Role cuda: the CUDA toolkit on the host, optional (engines bring their own CUDA in the image).

Installed from NVIDIA's CUDA repository (set up as the nvidia_driver role does, so it also works
when the driver comes from Ubuntu's archive), as `cuda-toolkit-<major>-<minor>`: the package name
pins the release, so no upgrade moves it to another one. /etc/profile.d puts nvcc on PATH.
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files
from pyinfra.operations.util import any_changed

from gpufleet.hostops import packages_installed
from roles.nvidia_driver import cuda_repository


def toolkit_package(version: str) -> str:
    """cuda-toolkit-12-8 for "12.8"."""
    return "cuda-toolkit-" + version.replace(".", "-")


@deploy("cuda toolkit")
def apply() -> None:
    config = host.data.gpufleet.config
    if not config.cuda.install:
        return
    version = config.cuda.version
    source_ops = cuda_repository(config.nvidia_driver)
    sources_changed = any_changed(*source_ops)
    apt.update(name="apt lists after a source change",
               _if=lambda: sources_changed() or not packages_installed([toolkit_package(version)]))
    apt.packages(name=f"CUDA toolkit {version}", packages=[toolkit_package(version)], no_recommends=True)
    files.put(
        name="CUDA on PATH",
        src=StringIO(
            "# Managed by gpufleet (role cuda)\n"
            f"export PATH=/usr/local/cuda-{version}/bin${{PATH:+:$PATH}}\n"
            f"export LD_LIBRARY_PATH=/usr/local/cuda-{version}/lib64${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\n"
        ),
        dest="/etc/profile.d/gpufleet-cuda.sh", mode="644",
    )
