"""The host roles (deploy/gpu.py) against pyinfra's @fake connector: the exact commands a bare
Ubuntu 22.04 / 24.04 GPU host gets, none on a converged one, and the behaviour around failures,
reboots and the settings that change what is installed.

The hosts are simulated (tests/unit/fakehost.py): facts answer from the host's state, and the
changing commands change it, since pyinfra 3 reads facts again when it executes each operation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from gpufleet.fleet import FleetHost, load_fleet
from tests.unit import factsets
from tests.unit.factsets import UBUNTU, UBUNTU_2204, UBUNTU_2404
from tests.unit.fakehost import HostRun, SimFile, run_deploy, run_one, with_config

REPO = Path(__file__).resolve().parents[2]

APT = (
    'DEBIAN_FRONTEND=noninteractive apt-get -y -o Dpkg::Options::="--force-confdef" '
    '-o Dpkg::Options::="--force-confold"'
)
PINNED_INSTALL = (
    "DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Options::=--force-confdef "
    "-o Dpkg::Options::=--force-confold --allow-downgrades --allow-change-held-packages"
)
CUDA_REPOS = "https://developer.download.nvidia.com/compute/cuda/repos"
TOOLKIT_KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
REBOOT = "( sleep 1 && reboot ) </dev/null >/dev/null 2>&1 &"
SMI_FACT = "nvidia-smi --query-gpu=driver_version,name"
CHECK_HOST = "nvidia driver | nvidia-smi sees the inventory's GPUs"
CHECK_CONTAINERS = "nvidia container toolkit | containers see the GPUs"
DRIVER_580_OPEN = ("libnvidia-compute-580 nvidia-compute-utils-580 nvidia-dkms-580-open nvidia-driver-580-open "
                   "nvidia-kernel-source-580-open nvidia-open-580 nvidia-utils-580")
HF_TOKEN = "/etc/gpufleet/secrets/hf_token"
TOOLKIT = "nvidia-container-toolkit nvidia-container-toolkit-base libnvidia-container-tools libnvidia-container1"


@pytest.fixture(scope="module")
def gpu01() -> FleetHost:
    return load_fleet(REPO / "inventories" / "example", check_secrets=False).host("gpu-01")


@pytest.fixture(scope="module")
def gpu02() -> FleetHost:
    return load_fleet(REPO / "inventories" / "example", check_secrets=False).host("gpu-02")


def put(path: str, mode: str = "644") -> list[str]:
    """What pyinfra runs to write a file: the upload, then its mode."""
    return [f"upload {path}", f"chmod {mode} {path}"]


def bare_changes(version_id: str) -> list[str]:
    """The changing commands, in order, that a bare host gets from deploy/gpu.py with the example inventory."""
    distro = "ubuntu" + version_id.replace(".", "")
    kernel = factsets.KERNELS[version_id]
    return [
        # preflight
        "apt-get update",
        "touch /var/lib/apt/periodic/update-success-stamp",
        # nvidia_driver
        *put("/etc/apt/apt.conf.d/50gpufleet-lock-timeout"),
        f"{APT} install ca-certificates curl gnupg kmod",
        *put("/etc/modprobe.d/blacklist-nouveau.conf"),
        "update-initramfs -u",
        f"{APT} install dkms linux-headers-{kernel}",
        "curl -fsSL --retry 3 -o /tmp/gpufleet-cuda-keyring.deb "
        f"{CUDA_REPOS}/{distro}/x86_64/cuda-keyring_1.1-1_all.deb"
        " && dpkg -i /tmp/gpufleet-cuda-keyring.deb && rm -f /tmp/gpufleet-cuda-keyring.deb",
        f"rm -f /etc/apt/sources.list.d/cuda-{distro}-x86_64.list",
        *put("/etc/apt/sources.list.d/gpufleet-cuda.list"),
        *put("/etc/apt/preferences.d/gpufleet-nvidia-driver"),
        "apt-get update",
        f"{PINNED_INSTALL} nvidia-open-580",
        f"apt-mark hold {DRIVER_580_OPEN}",
        *put("/etc/apt/apt.conf.d/51gpufleet-unattended-upgrades"),
        "modprobe nvidia && modprobe nvidia_uvm",
        "systemctl start nvidia-persistenced.service",
        "systemctl enable nvidia-persistenced.service",
        # docker
        "mkdir -p /etc/apt/keyrings",
        "chmod 755 /etc/apt/keyrings",
        "curl -sSLf https://download.docker.com/linux/ubuntu/gpg -o /tmp/pyinfra-TMP",
        "mv /tmp/pyinfra-TMP /etc/apt/keyrings/docker.asc",
        "chmod 644 /etc/apt/keyrings/docker.asc",
        *put("/etc/apt/sources.list.d/docker.list"),
        "apt-get update",
        f"{APT} install docker-ce docker-ce-cli containerd.io docker-buildx-plugin docker-compose-plugin",
        "mkdir -p /etc/docker",
        "chmod 755 /etc/docker",
        *put("/etc/docker/daemon.json"),
        "systemctl restart docker.service",
        # container_toolkit
        f"mkdir -p /usr/share/keyrings && curl -fsSL --retry 3 https://nvidia.github.io/libnvidia-container/gpgkey"
        f" | gpg --dearmor --yes -o {TOOLKIT_KEYRING}.tmp && chmod 644 {TOOLKIT_KEYRING}.tmp"
        f" && mv {TOOLKIT_KEYRING}.tmp {TOOLKIT_KEYRING}",
        *put("/etc/apt/sources.list.d/nvidia-container-toolkit.list"),
        "apt-get update",
        f"{APT} install --allow-downgrades --allow-change-held-packages " + " ".join(
            f"{name}=1.19.1-1" for name in TOOLKIT.split()),
        f"apt-mark hold {TOOLKIT}",
        "nvidia-ctk runtime configure --runtime=docker --config=/etc/docker/daemon.json",
        "systemctl restart docker.service",
        "mkdir -p /etc/cdi && nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml",
    ]


def assert_layered_checks_passed(run: HostRun, image: str = "nvidia/cuda:12.8.1-base-ubuntu22.04") -> None:
    """Both layers ran at execute time and passed: nvidia-smi on the host, nvidia-smi -L in a container."""
    assert run.op(CHECK_HOST).success is True
    assert any(SMI_FACT in command for command in run.commands_of(CHECK_HOST))
    assert run.op(CHECK_CONTAINERS).success is True
    assert f"docker run --rm --gpus all {image} nvidia-smi -L 2>&1; echo rc=$?" in run.commands_of(CHECK_CONTAINERS)


def assert_clean(run: HostRun) -> None:
    assert not run.failed, run.failure
    assert run.sim.unhandled == []


# 1. a bare host ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version_id", ["22.04", "24.04"])
def test_bare_ubuntu_gets_exactly_these_commands(gpu01: FleetHost, version_id: str) -> None:
    run = run_one(gpu01, factsets.bare(UBUNTU[version_id]))
    assert_clean(run)
    assert run.changes == bare_changes(version_id)
    assert_layered_checks_passed(run)


@pytest.mark.parametrize(("os_release", "distro", "codename"),
                         [(UBUNTU_2204, "ubuntu2204", "jammy"), (UBUNTU_2404, "ubuntu2404", "noble")])
def test_bare_ubuntu_repository_lines_and_pin(gpu01: FleetHost, os_release: dict, distro: str, codename: str) -> None:
    run = run_one(gpu01, factsets.bare(os_release))
    assert run.uploads["/etc/apt/sources.list.d/gpufleet-cuda.list"] == (
        f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {CUDA_REPOS}/{distro}/x86_64/ /\n")
    assert run.uploads["/etc/apt/sources.list.d/docker.list"] == (
        f"deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/ubuntu {codename} "
        "stable\n")
    assert run.uploads["/etc/apt/sources.list.d/nvidia-container-toolkit.list"] == (
        f"deb [signed-by={TOOLKIT_KEYRING}] https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /\n")
    pin = run.uploads["/etc/apt/preferences.d/gpufleet-nvidia-driver"].splitlines()
    assert "Package: nvidia-* libnvidia-* cuda-drivers* xserver-xorg-video-nvidia*" in pin
    assert "Pin: version 580.126.20-*" in pin
    assert "Pin-Priority: 1001" in pin
    assert json.loads(run.uploads["/etc/docker/daemon.json"]) == {
        "log-driver": "json-file", "log-opts": {"max-size": "100m", "max-file": "3"}, "live-restore": True}
    # every file the roles wrote is the one a converged host holds (the converged fact sets rely on it)
    assert {path: run.sim.files[path].content for path in factsets.expected_files(gpu01, os_release)} == (
        factsets.expected_files(gpu01, os_release))
    # what the run left: the driver and the toolkit held at their pinned versions, the runtime, the spec
    assert run.sim.packages["nvidia-open-580"] == "580.126.20-0ubuntu1"
    assert set(DRIVER_580_OPEN.split()) | set(TOOLKIT.split()) <= run.sim.held
    assert run.sim.json_file("/etc/docker/daemon.json")["runtimes"]["nvidia"]["path"] == "nvidia-container-runtime"
    assert "libnvidia-ml.so.580.126.20" in run.sim.files["/etc/cdi/nvidia.yaml"].content
    assert "/etc/apt/sources.list.d/cuda-" + distro + "-x86_64.list" not in run.sim.files
    assert run.sim.reboots == 0  # a fresh install loads the module with modprobe, no reboot


# 2. a converged host ----------------------------------------------------------------------------


@pytest.mark.parametrize("version_id", ["22.04", "24.04"])
def test_converged_ubuntu_gets_no_change(gpu01: FleetHost, version_id: str) -> None:
    sim = factsets.converged(gpu01, UBUNTU[version_id])
    daemon = sim.json_file("/etc/docker/daemon.json")
    assert {"log-driver", "live-restore", "runtimes", "registry-mirrors"} <= set(daemon)  # ours, nvidia's, a user's
    run = run_one(gpu01, sim)
    assert_clean(run)
    assert run.changes == []
    assert run.changed_ops == []
    assert run.ops and all(op.did_change is False for op in run.ops), [(op.name, op.did_change) for op in run.ops]
    assert_layered_checks_passed(run)
    assert sim.json_file("/etc/docker/daemon.json") == daemon


@pytest.mark.parametrize("version_id", ["22.04", "24.04"])
def test_second_run_after_a_bare_install_changes_nothing(gpu01: FleetHost, version_id: str) -> None:
    first = run_one(gpu01, factsets.bare(UBUNTU[version_id]))
    assert_clean(first)
    second = run_one(gpu01, first.sim)
    assert_clean(second)
    assert second.changes == []
    assert all(op.did_change is False for op in second.ops)


# 3. behaviour -----------------------------------------------------------------------------------


def test_preflight_fails_only_the_host_with_missing_gpus(gpu01: FleetHost, gpu02: FleetHost) -> None:
    run = run_deploy({"gpu-01": (gpu01, factsets.bare(UBUNTU_2204)),
                      "gpu-02": (gpu02, factsets.bare(UBUNTU_2204, gpu_count=2))})
    bad, good = run["gpu-02"], run["gpu-01"]
    assert bad.failed
    assert "the inventory says gpus.count 4, the PCI bus has 2 NVIDIA GPU(s)" in bad.failure
    assert "0000:01:00.0 (0x2685), 0000:21:00.0 (0x2685)" in bad.failure
    assert bad.changes == ["apt-get update", "touch /var/lib/apt/periodic/update-success-stamp"]  # preflight's own
    assert all(op.did_change is None for op in bad.ops if not op.name.startswith("preflight"))
    assert_clean(good)
    assert good.changes == bare_changes("22.04")
    assert_layered_checks_passed(good)


def test_secure_boot_enabled_fails_with_mokutil(gpu01: FleetHost) -> None:
    sim = factsets.bare(UBUNTU_2404)
    sim.secure_boot = "enabled"
    run = run_one(gpu01, sim)
    assert run.failed
    assert "Secure Boot is enabled" in run.failure
    assert "mokutil" in run.failure
    assert "apt-get install" not in "\n".join(run.changes)


@pytest.mark.parametrize(("os_release", "label"), [(factsets.DEBIAN_11, "unsupported OS debian 11"),
                                                   (factsets.CENTOS_9, "unsupported OS centos 9")])
def test_unsupported_os_fails_with_the_reason(gpu01: FleetHost, os_release: dict, label: str) -> None:
    run = run_one(gpu01, factsets.bare(os_release))
    assert run.failed
    assert label in run.failure
    assert "Ubuntu 22.04, Ubuntu 24.04 or Debian 12" in run.failure
    assert not any(" install " in command for command in run.changes)


def test_bare_debian_12_uses_debian_repositories(gpu01: FleetHost) -> None:
    run = run_one(gpu01, factsets.bare(factsets.DEBIAN_12))
    assert_clean(run)
    assert run.uploads["/etc/apt/sources.list.d/gpufleet-cuda.list"] == (
        f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {CUDA_REPOS}/debian12/x86_64/ /\n")
    assert run.uploads["/etc/apt/sources.list.d/docker.list"] == (
        "deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/debian bookworm "
        "stable\n")
    assert "curl -sSLf https://download.docker.com/linux/debian/gpg -o /tmp/pyinfra-TMP" in run.changes
    assert f"{APT} install dkms linux-headers-6.1.0-28-amd64" in run.changes
    assert_layered_checks_passed(run)


def test_distro_driver_on_debian_fails_in_preflight(gpu01: FleetHost) -> None:
    run = run_one(with_config(gpu01, nvidia_driver={"source": "distro"}), factsets.bare(factsets.DEBIAN_12))
    assert run.failed
    assert "nvidia_driver.source is distro, but debian 12's archive has no nvidia-*-server driver packages" in (
        run.failure)
    assert "fix: set nvidia_driver.source: cuda_repo" in run.failure
    assert run.changes == ["apt-get update", "touch /var/lib/apt/periodic/update-success-stamp"]


def test_loaded_nouveau_is_unloaded_before_the_driver(gpu01: FleetHost) -> None:
    sim = factsets.bare(UBUNTU_2204)
    sim.modules.add("nouveau")
    run = run_one(gpu01, sim)
    assert_clean(run)
    unload = "modprobe -r nouveau || echo 'nouveau is in use; the driver step will ask for a reboot'"
    assert run.changes.count(unload) == 1
    expected = bare_changes("22.04")
    expected.insert(expected.index("update-initramfs -u") + 1, unload)
    assert run.changes == expected
    assert sim.reboots == 0


def _nouveau_stuck(gpu01: FleetHost, **config: object) -> HostRun:
    sim = factsets.bare(UBUNTU_2204)
    sim.modules.add("nouveau")
    sim.nouveau_busy = True  # a console holds it: `modprobe -r` fails, the driver cannot bind until a reboot
    return run_one(with_config(gpu01, **config), sim)


def test_nouveau_still_loaded_with_reboot_never_fails_with_the_fix(gpu01: FleetHost) -> None:
    run = _nouveau_stuck(gpu01, nvidia_driver={"reboot": "never"})
    assert run.failed
    assert "a reboot is needed: nouveau still holds the GPUs" in run.failure
    assert "not rebooting because nvidia_driver.reboot is never" in run.failure
    assert "fix: reboot the host when convenient" in run.failure
    assert "or set nvidia_driver.reboot: auto" in run.failure
    assert REBOOT not in run.changes
    assert "modprobe nvidia && modprobe nvidia_uvm" not in run.changes  # nouveau has the GPUs
    assert run.sim.reboots == 0


def test_nouveau_still_loaded_with_reboot_auto_reboots_and_converges(gpu01: FleetHost) -> None:
    run = _nouveau_stuck(gpu01)
    assert_clean(run)
    assert run.changes.count(REBOOT) == 1
    assert run.changes.index(REBOOT) > run.changes.index(f"{PINNED_INSTALL} nvidia-open-580")
    assert run.sim.reboots == 1
    assert "nouveau" not in run.sim.modules
    assert_layered_checks_passed(run)


def test_local_connection_never_reboots_the_control_node(gpu01: FleetHost) -> None:
    run = _nouveau_stuck(gpu01, ansible_connection="local")  # reboot: auto, but pyinfra runs on this machine
    assert run.failed
    assert "a reboot is needed" in run.failure
    assert "not rebooting because this is the machine pyinfra runs on" in run.failure
    assert REBOOT not in run.changes
    assert run.sim.reboots == 0


def test_driver_library_mismatch_with_reboot_auto_reboots(gpu01: FleetHost) -> None:
    sim = factsets.converged(gpu01, UBUNTU_2204)
    sim.module_version = "580.105.08"  # libraries upgraded under a loaded module
    assert "Driver/library version mismatch" in sim.smi()[0]
    run = run_one(gpu01, sim)
    assert_clean(run)
    assert run.changes == [REBOOT]
    assert sim.reboots == 1
    assert_layered_checks_passed(run)


def test_driver_library_mismatch_with_reboot_never_fails(gpu01: FleetHost) -> None:
    sim = factsets.converged(gpu01, UBUNTU_2204)
    sim.module_version = "580.105.08"
    run = run_one(with_config(gpu01, nvidia_driver={"reboot": "never"}), sim)
    assert run.failed
    assert "a reboot is needed: the loaded NVIDIA kernel module is another version" in run.failure
    assert run.changes == []


def test_proprietary_modules_install_cuda_drivers(gpu01: FleetHost) -> None:
    run = run_one(with_config(gpu01, nvidia_driver={"kernel_modules": "proprietary"}), factsets.bare(UBUNTU_2204))
    assert_clean(run)
    assert f"{PINNED_INSTALL} cuda-drivers-580" in run.changes
    assert not any("nvidia-open" in command for command in run.changes if "install" in command)
    hold = next(command for command in run.changes if command.startswith("apt-mark hold") and "cuda-drivers" in command)
    assert hold == ("apt-mark hold cuda-drivers-580 libnvidia-compute-580 nvidia-compute-utils-580 nvidia-dkms-580 "
                    "nvidia-driver-580 nvidia-kernel-source-580 nvidia-utils-580")


def test_distro_driver_on_ubuntu_uses_the_archive_without_the_cuda_repository(gpu01: FleetHost) -> None:
    run = run_one(with_config(gpu01, nvidia_driver={"source": "distro"}), factsets.bare(UBUNTU_2404))
    assert_clean(run)
    assert f"{PINNED_INSTALL} nvidia-headless-580-server-open nvidia-utils-580-server" in run.changes
    assert not any("developer.download.nvidia.com" in command or "cuda-keyring" in command for command in run.changes)
    assert "/etc/apt/sources.list.d/gpufleet-cuda.list" not in run.uploads
    assert "Pin: version 580.126.20-*" in run.uploads["/etc/apt/preferences.d/gpufleet-nvidia-driver"]
    assert_layered_checks_passed(run)


def test_invalid_daemon_json_fails_the_host_and_is_not_rewritten(gpu01: FleetHost) -> None:
    sim = factsets.converged(gpu01, UBUNTU_2204)
    broken = '{"log-driver": "json-file",\n'
    sim.files["/etc/docker/daemon.json"] = SimFile(broken)
    run = run_one(gpu01, sim)
    assert run.failed
    assert "/etc/docker/daemon.json is not a JSON object" in run.failure
    assert "fix: repair or remove /etc/docker/daemon.json" in run.failure
    assert sim.files["/etc/docker/daemon.json"].content == broken
    assert not any("daemon.json" in command for command in run.changes)
    assert run.changes == []


def test_distro_docker_installs_docker_io_without_dockers_repository(gpu01: FleetHost) -> None:
    run = run_one(with_config(gpu01, docker={"source": "distro"}), factsets.bare(UBUNTU_2204))
    assert_clean(run)
    assert f"{APT} install docker.io" in run.changes
    assert not any("download.docker.com" in command or "docker-ce" in command for command in run.changes)
    assert "/etc/apt/sources.list.d/docker.list" not in run.uploads
    assert "/etc/apt/keyrings/docker.asc" not in run.sim.files
    assert_layered_checks_passed(run)


def test_cuda_install_adds_the_toolkit_and_its_profile(gpu01: FleetHost) -> None:
    run = run_one(with_config(gpu01, cuda={"install": True}), factsets.bare(UBUNTU_2204))
    assert_clean(run)
    assert f"{APT} install --no-install-recommends cuda-toolkit-12-8" in run.changes
    assert run.uploads["/etc/profile.d/gpufleet-cuda.sh"] == (
        "# Managed by gpufleet (role cuda)\n"
        "export PATH=/usr/local/cuda-12.8/bin${PATH:+:$PATH}\n"
        "export LD_LIBRARY_PATH=/usr/local/cuda-12.8/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n")
    assert sum("cuda-keyring" in command for command in run.changes) == 1  # the repository is set up once
    assert run.changes.index(f"{APT} install --no-install-recommends cuda-toolkit-12-8") > run.changes.index(
        f"{PINNED_INSTALL} nvidia-open-580")


def test_cuda_install_with_distro_driver_sets_up_the_cuda_repository(gpu01: FleetHost) -> None:
    config = with_config(gpu01, cuda={"install": True}, nvidia_driver={"source": "distro"})
    run = run_one(config, factsets.bare(UBUNTU_2404))
    assert_clean(run)
    assert run.uploads["/etc/apt/sources.list.d/gpufleet-cuda.list"] == (
        f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {CUDA_REPOS}/ubuntu2404/x86_64/ /\n")
    keyring = next(i for i, command in enumerate(run.changes) if "cuda-keyring" in command)
    assert keyring > run.changes.index(f"{PINNED_INSTALL} nvidia-headless-580-server-open nvidia-utils-580-server")
    assert f"{APT} install --no-install-recommends cuda-toolkit-12-8" in run.changes


def test_converged_with_cuda_installed_gets_no_change(gpu01: FleetHost) -> None:
    config = with_config(gpu01, cuda={"install": True})
    run = run_one(config, factsets.converged(config, UBUNTU_2404))
    assert_clean(run)
    assert run.changes == []


def test_changed_pin_downgrades_the_held_driver(gpu01: FleetHost) -> None:
    sim = factsets.converged(gpu01, UBUNTU_2204)  # 580.126.20 installed, held and loaded
    run = run_one(with_config(gpu01, nvidia_driver={"version": "580.105.08"}), sim)
    assert_clean(run)
    assert run.changes == [
        *put("/etc/apt/preferences.d/gpufleet-nvidia-driver"),
        "apt-get update",
        f"{PINNED_INSTALL} nvidia-open-580",
        REBOOT,  # the 580.126.20 module is loaded under 580.105.08 libraries
        "mkdir -p /etc/cdi && nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml",  # the spec named 580.126.20
    ]
    assert "Pin: version 580.105.08-*" in run.uploads["/etc/apt/preferences.d/gpufleet-nvidia-driver"]
    assert sim.packages["nvidia-open-580"] == "580.105.08-0ubuntu1"
    assert "nvidia-open-580" in sim.held
    assert "libnvidia-ml.so.580.105.08" in sim.files["/etc/cdi/nvidia.yaml"].content
    assert_layered_checks_passed(run)


def test_every_preflight_problem_is_listed_at_once(gpu01: FleetHost) -> None:
    sim = factsets.bare(UBUNTU_2204, gpu_count=3)
    sim.secure_boot = "enabled"
    sim.headers_in_apt = False
    sim.free_kib = 5 * 1024 * 1024
    run = run_one(gpu01, sim)
    assert run.failed
    for problem in ("no linux-headers-5.15.0-131-generic for the running kernel 5.15.0-131-generic",
                    "the inventory says gpus.count 4, the PCI bus has 3 NVIDIA GPU(s)",
                    "Secure Boot is enabled",
                    "5.0 GiB free for /, 20 GiB needed",
                    "5.0 GiB free for /var/lib/docker, 20 GiB needed"):
        assert problem in run.failure
    assert run.changes == ["apt-get update", "touch /var/lib/apt/periodic/update-success-stamp"]


def test_interrupted_dpkg_run_is_finished_first(gpu01: FleetHost) -> None:
    sim = factsets.converged(gpu01, UBUNTU_2404)
    sim.dpkg_audit = ["The following packages are only half configured, probably due to problems",
                      " nvidia-dkms-580-open  NVIDIA DKMS package (open kernel module)"]
    run = run_one(gpu01, sim)
    assert_clean(run)
    assert len(run.changes) == 1
    # waits for a still-running apt/dpkg (an interrupted run's), then configures what is left
    assert run.changes[0].startswith("for i in $(seq 600); do pgrep -x 'apt|apt-get|dpkg|unattended-upgr'")
    assert run.changes[0].endswith("then DEBIAN_FRONTEND=noninteractive dpkg --configure -a; fi")


def test_gpus_of_another_model_fail_the_host_check(gpu01: FleetHost) -> None:
    sim = factsets.converged(gpu01, UBUNTU_2204)
    for gpu in sim.gpus:
        gpu.name = "NVIDIA GeForce RTX 4090"
    run = run_one(gpu01, sim)
    assert run.failed
    assert ("nvidia-smi lists 4 GPU(s) ['NVIDIA GeForce RTX 4090', 'NVIDIA GeForce RTX 4090', "
            "'NVIDIA GeForce RTX 4090', 'NVIDIA GeForce RTX 4090'], the inventory says 4 x NVIDIA GeForce RTX 4090 D"
            ) in run.failure
    assert run.op(CHECK_HOST).success is False
    assert run.op(CHECK_CONTAINERS).success is None  # the host stopped at the first layer


def test_containers_without_gpus_fail_the_second_layer(gpu01: FleetHost) -> None:
    sim = factsets.converged(gpu01, UBUNTU_2204)
    sim.responses["docker run --rm --gpus all"] = [
        'docker: Error response from daemon: could not select device driver "" with capabilities: [[gpu]].', "rc=125"]
    run = run_one(gpu01, sim)
    assert run.failed
    assert run.op(CHECK_HOST).success is True
    assert run.op(CHECK_CONTAINERS).success is False
    assert ("`docker run --gpus all nvidia/cuda:12.8.1-base-ubuntu22.04 nvidia-smi -L` listed 0 GPU(s), "
            "the inventory says 4") in run.failure
    assert "could not select device driver" in run.failure
    assert "nvidia-ctk runtime configure --runtime=docker" in run.failure
    assert run.changes == []


def test_check_image_is_loaded_from_its_archive_only_when_missing(gpu01: FleetHost) -> None:
    archive = "https://mirror.example.internal/images/cuda-12.8.1-base.tar"
    config = with_config(gpu01, container_toolkit={"check_image_archive": archive})
    sim = factsets.converged(config, UBUNTU_2204)
    sim.images.clear()
    first = run_one(config, sim)
    assert_clean(first)
    assert first.changes == [f"curl -fsSL --retry 3 {archive} | docker load"]
    assert run_one(config, sim).changes == []


@pytest.mark.parametrize(("repository", "source_file", "install"), [
    (f"{CUDA_REPOS}/ubuntu2204/x86_64/", "gpufleet-cuda.list", f"{PINNED_INSTALL} nvidia-open-580"),
    ("https://download.docker.com/linux/ubuntu", "docker.list", f"{APT} install docker-ce docker-ce-cli containerd.io"
     " docker-buildx-plugin docker-compose-plugin"),
    ("https://nvidia.github.io/libnvidia-container/", "nvidia-container-toolkit.list",
     f"{APT} install --allow-downgrades --allow-change-held-packages nvidia-container-toolkit=1.19.1-1"
     " nvidia-container-toolkit-base=1.19.1-1 libnvidia-container-tools=1.19.1-1 libnvidia-container1=1.19.1-1"),
], ids=["cuda", "docker", "toolkit"])
def test_a_run_stopped_by_a_failed_list_refresh_recovers_on_the_next_run(
        gpu01: FleetHost, repository: str, source_file: str, install: str) -> None:
    sim = factsets.bare(UBUNTU_2204)
    sim.broken_repos.add(repository)  # the repository's mirror is mid-sync: Hash Sum mismatch
    first = run_one(gpu01, sim)
    assert first.failed
    assert "Hash Sum mismatch" in first.failure
    assert f"/etc/apt/sources.list.d/{source_file}" in sim.files  # written before the refresh failed
    assert install not in first.changes
    sim.broken_repos.clear()  # the mirror finished syncing; the operator runs again (within the hour)
    second = run_one(gpu01, sim)
    assert_clean(second)
    assert "apt-get update" in second.changes
    assert second.changes.index("apt-get update") < second.changes.index(install)
    assert_layered_checks_passed(second)


# the inference role ------------------------------------------------------------------------------

ENGINE = "http://198.51.100.11:8000"  # gpu-01's engine, published on its private address (inventories/example)


def test_the_hf_token_is_uploaded_0600_root_before_the_engines_and_never_shown(gpu01: FleetHost) -> None:
    token = "hf_" + "Tk" * 17
    config = dataclasses.replace(with_config(gpu01, engine={"hf_token_file": "secrets/hf_token"}), hf_token=token)
    sim = factsets.converged(config, UBUNTU_2204)
    sim.images.add(config.config.engine.image)
    sim.responses.update({  # the engine answers once created (fakehost does not run containers)
        f"{ENGINE}/health": "200 true", f"{ENGINE}/v1/completions": "200"})
    run = run_one(config, sim, roles=["inference"])
    assert not run.failed, run.failure
    upload = run.op("inference | Hugging Face token (0600)")
    assert upload.did_change and upload.success
    assert run.uploads == {HF_TOKEN: token + "\n"}
    assert (sim.files[HF_TOKEN].mode, sim.files[HF_TOKEN].user) == ("600", "root")
    assert sim.dirs["/etc/gpufleet/secrets"] == "700"
    create = next(c for c in run.changes if c.startswith("docker create"))
    assert run.changes.index(f"upload {HF_TOKEN}") < run.changes.index(create)
    assert f"{HF_TOKEN}:/run/secrets/hf_token:ro" in create and "HF_TOKEN_PATH=/run/secrets/hf_token" in create
    assert not any(token in record.command or token in " ".join(record.output) for record in run.records)
    assert token not in run.failure
    again = run_one(config, sim, roles=["inference"])
    assert not again.op("inference | Hugging Face token (0600)").did_change


def test_without_an_hf_token_a_stale_one_is_removed(gpu01: FleetHost) -> None:
    sim = factsets.converged(gpu01, UBUNTU_2204)
    sim.images.add(gpu01.config.engine.image)
    sim.files[HF_TOKEN] = SimFile("hf_old\n", mode="600")
    sim.responses.update({f"{ENGINE}/health": "200 true", f"{ENGINE}/v1/completions": "200"})
    run = run_one(gpu01, sim, roles=["inference"])
    assert f"rm -f {HF_TOKEN}" in run.changes and HF_TOKEN not in sim.files
    assert not any("HF_TOKEN_PATH" in change for change in run.changes)
