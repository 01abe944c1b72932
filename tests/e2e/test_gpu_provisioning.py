"""deploy/gpu.py on the one-machine test bed: the pyinfra CLI against systemd host containers with
simulated GPUs and a signed local mirror of stand-in NVIDIA packages.

The roles run unchanged; only the inventory's repository URLs point at the mirror each host
serves itself on 127.0.0.1:8765 (inventories/local). What is checked is what an operator would
check on a real host: pinned and held packages, nouveau blacklisted, daemon.json merged with an
existing user key kept, the nvidia runtime registered in Docker, nvidia-persistenced enabled,
Docker able to run a container under memory/CPU/pids limits, and a second run changing nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet import pyinfra_output
from gpufleet.fleet import load_fleet
from gpufleet.paths import REPO_ROOT
from gpufleet.pyinfra_output import changed_operations
from gpufleet.testbed import hosts as testbed
from gpufleet.testbed.bed import ensure_api_keys, prepare_mirror

PYINFRA = str(Path(sys.executable).parent / "pyinfra")
LOCAL_INVENTORY = REPO_ROOT / "inventories" / "local"
USER_DAEMON_JSON = {"labels": ["owner=ops-team"], "debug": False}
DRIVER = "580.126.20-1"
TOOLKIT = "1.19.1-1"
RUN_TIMEOUT_S = 1500


def make_inventory(root: Path, names: list[str], gateway: bool = False, monitoring: str | None = None) -> Path:
    """inventories/local with these host names (test-unique, so parallel runs do not collide).

    With `gateway`, the hosts are gateways too (as in inventories/local), with a fresh keys file.
    `monitoring` names a monitoring host to add (as mon-01 in inventories/local).
    """
    shutil.copytree(LOCAL_INVENTORY, root, ignore=shutil.ignore_patterns("secrets"))
    lines = ["all:", "  vars:", "    ansible_connection: docker", "  children:", "    gpu:", "      hosts:"]
    lines += [f"        {name}: {{ansible_host: {testbed.container_name(name)}}}" for name in names]
    if gateway:
        lines += ["    gateway:", "      hosts:", *[f"        {name}:" for name in names]]
    if monitoring:
        lines += ["    monitoring:", "      hosts:", f"        {monitoring}: {{ansible_host: "
                  f"{testbed.container_name(monitoring)}}}"]
    (root / "hosts.yml").write_text("\n".join(lines) + "\n")
    # group_vars of a group hosts.yml does not define is refused
    if not gateway:
        (root / "group_vars" / "gateway.yml").unlink()
    if not monitoring:
        (root / "group_vars" / "monitoring.yml").unlink()
    if gateway:
        ensure_api_keys(load_fleet(root, check_secrets=False), client="e2e")
    return root / "inventory.py"


def pyinfra_run(inventory: Path, *extra: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYINFRA, "-y", *extra, str(inventory), "deploy/gpu.py"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )


def grand_total(output: str) -> dict[str, int]:
    """pyinfra's results table, last row: hosts, changed ("success"), errors, unchanged."""
    totals = pyinfra_output.grand_total(output)
    assert totals is not None, f"no results table in pyinfra's output:\n{output[-3000:]}"
    return totals


def converges_without_changes(inventory: Path) -> None:
    again = pyinfra_run(inventory)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    output = again.stdout + again.stderr
    totals = grand_total(output)
    assert totals["changed"] == 0 and totals["errors"] == 0, (
        f"the second run changed something: {totals}\n" + "\n".join(changed_operations(output))
    )


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # stand-in packages and the layered check's image (container_toolkit.check_image_archive)
    return prepare_mirror(tmp_path_factory.mktemp("mirror"))


@pytest.fixture(scope="module")
def fleet(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[testbed.TestbedHost]]]:
    """Two fresh hosts (one with a user's daemon.json), converged once by the pyinfra CLI."""
    tag = uuid.uuid4().hex[:6]
    names = [f"e2e-{tag}-a", f"e2e-{tag}-b"]
    with testbed.testbed_hosts(names, mirror_dir=mirror) as started:
        user_file = f"mkdir -p /etc/docker && echo '{json.dumps(USER_DAEMON_JSON)}' > /etc/docker/daemon.json"
        started[0].exec("sh", "-c", user_file)
        inventory = make_inventory(tmp_path_factory.mktemp("inv") / "local", names)
        first = pyinfra_run(inventory)
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-4000:]
        yield inventory, started


def out(host: testbed.TestbedHost, *cmd: str) -> str:
    return host.exec(*cmd).stdout.strip()


def test_packages_are_at_the_pinned_versions_and_held(fleet) -> None:
    _, started = fleet
    for host in started:
        listing = out(host, "dpkg-query", "-W", "-f", "${Package} ${Version}\\n")
        versions = dict(line.split() for line in listing.splitlines())
        assert versions["nvidia-open-580"] == DRIVER and versions["nvidia-driver-cuda"] == DRIVER
        assert versions["nvidia-kernel-open-dkms"] == DRIVER  # open modules for Ada, as NVIDIA defaults from R560
        for name in ("nvidia-container-toolkit", "nvidia-container-toolkit-base", "libnvidia-container-tools",
                     "libnvidia-container1"):
            assert versions[name] == TOOLKIT
        held = set(out(host, "apt-mark", "showhold").split())
        assert {"nvidia-open-580", "nvidia-driver-cuda", "nvidia-kernel-open-dkms", "nvidia-container-toolkit"} <= held
        assert "nvidia-" in out(host, "cat", "/etc/apt/apt.conf.d/51gpufleet-unattended-upgrades")


def test_nouveau_is_blacklisted_and_persistenced_enabled(fleet) -> None:
    _, started = fleet
    for host in started:
        assert "blacklist nouveau" in out(host, "cat", "/etc/modprobe.d/blacklist-nouveau.conf")
        assert out(host, "systemctl", "is-enabled", "nvidia-persistenced") == "enabled"
        assert out(host, "systemctl", "is-active", "nvidia-persistenced") == "active"


def test_the_driver_and_containers_see_the_gpus(fleet) -> None:
    _, started = fleet
    for host in started:
        assert len(out(host, "nvidia-smi", "-L").splitlines()) == 4
        listed = out(host, "docker", "run", "--rm", "--gpus", "all", "gpufleet/busybox:standin", "nvidia-smi", "-L")
        assert len(listed.splitlines()) == 4
        assert "nvidia.com/gpu=all" in out(host, "nvidia-ctk", "cdi", "list")


def test_daemon_json_is_merged_and_docker_has_the_nvidia_runtime(fleet) -> None:
    _, started = fleet
    for host in started:
        daemon = json.loads(out(host, "cat", "/etc/docker/daemon.json"))
        assert daemon["log-opts"] == {"max-size": "100m", "max-file": "3"} and daemon["live-restore"] is True
        assert daemon["runtimes"]["nvidia"]["path"] == "nvidia-container-runtime"
        runtimes = json.loads(out(host, "docker", "info", "--format", "{{json .Runtimes}}"))
        assert "nvidia" in runtimes
    user_host = started[0]
    daemon = json.loads(out(user_host, "cat", "/etc/docker/daemon.json"))
    assert daemon["labels"] == USER_DAEMON_JSON["labels"] and daemon["debug"] is False  # the user's keys kept


def test_docker_runs_containers_under_limits(fleet) -> None:
    _, started = fleet
    host = started[1]
    assert out(host, "systemctl", "is-active", "docker") == "active"
    limits = out(host, "docker", "run", "--rm", "--memory", "64m", "--cpus", "0.5", "--pids-limit", "50",
                 "gpufleet/busybox:standin", "sh", "-c", testbed.CGROUP_LIMITS_SCRIPT)
    assert testbed.parse_cgroup_limits(limits) == {"memory_bytes": 64 * 1024 * 1024, "cpus": 0.5, "pids": 50}


def test_a_second_run_changes_nothing(fleet) -> None:
    inventory, _ = fleet
    converges_without_changes(inventory)


KILL_POINTS = ["| driver 580.126.20", "| Docker (distribution package)", "| container toolkit 1.19"]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_an_interrupted_run_converges_when_run_again(mirror: Path, tmp_path: Path, kill_at: str) -> None:
    """Kill the pyinfra process while it runs the named operation, then run again to convergence."""
    name = f"e2e-{uuid.uuid4().hex[:6]}-k"
    with testbed.testbed_hosts([name], mirror_dir=mirror):
        inventory = make_inventory(tmp_path / "local", [name])
        proc = subprocess.Popen(
            [PYINFRA, "-y", str(inventory), "deploy/gpu.py"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        seen = _wait_for_line(proc, kill_at, timeout=RUN_TIMEOUT_S)
        time.sleep(1.0)  # well inside the operation
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert seen, f"pyinfra never reached {kill_at!r}"
        rerun = pyinfra_run(inventory)
        assert rerun.returncode == 0, rerun.stdout[-6000:] + rerun.stderr[-3000:]
        converges_without_changes(inventory)


def test_a_host_failing_preflight_stops_while_the_other_converges(mirror: Path, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    good, short = f"e2e-{tag}-ok", f"e2e-{tag}-2gpu"
    with testbed.testbed_hosts([good, short], mirror_dir=mirror, gpus={good: 4, short: 2}) as started:
        inventory = make_inventory(tmp_path / "local", [good, short])
        result = pyinfra_run(inventory)
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert "preflight failed" in output and "PCI bus has 2 NVIDIA GPU(s)" in output
        by_name = {host.name: host for host in started}
        assert out(by_name[good], "dpkg-query", "-W", "-f", "${Version}", "nvidia-open-580") == DRIVER
        untouched = by_name[short].exec("dpkg-query", "-W", "nvidia-open-580", check=False)
        assert untouched.returncode != 0  # nothing installed on the host that failed


def _wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Starting operation:" in line and needle in line:
            return True
        if time.monotonic() > deadline:
            return False
    return False
