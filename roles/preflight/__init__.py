"""Role preflight: stop a GPU host early, with the reason and the fix, when it cannot take the stack.

Checked before anything is installed: a supported OS (Ubuntu 22.04, 24.04, Debian 12), headers
for the running kernel available (DKMS builds the driver module against them), the inventory's
number of NVIDIA GPUs on the PCI bus, Secure Boot off (an unsigned DKMS module would not load),
and free disk for the driver, CUDA and engine images. Every failed check is listed at once.
The one change it makes is refreshing apt's lists (at most hourly), which the headers check needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.facts.server import Command, KernelVersion
from pyinfra.operations import apt

from gpufleet.hostfacts import FreeDiskGib, NvidiaPciDevices, OsRelease, SecureBoot
from gpufleet.hostops import executing, fail_host

SUPPORTED_OS = {("ubuntu", "22.04"), ("ubuntu", "24.04"), ("debian", "12")}
DOCKER_DATA = "/var/lib/docker"


def problems(expected_gpus: int, min_free_gib: float, driver_source: str = "cuda_repo") -> list[str]:
    """Every reason this host cannot be provisioned, each with its fix (empty: good to go)."""
    found: list[str] = []
    os_info = host.get_fact(OsRelease)
    if os_info is None or (os_info.id, os_info.version_id) not in SUPPORTED_OS:
        label = os_info.label if os_info else "unknown (no /etc/os-release)"
        found.append(f"unsupported OS {label}; fix: use Ubuntu 22.04, Ubuntu 24.04 or Debian 12")
    elif driver_source == "distro" and os_info.id != "ubuntu":
        found.append(
            f"nvidia_driver.source is distro, but {os_info.label}'s archive has no nvidia-*-server driver packages; "
            "fix: set nvidia_driver.source: cuda_repo"
        )
    kernel = host.get_fact(KernelVersion)
    headers = f"linux-headers-{kernel}"
    policy = host.get_fact(
        Command, command=f"apt-cache policy {headers} 2>/dev/null | grep -E 'Candidate|Installed' || true"
    )
    if not policy or all(line.split(":", 1)[-1].strip() in ("", "(none)") for line in policy.splitlines()):
        found.append(
            f"no {headers} for the running kernel {kernel} in the configured apt sources, so DKMS cannot build "
            f"the driver module; fix: boot a kernel whose headers your mirror has (apt-cache search linux-headers), "
            f"or add the kernel's headers to the mirror"
        )
    gpus = host.get_fact(NvidiaPciDevices)
    if len(gpus) != expected_gpus:
        listed = ", ".join(f"{d.address} ({d.device})" for d in gpus) or "none"
        found.append(
            f"the inventory says gpus.count {expected_gpus}, the PCI bus has {len(gpus)} NVIDIA GPU(s): {listed}; "
            f"fix: correct gpus.count in the inventory, or reseat/enable the missing cards (lspci -d 10de:)"
        )
    if host.get_fact(SecureBoot) == "enabled":
        found.append(
            "Secure Boot is enabled, so the DKMS-built (unsigned) NVIDIA module would not load; fix: disable "
            "Secure Boot in the firmware, or enroll a machine owner key (mokutil --import) that signs DKMS modules"
        )
    for path in ("/", DOCKER_DATA):
        free = host.get_fact(FreeDiskGib, path=path)
        if free is not None and free < min_free_gib:
            found.append(
                f"{free:.1f} GiB free for {path}, {min_free_gib:g} GiB needed; fix: free space or grow the disk "
                f"(or lower preflight.min_free_disk_gib)"
            )
    return found


def _has_apt() -> bool:
    """Only on a supported (Debian-family) OS: elsewhere the checks must say so, not apt-get fail."""
    os_info = host.get_fact(OsRelease)
    return os_info is not None and os_info.id in {os_id for os_id, _ in SUPPORTED_OS}


@operation()
def checks(expected_gpus: int, min_free_gib: float, driver_source: str) -> Iterator[Any]:
    """Fail the host with every problem found (checked when the run executes, after apt's refresh)."""
    if not executing():
        return
    found = problems(expected_gpus, min_free_gib, driver_source)
    if found:
        yield fail_host("preflight failed:\n" + "\n".join(f"  - {line}" for line in found))


@deploy("preflight")
def apply() -> None:
    config = host.data.gpufleet.config
    apt.update(name="refresh apt lists (hourly at most)", cache_time=3600, _if=_has_apt)
    checks(
        name="preflight checks",
        expected_gpus=config.gpus.count,
        min_free_gib=config.preflight.min_free_disk_gib,
        driver_source=config.nvidia_driver.source,
    )
