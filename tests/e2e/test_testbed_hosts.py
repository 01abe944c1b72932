"""The test bed's GPU hosts: systemd boots, simulated GPUs are on the PCI bus, the mirror is served,
the Docker the roles install runs limited containers, a reboot empties /run, pyinfra reaches them.

Three hosts for the module: a pair with 4 GPUs and a small mirror (the roles' usual target) and a
2-GPU host whose mirror has the distribution-side keyring. Host names carry a random part, so a
concurrent run on this machine never meets them; every host is removed when the module ends, pass
or fail (testbed_hosts). Traffic: `docker exec` into the hosts, and the hosts' apt to Debian's mirror.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.testbed import hosts, images, pci
from gpufleet.testbed.hosts import TestbedHost

RUN = uuid.uuid4().hex[:6]
MIRROR_TEXT = "gpufleet test bed mirror\n"
KEYRING = b"stand-in keyring bytes (the harness copies it, apt never reads it here)\n"


def pci_devices(host: TestbedHost) -> dict[str, tuple[str, str, str]]:
    """{address: (vendor, device, class)} of every device the host sees on its PCI bus."""
    script = (
        'for d in /sys/bus/pci/devices/*; do [ -e "$d" ] || continue; '
        'echo "${d##*/}" $(cat "$d/vendor" "$d/device" "$d/class"); done'  # unquoted: one line per device
    )
    lines = host.exec("sh", "-c", script).stdout.splitlines()
    return {address: (vendor, device, cls) for address, vendor, device, cls in (line.split() for line in lines)}


@pytest.fixture(scope="module")
def host_image(docker_ready: None) -> str:
    try:
        return images.ensure_host_image()
    except images.ImageError as exc:
        pytest.fail(f"could not build the host image: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def pair(host_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TestbedHost]]:
    """Two 4-GPU hosts sharing a mirror with one file (no keyring: apt must not see a repository there)."""
    mirror = tmp_path_factory.mktemp("mirror")
    (mirror / "hello.txt").write_text(MIRROR_TEXT, encoding="utf-8")
    mirror.chmod(0o755)
    with hosts.testbed_hosts([f"e2e-{RUN}-a", f"e2e-{RUN}-b"], mirror_dir=mirror, gpus=4) as started:
        yield started


@pytest.fixture(scope="module")
def small(host_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestbedHost]:
    """A 2-GPU host whose mirror has testbed/keyring.gpg."""
    mirror = tmp_path_factory.mktemp("mirror-keyring")
    (mirror / "testbed").mkdir()
    (mirror / "testbed" / "keyring.gpg").write_bytes(KEYRING)
    with hosts.testbed_hosts([f"e2e-{RUN}-c"], mirror_dir=mirror, gpus={f"e2e-{RUN}-c": 2}) as started:
        yield started[0]


def test_hosts_boot_systemd_to_running(pair: list[TestbedHost]) -> None:
    for host in pair:
        assert host.container == f"gpufleet-tb-{host.name}"
        assert host.exec("systemctl", "is-system-running").stdout.strip() == "running"
        assert host.exec("hostname").stdout.strip() == host.name
        assert host.exec("sh", "-c", "command -v docker nvidia-smi || true").stdout.strip() == ""  # the roles' job
    machine_ids = {host.exec("cat", "/etc/machine-id").stdout.strip() for host in pair}
    assert len(machine_ids) == len(pair), "hosts share a machine ID"


def test_each_host_sees_exactly_its_gpus_on_the_pci_bus(pair: list[TestbedHost], small: TestbedHost) -> None:
    for host, count in [(pair[0], 4), (pair[1], 4), (small, 2)]:
        devices = pci_devices(host)
        assert sorted(devices) == [f"0000:{bus:02x}:00.0" for bus in range(1, count + 1)], host.name
        assert set(devices.values()) == {("0x10de", "0x2685", "0x030000")}, host.name
    listing = pair[0].exec("lspci", "-nn").stdout
    assert listing.count("[10de:2685]") == 4 and listing.count("VGA compatible controller [0300]") == 4


def test_gpus_file_lists_the_pci_gpus(pair: list[TestbedHost], small: TestbedHost) -> None:
    uuids = set()
    for host in [*pair, small]:
        text = host.exec("cat", hosts.GPUS_PATH).stdout
        expected = pci.simulated_gpus(host.name, host.gpus, name=hosts.DEFAULT_GPU_NAME, memory_mib=24564)
        assert text == pci.gpus_file(expected)
        rows = [line.split("|") for line in text.splitlines()]
        assert [row[0] for row in rows] == [str(i) for i in range(host.gpus)]
        assert {row[1] for row in rows} == {"NVIDIA GeForce RTX 4090 D"} and {row[3] for row in rows} == {"24564"}
        assert [row[4] for row in rows] == [f"0000{address}" for address in sorted(pci_devices(host))]
        uuids.update(row[2] for row in rows)
    assert len(uuids) == 10 and all(u.startswith("GPU-") for u in uuids)


def test_mirror_unit_serves_the_mirror_on_loopback(pair: list[TestbedHost]) -> None:
    for host in pair:
        assert host.exec("systemctl", "is-active", "gpufleet-testbed-mirror").stdout.strip() == "active"
        served = host.exec("curl", "-fsS", f"http://127.0.0.1:{hosts.MIRROR_PORT}/hello.txt").stdout
        assert served == MIRROR_TEXT
    # without testbed/keyring.gpg in the mirror there is no distribution-side source
    assert pair[0].exec("test", "-e", hosts.SOURCES_PATH, check=False).returncode != 0


def test_mirror_keyring_becomes_an_apt_source(small: TestbedHost) -> None:
    assert small.exec("cat", hosts.SOURCES_PATH).stdout == hosts.SOURCES_LINE
    keyring = small.exec("base64", "-w0", hosts.KEYRING_PATH).stdout
    assert base64.b64decode(keyring) == KEYRING


def test_pyinfra_docker_connector_works_in_place(pair: list[TestbedHost]) -> None:
    host = pair[0]
    pyinfra = Path(sys.executable).with_name("pyinfra")
    proc = subprocess.run(
        [str(pyinfra), "-y", host.pyinfra_name, "exec", "--", "cat", "/etc/hostname"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = proc.stdout + proc.stderr  # pyinfra logs to stderr
    assert proc.returncode == 0, output
    assert f"] {host.name}\n" in output  # the command's output, prefixed with the pyinfra host name
    assert "container left running" in output
    assert host.exec("systemctl", "is-system-running").stdout.strip() == "running"


def test_nested_docker_runs_limited_containers(pair: list[TestbedHost]) -> None:
    host = pair[0]
    install = host.exec(
        "sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io",
        check=False, timeout=900,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert host.exec("systemctl", "is-active", "docker").stdout.strip() == "active"
    assert host.exec("systemctl", "is-system-running").stdout.strip() == "running"
    image = hosts.load_check_image(host)
    limits = ["--memory", "64m", "--cpus", "0.5", "--pids-limit", "50"]
    out = host.exec("docker", "run", "--rm", *limits, image, "sh", "-c", hosts.CGROUP_LIMITS_SCRIPT).stdout
    assert hosts.parse_cgroup_limits(out) == {"memory_bytes": 64 * 1024**2, "cpus": 0.5, "pids": 50}, out
    # the same container without limits: the parser tells "unlimited" apart
    out = host.exec("docker", "run", "--rm", image, "sh", "-c", hosts.CGROUP_LIMITS_SCRIPT).stdout
    assert hosts.parse_cgroup_limits(out)["cpus"] is None


def test_restart_is_a_reboot(pair: list[TestbedHost]) -> None:
    host = pair[1]
    host.exec("touch", "/run/gpufleet-e2e-marker")
    hosts.restart_host(host)
    assert host.exec("test", "-e", "/run/gpufleet-e2e-marker", check=False).returncode != 0, "/run survived"
    assert host.exec("systemctl", "is-system-running").stdout.strip() == "running"
    assert host.exec("systemctl", "is-active", "gpufleet-testbed-mirror").stdout.strip() == "active"
    assert len(pci_devices(host)) == 4
    assert host.exec("cat", hosts.GPUS_PATH).stdout.count("\n") == 4


def test_start_refuses_a_name_in_use_and_leaves_its_host_alone(pair: list[TestbedHost]) -> None:
    with pytest.raises(hosts.HostError, match="already exist"):
        hosts.start_hosts([pair[0].name], mirror_dir=None)
    assert pair[0].exec("systemctl", "is-system-running").stdout.strip() == "running"


def test_hosts_are_removed_even_when_the_block_fails(host_image: str) -> None:
    name = f"e2e-{RUN}-d"
    with pytest.raises(RuntimeError, match="inside the block"), hosts.testbed_hosts([name], mirror_dir=None, gpus=0):
        raise RuntimeError("inside the block")
    container = hosts.container_name(name)
    assert subprocess.run(["docker", "container", "inspect", container], capture_output=True).returncode != 0
    volumes = subprocess.run(["docker", "volume", "ls", "--quiet"], capture_output=True, text=True).stdout.split()
    assert f"{container}-docker" not in volumes


def test_save_check_image_writes_a_loadable_archive(docker_ready: None, tmp_path: Path) -> None:
    archive = hosts.save_check_image(tmp_path / "images" / "busybox-standin.tar")
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == [images.BUSYBOX_IMAGE]
