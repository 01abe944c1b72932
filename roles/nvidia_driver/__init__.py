"""Role nvidia_driver: a pinned, held NVIDIA driver whose kernel module matches its libraries.

Order matters and each step changes only what differs:
1. nouveau blacklisted (initramfs rebuilt only when that file changed) and unloaded if loaded;
2. DKMS and the headers of the running kernel, so the module builds for it;
3. the source: NVIDIA's CUDA repository through its keyring package, with the repository line
   written by us (the keyring package's own line points at NVIDIA, useless to a mirror), or
   Ubuntu's archive; an apt preferences pin on the branch or exact version;
4. the packages (open or proprietary modules), held, and kept out of unattended-upgrades: an
   unattended upgrade of the libraries under a loaded module is the classic "Driver/library
   version mismatch";
5. nvidia-persistenced enabled;
6. the module loaded: `modprobe` when none is loaded; a reboot only when another version is
   loaded or nouveau still holds the GPUs, and only with `reboot: auto` (never on the machine
   pyinfra runs on); otherwise the host stops with the reason;
7. `nvidia-smi` sees the inventory's GPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.facts.server import KernelVersion, Which
from pyinfra.operations import apt, files, server, systemd
from pyinfra.operations.util import any_changed

from gpufleet.hostfacts import HeldPackages, InstalledDebVersions, LoadedKernelModules, NvidiaSmi, OsRelease
from gpufleet.hostops import (
    apt_waits_for_its_lock,
    deb_from_url,
    dpkg_consistent,
    executing,
    fail_host,
    install_pinned,
    packages_installed,
)
from roles.nvidia_driver.packages import (
    driver_packages,
    is_driver_package,
    module_flavour,
    version_pin,
    version_prefix,
)

TEMPLATES = Path(__file__).parent / "templates"
CUDA_KEYRING = "/usr/share/keyrings/cuda-archive-keyring.gpg"


@operation()
def nouveau_unloaded() -> Iterator[str]:
    """Unload nouveau if it is loaded (it fails while a console uses it: the reboot step handles that)."""
    if "nouveau" in host.get_fact(LoadedKernelModules):
        yield "modprobe -r nouveau || echo 'nouveau is in use; the driver step will ask for a reboot'"


@operation()
def driver_held(prefix: str) -> Iterator[str]:
    """Hold every installed driver package of the pinned version (the metapackage's whole closure)."""
    installed = host.get_fact(InstalledDebVersions)
    held = host.get_fact(HeldPackages)
    missing = sorted(
        name for name, version in installed.items()
        if is_driver_package(name) and version.startswith(prefix) and name not in held
    )
    if missing:
        yield f"apt-mark hold {' '.join(missing)}"


@operation()
def module_loaded() -> Iterator[str]:
    """Load the installed module when none is loaded (a fresh install needs no reboot for that)."""
    state = host.get_fact(NvidiaSmi)
    if state.status == "absent" and not executing():
        yield "modprobe nvidia && modprobe nvidia_uvm"  # predicted: the driver is not installed yet
    elif state.status == "no_driver" and "nouveau" not in host.get_fact(LoadedKernelModules):
        yield "modprobe nvidia && modprobe nvidia_uvm"


def reboot_reason() -> str | None:
    state = host.get_fact(NvidiaSmi)
    if state.status == "mismatch":
        return "the loaded NVIDIA kernel module is another version than the installed driver libraries"
    if state.status == "no_driver":
        if "nouveau" in host.get_fact(LoadedKernelModules):
            return "nouveau still holds the GPUs (it is blacklisted now; a reboot leaves it out)"
        return "the NVIDIA kernel module is not loaded and `modprobe nvidia` did not load it"
    return None


@operation()
def rebooted_if_needed(mode: str, local: bool) -> Iterator[Any]:
    """Reboot only when the module in memory cannot be made to match the installed driver otherwise."""
    if not executing():
        return
    reason = reboot_reason()
    if reason is None:
        return
    if mode == "never" or local:
        why = "this is the machine pyinfra runs on" if local else "nvidia_driver.reboot is never"
        yield fail_host(
            f"a reboot is needed: {reason}; not rebooting because {why}\n"
            f"  fix: reboot the host when convenient (drain its engines first) and run again"
            + ("" if local else ", or set nvidia_driver.reboot: auto")
        )
        return
    yield from server.reboot._inner(delay=5, interval=2, reboot_timeout=900)


@operation()
def gpus_visible(count: int, gpu_name: str) -> Iterator[Any]:
    """The first layer of the check: nvidia-smi on the host lists the inventory's GPUs."""
    if not executing():
        return
    state = host.get_fact(NvidiaSmi)
    if state.status != "ok":
        yield fail_host(f"nvidia-smi on the host: {state.status} ({state.detail or 'no output'})")
    elif len(state.gpu_names) != count or any(gpu != gpu_name for gpu in state.gpu_names):
        yield fail_host(
            f"nvidia-smi lists {len(state.gpu_names)} GPU(s) {list(state.gpu_names)}, the inventory says "
            f"{count} x {gpu_name}\n  fix: correct gpus in the inventory, or check the cards (nvidia-smi -q)"
        )


def cuda_repository(settings: Any) -> list[Any]:
    """NVIDIA's CUDA repository: its keyring package, and a repository line of ours (the keyring
    package's own line names NVIDIA's server, useless to a mirror). The cuda role uses it too."""
    distro = _repo_distro()
    return [
        deb_from_url(
            name="CUDA repository keyring", package="cuda-keyring", url=settings.keyring_url.format(distro=distro),
        ),
        files.file(
            name="drop the keyring package's repository line",
            path=f"/etc/apt/sources.list.d/cuda-{distro}-x86_64.list", present=False,
        ),
        files.put(
            name="CUDA repository",
            src=StringIO(f"deb [signed-by={CUDA_KEYRING}] {settings.repo_url.format(distro=distro)} /\n"),
            dest="/etc/apt/sources.list.d/gpufleet-cuda.list", mode="644",
        ),
    ]


def _repo_distro() -> str:
    os_info = host.get_fact(OsRelease)
    return os_info.repo_distro if os_info else "unknown"


@deploy("nvidia driver")
def apply() -> None:
    fleet_host = host.data.gpufleet
    config = fleet_host.config
    settings = config.nvidia_driver
    flavour = module_flavour(settings.kernel_modules, settings.branch, fleet_host.plan.gpu.architecture)
    packages = driver_packages(settings.source, settings.branch, flavour)
    pin = version_pin(settings.version, settings.branch)
    prefix = version_prefix(settings.version, settings.branch)

    apt_waits_for_its_lock(name="apt waits for its lock")
    dpkg_consistent(name="finish an interrupted dpkg run")
    apt.packages(name="tools the roles use", packages=["ca-certificates", "curl", "gnupg", "kmod"])

    blacklist = files.put(
        name="blacklist nouveau", src=str(TEMPLATES / "blacklist-nouveau.conf"),
        dest="/etc/modprobe.d/blacklist-nouveau.conf", mode="644",
    )
    server.shell(
        name="rebuild the initramfs without nouveau", commands=["update-initramfs -u"],
        _if=[blacklist.did_change, lambda: host.get_fact(Which, command="update-initramfs") is not None],
    )
    nouveau_unloaded(name="unload nouveau")

    apt.packages(name="DKMS and the running kernel's headers",
                 packages=["dkms", f"linux-headers-{host.get_fact(KernelVersion)}"])

    source_ops = cuda_repository(settings) if settings.source == "cuda_repo" else []
    source_ops.append(files.template(
        name="pin the driver version", src=str(TEMPLATES / "gpufleet-nvidia-driver.pref.j2"),
        dest="/etc/apt/preferences.d/gpufleet-nvidia-driver", mode="644", pin=pin,
    ))
    # also when the packages are missing: a list refresh that failed last run (a mirror mid-sync)
    # must not leave the next run unable to find them
    sources_changed = any_changed(*source_ops)
    apt.update(name="apt lists after a source change",
               _if=lambda: sources_changed() or not packages_installed(packages, prefix))

    install_pinned(name=f"driver {settings.version or settings.branch} ({flavour} modules)",
                   packages=packages, version_prefix=prefix)
    driver_held(name="hold the driver packages", prefix=prefix)
    files.put(
        name="keep the driver out of unattended-upgrades", src=str(TEMPLATES / "51gpufleet-unattended-upgrades"),
        dest="/etc/apt/apt.conf.d/51gpufleet-unattended-upgrades", mode="644",
    )
    module_loaded(name="load the NVIDIA kernel module")
    rebooted_if_needed(name="reboot if the loaded module differs", mode=settings.reboot,
                       local=config.ansible_connection == "local")
    systemd.service(name="nvidia-persistenced", service="nvidia-persistenced", running=True, enabled=True)
    gpus_visible(name="nvidia-smi sees the inventory's GPUs", count=config.gpus.count,
                 gpu_name=fleet_host.plan.gpu.name)
