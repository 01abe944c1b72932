"""deploy/serving.py on the test bed: engine containers (the simulator) under the plan's layout.

One host container is provisioned with deploy/gpu.py, then served with each of the seed's
layouts in turn (1 x TP4, 2 x TP2, 4 x TP1): the right GPU indices per container, the limits in
`docker inspect` and in the engine's cgroup files, a second run that changes nothing, and a
changed limit that recreates the containers it affects.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.paths import REPO_ROOT
from gpufleet.testbed import hosts as testbed
from gpufleet.testbed.bed import prepare_mirror
from gpufleet.testbed.cgroups import container_limits_script
from tests.e2e.test_gpu_provisioning import changed_operations, grand_total, make_inventory

PYINFRA = str(Path(sys.executable).parent / "pyinfra")


def deploy(inventory: Path, name: str) -> str:
    proc = subprocess.run([PYINFRA, "-y", str(inventory), f"deploy/{name}"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=1500, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, testbed.TestbedHost]]:
    mirror = prepare_mirror(tmp_path_factory.mktemp("mirror"), sim_image=True)
    name = f"e2e-{uuid.uuid4().hex[:6]}-s"
    with testbed.testbed_hosts([name], mirror_dir=mirror) as [host]:
        inventory = make_inventory(tmp_path_factory.mktemp("inv") / "local", [name])
        deploy(inventory, "gpu.py")
        yield inventory, host


def set_host_vars(inventory: Path, host: testbed.TestbedHost, text: str) -> None:
    folder = inventory.parent / "host_vars"
    folder.mkdir(exist_ok=True)
    (folder / f"{host.name}.yml").write_text(text)


def engines(host: testbed.TestbedHost) -> dict[str, dict]:
    names = host.exec("docker", "ps", "--filter", "label=io.gpufleet.role=inference", "--format", "{{.Names}}")
    found = {}
    for name in sorted(names.stdout.split()):
        found[name] = json.loads(host.exec("docker", "inspect", name).stdout)[0]
    return found


def gpu_env(info: dict) -> str:
    return next(e.split("=", 1)[1] for e in info["Config"]["Env"] if e.startswith("CUDA_VISIBLE_DEVICES="))


@pytest.mark.parametrize(("layout", "gpus"), [
    ("layout: {instances: 1, tensor_parallel_size: 4}\n", ["0,1,2,3"]),
    ("layout: {instances: 2, tensor_parallel_size: 2}\n", ["0,1", "2,3"]),
    ("layout: {instances: 4, tensor_parallel_size: 1}\n", ["0", "1", "2", "3"]),
])
def test_each_seed_layout_deploys_with_its_gpus_and_limits(served, layout: str, gpus: list[str]) -> None:
    inventory, host = served
    set_host_vars(inventory, host, layout)
    deploy(inventory, "serving.py")
    found = engines(host)
    assert sorted(found) == [f"gpufleet-engine-{i}" for i in range(len(gpus))]  # stale instances removed
    for index, expected in enumerate(gpus):
        info = found[f"gpufleet-engine-{index}"]
        assert gpu_env(info) == expected
        hc = info["HostConfig"]
        assert hc["Memory"] == hc["MemorySwap"] == 2 * 1024**3 and hc["NanoCpus"] == 10**9
        assert hc["PidsLimit"] == 1024 and hc["ShmSize"] == 256 * 1024**2
        assert hc["PortBindings"]["8000/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": str(8000 + index)}]
        # read on the host: `docker exec` into a non-root container fails in nested Docker (runc's setns)
        limits = host.exec("sh", "-c", container_limits_script(info["Id"]))
        assert testbed.parse_cgroup_limits(limits.stdout) == {"memory_bytes": 2 * 1024**3, "cpus": 1.0, "pids": 1024}
        health = host.exec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                           f"http://127.0.0.1:{8000 + index}/health")
        assert health.stdout == "200"
        assert info["Config"]["Healthcheck"]["Test"]  # Docker's check is there too (the image's HEALTHCHECK)


def test_a_second_run_changes_nothing_and_a_changed_limit_recreates(served) -> None:
    inventory, host = served
    set_host_vars(inventory, host, "layout: {instances: 2, tensor_parallel_size: 2}\n")
    deploy(inventory, "serving.py")
    before = {name: info["Id"] for name, info in engines(host).items()}
    output = deploy(inventory, "serving.py")
    assert grand_total(output)["changed"] == 0, "\n".join(changed_operations(output))
    set_host_vars(inventory, host, "layout: {instances: 2, tensor_parallel_size: 2}\nlimits: {memory: 1g}\n")
    deploy(inventory, "serving.py")
    after = engines(host)
    assert all(after[name]["Id"] != before[name] for name in before)  # both instances carry the limit
    assert all(info["HostConfig"]["Memory"] == 1024**3 for info in after.values())
