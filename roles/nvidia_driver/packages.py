"""Which driver packages a host gets: pure functions of its settings and GPU (tested without a host)."""

from __future__ import annotations

# Architectures the open kernel modules support (Turing and newer); NVIDIA made them the default
# for all install methods from R560. Maxwell, Pascal and Volta need the proprietary modules.
OPEN_CAPABLE = frozenset({"turing", "ampere", "ada", "hopper", "blackwell"})
OPEN_DEFAULT_FROM_BRANCH = 560
DRIVER_PREFIXES = ("nvidia-", "libnvidia-", "cuda-drivers", "xserver-xorg-video-nvidia")
TOOLKIT_PACKAGES = ("nvidia-container-toolkit", "nvidia-container-toolkit-base", "libnvidia-container")


def module_flavour(setting: str, branch: int, architecture: str) -> str:
    """open or proprietary, for `nvidia_driver.kernel_modules` (auto | open | proprietary)."""
    if setting != "auto":
        return setting
    if architecture in OPEN_CAPABLE and branch >= OPEN_DEFAULT_FROM_BRANCH:
        return "open"
    return "proprietary"


def driver_packages(source: str, branch: int, flavour: str) -> list[str]:
    """The packages to install; their dependencies (kernel module, libraries, nvidia-smi,
    nvidia-persistenced) follow at the same version."""
    open_suffix = "-open" if flavour == "open" else ""
    if source == "cuda_repo":
        return [f"nvidia-open-{branch}"] if flavour == "open" else [f"cuda-drivers-{branch}"]
    # Ubuntu's archive: the headless server driver (no X) and its utilities (nvidia-smi)
    return [f"nvidia-headless-{branch}-server{open_suffix}", f"nvidia-utils-{branch}-server"]


def version_pin(version: str | None, branch: int) -> str:
    """apt preferences `Pin: version` for the driver: the exact version, else the branch."""
    return f"{version}-*" if version else f"{branch}.*"


def version_prefix(version: str | None, branch: int) -> str:
    """What an installed driver package's version must start with."""
    return f"{version}-" if version else f"{branch}."


def is_driver_package(name: str) -> bool:
    """Part of the driver (held with it), not the container toolkit whose names overlap."""
    return name.startswith(DRIVER_PREFIXES) and not name.startswith(TOOLKIT_PACKAGES)
