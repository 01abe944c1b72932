"""Fact sets for the role tests: bare and converged Ubuntu 22.04 / 24.04 GPU hosts, and the files
the roles write, as `SimHost`s (tests/unit/fakehost.py).

`expected_files` is what a converged host holds: the repository lines and daemon.json built from
the host's configuration, the role templates rendered from their source files, so the converged
fact set carries the exact content (and therefore the digests) the roles write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined

from gpufleet.fleet import FleetHost
from tests.unit.fakehost import NOW_TS, Gpu, SimFile, SimHost, cdi_spec_text, driver_closure

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "roles" / "nvidia_driver" / "templates"

UBUNTU_2204 = {"PRETTY_NAME": "Ubuntu 22.04.5 LTS", "NAME": "Ubuntu", "VERSION_ID": "22.04",
               "VERSION_CODENAME": "jammy", "ID": "ubuntu", "ID_LIKE": "debian"}
UBUNTU_2404 = {"PRETTY_NAME": "Ubuntu 24.04.1 LTS", "NAME": "Ubuntu", "VERSION_ID": "24.04",
               "VERSION_CODENAME": "noble", "ID": "ubuntu", "ID_LIKE": "debian"}
DEBIAN_11 = {"PRETTY_NAME": "Debian GNU/Linux 11 (bullseye)", "NAME": "Debian GNU/Linux", "VERSION_ID": "11",
             "VERSION_CODENAME": "bullseye", "ID": "debian"}
DEBIAN_12 = {"PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)", "NAME": "Debian GNU/Linux", "VERSION_ID": "12",
             "VERSION_CODENAME": "bookworm", "ID": "debian"}
CENTOS_9 = {"NAME": "CentOS Stream", "VERSION_ID": "9", "ID": "centos", "ID_LIKE": "rhel fedora"}
UBUNTU = {"22.04": UBUNTU_2204, "24.04": UBUNTU_2404}
KERNELS = {"22.04": "5.15.0-131-generic", "24.04": "6.8.0-51-generic", "11": "5.10.0-33-amd64", "12": "6.1.0-28-amd64",
           "9": "5.14.0-522.el9.x86_64"}

DRIVER_DEB_VERSION = "580.126.20-0ubuntu1"
APT_LOCK_WAIT_TEXT = '// Managed by gpufleet: wait for the dpkg lock rather than fail\nDPkg::Lock::Timeout "600";\n'
USER_DAEMON_KEYS = {"registry-mirrors": ["https://mirror.example.internal"]}
NVIDIA_RUNTIME = {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}
BASE_PACKAGES = ["ca-certificates", "curl", "gnupg", "kmod"]
DOCKER_CE = ["docker-ce", "docker-ce-cli", "containerd.io", "docker-buildx-plugin", "docker-compose-plugin"]
TOOLKIT = ["nvidia-container-toolkit", "nvidia-container-toolkit-base", "libnvidia-container-tools",
           "libnvidia-container1"]


def gpus(count: int = 4) -> list[Gpu]:
    return [Gpu(f"0000:{0x01 + i * 0x20:02x}:00.0") for i in range(count)]


def bare(os_release: dict[str, str] = UBUNTU_2204, gpu_count: int = 4) -> SimHost:
    """A freshly installed server: nothing of the stack, no daemon.json, nothing held, no apt stamp."""
    debian_family = os_release["ID"] in ("ubuntu", "debian")
    return SimHost(
        os_release=dict(os_release),
        kernel=KERNELS[os_release["VERSION_ID"]],
        has_apt=debian_family,
        headers_in_apt=debian_family,
        gpus=gpus(gpu_count),
        other_pci=["0000:c1:00.0 0x1a03 0x2000 0x030000"],  # the BMC's VGA (ASPEED), not an NVIDIA GPU
        modules={"ext4", "nvme"},
        dirs={"/etc/apt/sources.list.d": "755", "/etc/apt/preferences.d": "755", "/etc/apt/apt.conf.d": "755",
              "/etc/modprobe.d": "755", "/usr/share/keyrings": "755"},
    )


def render_pin(pin: str) -> str:
    source = (TEMPLATES / "gpufleet-nvidia-driver.pref.j2").read_text(encoding="utf-8")
    return Environment(undefined=StrictUndefined, keep_trailing_newline=True).from_string(source).render(pin=pin)


def gpufleet_daemon_keys(fleet_host: FleetHost) -> dict[str, Any]:
    docker = fleet_host.config.docker
    return {"log-driver": "json-file",
            "log-opts": {"max-size": docker.log_max_size, "max-file": str(docker.log_max_file)},
            "live-restore": docker.live_restore}


def expected_files(fleet_host: FleetHost, os_release: dict[str, str]) -> dict[str, str]:
    """Every file the roles write on a host with this configuration, with its content."""
    config = fleet_host.config
    distro = os_release["ID"] + os_release["VERSION_ID"].replace(".", "")
    driver = config.nvidia_driver
    pin = f"{driver.version}-*" if driver.version else f"{driver.branch}.*"
    cuda_line = (f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] "
                 f"{driver.repo_url.format(distro=distro)} /\n")
    files = {
        "/etc/apt/apt.conf.d/50gpufleet-lock-timeout": APT_LOCK_WAIT_TEXT,
        "/etc/modprobe.d/blacklist-nouveau.conf": (TEMPLATES / "blacklist-nouveau.conf").read_text(encoding="utf-8"),
        "/etc/apt/preferences.d/gpufleet-nvidia-driver": render_pin(pin),
        "/etc/apt/apt.conf.d/51gpufleet-unattended-upgrades":
            (TEMPLATES / "51gpufleet-unattended-upgrades").read_text(encoding="utf-8"),
        "/etc/apt/sources.list.d/nvidia-container-toolkit.list":
            f"deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] "
            f"{config.container_toolkit.repo_url} /\n",
    }
    if driver.source == "cuda_repo" or config.cuda.install:
        files["/etc/apt/sources.list.d/gpufleet-cuda.list"] = cuda_line
    if config.docker.source == "docker_ce":
        files["/etc/apt/sources.list.d/docker.list"] = (
            f"deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.asc] "
            f"{config.docker.repo_url.format(distro_id=os_release['ID'])} {os_release['VERSION_CODENAME']} stable\n")
    if config.cuda.install:
        version = config.cuda.version
        files["/etc/profile.d/gpufleet-cuda.sh"] = (
            "# Managed by gpufleet (role cuda)\n"
            f"export PATH=/usr/local/cuda-{version}/bin${{PATH:+:$PATH}}\n"
            f"export LD_LIBRARY_PATH=/usr/local/cuda-{version}/lib64${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\n")
    return files


def driver_metapackages(fleet_host: FleetHost) -> list[str]:
    driver = fleet_host.config.nvidia_driver
    open_modules = driver.kernel_modules == "open" or (
        driver.kernel_modules == "auto" and fleet_host.plan.gpu.architecture in {"turing", "ampere", "ada", "hopper",
                                                                                   "blackwell"})
    if driver.source == "cuda_repo":
        return [f"nvidia-open-{driver.branch}" if open_modules else f"cuda-drivers-{driver.branch}"]
    suffix = "-open" if open_modules else ""
    return [f"nvidia-headless-{driver.branch}-server{suffix}", f"nvidia-utils-{driver.branch}-server"]


def converged(fleet_host: FleetHost, os_release: dict[str, str] = UBUNTU_2204, driver_version: str | None = None,
              gpu_count: int = 4) -> SimHost:
    """A host the roles already converged: every fact answers "already done"."""
    config = fleet_host.config
    sim = bare(os_release, gpu_count)
    version = driver_version or config.nvidia_driver.version or "580.126.20"
    deb_version = f"{version}-0ubuntu1"
    for path, text in expected_files(fleet_host, os_release).items():
        sim.files[path] = SimFile(text)
    sim.files["/var/lib/apt/periodic/update-success-stamp"] = SimFile("", mtime=NOW_TS - 600)
    sim.files["/usr/share/keyrings/cuda-archive-keyring.gpg"] = SimFile("cuda keyring")
    sim.files["/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"] = SimFile(
        sim.dearmored(config.container_toolkit.gpg_key_url))
    daemon = {**USER_DAEMON_KEYS, **gpufleet_daemon_keys(fleet_host), "runtimes": NVIDIA_RUNTIME}
    sim.files["/etc/docker/daemon.json"] = SimFile(json.dumps(daemon, indent=4) + "\n")
    sim.files["/etc/cdi/nvidia.yaml"] = SimFile(cdi_spec_text(version))
    sim.dirs.update({"/etc/apt/keyrings": "755", "/etc/docker": "755", "/etc/cdi": "755"})
    packages = {name: "1.0-1ubuntu1" for name in [*BASE_PACKAGES, "dkms"]}
    packages[f"linux-headers-{sim.kernel}"] = sim.kernel.removesuffix("-generic") + ".141"
    for meta in driver_metapackages(fleet_host):
        for name in driver_closure(meta):
            packages[name] = deb_version
            sim.held.add(name)
    if config.nvidia_driver.source == "cuda_repo" or config.cuda.install:
        packages["cuda-keyring"] = "1.1-1"
    if config.docker.source == "docker_ce":
        sim.files["/etc/apt/keyrings/docker.asc"] = SimFile(
            sim.remote_key(config.docker.gpg_key_url.format(distro_id=os_release["ID"])))
        packages.update({name: "5:28.0.1-1~ubuntu.0~" + os_release["VERSION_CODENAME"] for name in DOCKER_CE})
    else:
        packages["docker.io"] = "27.5.1-0ubuntu3"
    for name in TOOLKIT:
        packages[name] = config.container_toolkit.version
        sim.held.add(name)
    if config.cuda.install:
        packages["cuda-toolkit-" + config.cuda.version.replace(".", "-")] = config.cuda.version + ".1-1"
    sim.packages = packages
    sim.services = {"docker": (True, True), "nvidia-persistenced": (True, True)}
    sim.modules |= {"nvidia", "nvidia_uvm", "nvidia_modeset"}
    sim.module_version = version
    sim.which.update({"nvidia-smi": "/usr/bin/nvidia-smi", "docker": "/usr/bin/docker",
                      "nvidia-ctk": "/usr/bin/nvidia-ctk"})
    sim.images.add(config.container_toolkit.check_image)
    sim.apt_lists = {path: file.content for path, file in sim.files.items()
                     if path.startswith("/etc/apt/sources.list.d/")}
    return sim
