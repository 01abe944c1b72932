"""deploy/serving.py on the test bed: engine containers (the simulator) under the plan's layout.

One host container is provisioned with deploy/gpu.py, then served with each of the seed's
layouts in turn (1 x TP4, 2 x TP2, 4 x TP1): the right GPU indices per container, the limits in
`docker inspect` and in the engine's cgroup files, a second run that changes nothing, and a
changed limit that recreates the containers it affects.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.fleet import load_fleet
from gpufleet.paths import REPO_ROOT
from gpufleet.testbed import hosts as testbed
from gpufleet.testbed.bed import prepare_mirror
from gpufleet.testbed.cgroups import container_limits_script
from tests.e2e.test_gpu_provisioning import changed_operations, grand_total, make_inventory

PYINFRA = str(Path(sys.executable).parent / "pyinfra")
HF_TOKEN = "/etc/gpufleet/secrets/hf_token"


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
    listen = load_fleet(inventory.parent, check_secrets=False).host(host.name).config.engine.listen_address
    for index, expected in enumerate(gpus):
        info = found[f"gpufleet-engine-{index}"]
        assert gpu_env(info) == expected
        hc = info["HostConfig"]
        assert hc["Memory"] == hc["MemorySwap"] == 2 * 1024**3 and hc["NanoCpus"] == 10**9
        assert hc["PidsLimit"] == 1024 and hc["ShmSize"] == 256 * 1024**2
        assert hc["PortBindings"]["8000/tcp"] == [{"HostIp": listen, "HostPort": str(8000 + index)}]
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


def test_the_hf_token_reaches_the_engines_as_a_file_and_shows_nowhere(served) -> None:
    """engine.hf_token_file: uploaded 0600 root, mounted read-only, named by HF_TOKEN_PATH; the
    token is in no `docker inspect`, process list, engine log or pyinfra output (--diff included),
    and a new token is uploaded without recreating the engines."""
    inventory, host = served
    secret = inventory.parent / "secrets" / "hf_token"
    secret.parent.mkdir(exist_ok=True)
    token = "hf_" + secrets.token_urlsafe(27)
    secret.write_text(token + "\n")
    secret.chmod(0o600)
    set_host_vars(inventory, host, "layout: {instances: 2, tensor_parallel_size: 2}\n"
                  "engine: {hf_token_file: secrets/hf_token}\n")
    output = deploy(inventory, "serving.py")
    assert token not in output
    found = engines(host)
    assert sorted(found) == ["gpufleet-engine-0", "gpufleet-engine-1"]
    for name, info in found.items():
        assert token not in json.dumps(info)
        assert "HF_TOKEN_PATH=/run/secrets/hf_token" in info["Config"]["Env"]
        assert {(m["Source"], m["Destination"], m["RW"]) for m in info["Mounts"]} >= {
            (HF_TOKEN, "/run/secrets/hf_token", False)}
        logs = host.exec("docker", "logs", name)
        log = logs.stdout + logs.stderr
        assert token not in log
        # the simulator runs as uid 10001, so a root-only file is there but closed to it
        closed = "HF_TOKEN_PATH /run/secrets/hf_token: present but unreadable by uid 10001 (mode 0600, owner uid 0)"
        assert closed in log
    assert token not in host.exec("ps", "auxww").stdout
    assert host.exec("stat", "-c", "%a %U", HF_TOKEN, "/etc/gpufleet/secrets").stdout.split() == [
        "600", "root", "700", "root"]
    # vLLM's and TGI's images run as root: through the same mount, root reads the whole token
    image = found["gpufleet-engine-0"]["Config"]["Image"]
    probe = host.exec("docker", "run", "--rm", "--network", "none", "--user", "0",
                      "--volume", f"{HF_TOKEN}:/run/secrets/hf_token:ro",
                      "--env", "HF_TOKEN_PATH=/run/secrets/hf_token", "--entrypoint", "python3", image, "-c",
                      "import os; from gpufleet.sim.server import hf_token_status; print(hf_token_status(os.environ))")
    assert probe.stdout.strip() == f"HF_TOKEN_PATH /run/secrets/hf_token: readable, a token of {len(token)} characters"

    # a new token: --dry --diff does not show it; the run uploads it and leaves the engines be
    new = "hf_" + secrets.token_urlsafe(27)
    secret.write_text(new + "\n")
    dry = subprocess.run([PYINFRA, "--dry", "--diff", str(inventory), "deploy/serving.py"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=600, check=False)
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-6000:]
    assert new not in dry.stdout + dry.stderr and token not in dry.stdout + dry.stderr
    before = {name: info["Id"] for name, info in found.items()}
    output = deploy(inventory, "serving.py")
    assert new not in output and token not in output
    assert any("Hugging Face token" in row for row in changed_operations(output))
    assert {name: info["Id"] for name, info in engines(host).items()} == before
    digest = host.exec("sha256sum", HF_TOKEN).stdout.split()[0]
    assert digest == hashlib.sha256((new + "\n").encode()).hexdigest()
