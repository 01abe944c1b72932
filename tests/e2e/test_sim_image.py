"""The simulator image under the inference role's container spec: it serves, is limited, and is healthy.

One container for the module, started the way the inference role starts an engine on a GPU host
(memory/CPU/pids limits, shm, ulimits, no restart, port on 127.0.0.1 only, the GPUs it would own),
with vLLM-style flags for Qwen2.5-7B at TP2 on RTX 4090D.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import pytest

from gpufleet import __version__
from gpufleet.paths import PACKAGE_DIR
from gpufleet.testbed import images

if TYPE_CHECKING:  # fixtures only at runtime: tests/e2e is not a package (no __init__.py)
    from tests.e2e.conftest import Container, RunContainer

ENGINE_PORT = 8000
MEMORY_BYTES = 2 * 1024**3
PIDS = 256
STACK_BYTES = 67108864
SERVED_NAME = "qwen"


def engine_options(memlock: str) -> list[str]:
    """The container spec the inference role gives an engine (the simulator gets vLLM's/TGI's).

    memlock is "-1" (unlimited) wherever the daemon can grant it; see the memlock_ulimit fixture.
    """
    return [
        "--memory", "2g", "--memory-swap", "2g", "--cpus", "1", "--pids-limit", str(PIDS),
        "--shm-size", "64m", "--ulimit", f"memlock={memlock}", "--ulimit", f"stack={STACK_BYTES}",
        "--restart", "no", "-e", "GPUFLEET_SIM_GPUS=0,1",
    ]  # fmt: skip


def sim_profile() -> str:
    """`bench` when the simulator ships it, else the first profile: this tests the container, not timing."""
    names = sorted(path.stem for path in (PACKAGE_DIR / "sim" / "profiles").glob("*.yml"))
    return "bench" if "bench" in names or not names else names[0]


def sim_args() -> list[str]:
    return [
        # arguments replace the image's CMD, so bind every interface inside the container as its CMD does
        "--host", "0.0.0.0", "--port", str(ENGINE_PORT),
        "--model", "Qwen/Qwen2.5-7B-Instruct", "--served-model-name", SERVED_NAME,
        "--tensor-parallel-size", "2", "--gpu", "rtx-4090d", "--profile", sim_profile(),
        # the profile's simulated model load (45-60 s) tests nothing here; a short one still makes
        # the port refuse connections at first, as a loading engine does
        "--startup-delay", "2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def engine(sim_image: str, memlock_ulimit: str, module_run_container: RunContainer) -> Container:
    """The engine container, its /health answering through the published port."""
    options = engine_options(memlock_ulimit)
    container = module_run_container(sim_image, sim_args(), options=options, ports=[ENGINE_PORT])
    container.wait_http_ok(ENGINE_PORT, "/health", timeout=120)
    return container


def test_image_is_labelled_simulator_running_unprivileged(sim_image: str, engine: Container) -> None:
    labels = images.image_labels(sim_image)
    assert labels["org.opencontainers.image.title"] == "gpufleet-sim"
    assert "simulator" in labels["org.opencontainers.image.description"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert sim_image.startswith(f"{images.SIM_IMAGE}-")
    assert labels[images.CONTENT_HASH_LABEL].startswith(sim_image.rsplit("-", 1)[1])
    assert engine.exec("id", "-u") == "10001"


def test_port_published_on_loopback_only(engine: Container) -> None:
    bindings = engine.inspect()["HostConfig"]["PortBindings"][f"{ENGINE_PORT}/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]


def test_completion_through_published_port(engine: Container) -> None:
    status, body = engine.request(
        ENGINE_PORT,
        "/v1/completions",
        {"model": SERVED_NAME, "prompt": "The capital of France is", "max_tokens": 8, "stream": False},
        timeout=30,
    )
    assert status == 200, body[:500]
    reply = json.loads(body)
    assert reply["object"] == "text_completion"
    assert reply["model"] == SERVED_NAME
    choice = reply["choices"][0]
    assert choice["text"]
    assert choice["finish_reason"] in ("length", "stop")
    assert 1 <= reply["usage"]["completion_tokens"] <= 8


def cgroup_limits(engine: Container) -> dict[str, str]:
    """The container's memory, pids and CPU limits as its own cgroup files show them (v2 or v1)."""
    if engine.exec("stat", "-fc", "%T", "/sys/fs/cgroup") == "cgroup2fs":
        return {
            "memory": engine.exec("cat", "/sys/fs/cgroup/memory.max"),
            "swap": engine.exec("cat", "/sys/fs/cgroup/memory.swap.max"),
            "pids": engine.exec("cat", "/sys/fs/cgroup/pids.max"),
            "cpu": engine.exec("cat", "/sys/fs/cgroup/cpu.max"),
        }
    # cgroup v1 (this test bed's VM boots with it): the same limits in v1's files
    quota = engine.exec("cat", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    period = engine.exec("cat", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    memsw = engine.exec("sh", "-c", "cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes 2>/dev/null || echo 0")
    memory = engine.exec("cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    return {
        "memory": memory,
        # --memory-swap equal to --memory means no swap: v1 shows memory+swap == memory
        "swap": "0" if memsw in ("0", memory) else str(int(memsw) - int(memory)),
        "pids": engine.exec("cat", "/sys/fs/cgroup/pids/pids.max"),
        "cpu": f"{quota} {period}",
    }


def test_cgroup_limits_inside_container(engine: Container) -> None:
    assert cgroup_limits(engine) == {
        "memory": str(MEMORY_BYTES),
        "swap": "0",
        "pids": str(PIDS),
        "cpu": "100000 100000",
    }


def process_limit(limits: str, name: str) -> list[str]:
    """[soft, hard] of one row of /proc/<pid>/limits, e.g. "Max locked memory"."""
    row = next(line for line in limits.splitlines() if line.startswith(name))
    return row[len(name) :].split()[:2]


def test_shm_ulimits_restart_and_gpus(engine: Container, memlock_ulimit: str) -> None:
    shm = engine.exec("df", "--block-size=1", "--output=size", "/dev/shm").splitlines()[-1].strip()
    assert shm == str(64 * 1024**2)
    limits = engine.exec("cat", "/proc/1/limits")
    memlock = "unlimited" if memlock_ulimit == "-1" else memlock_ulimit.split(":")[0]
    assert process_limit(limits, "Max locked memory") == [memlock, memlock]
    assert process_limit(limits, "Max stack size") == [str(STACK_BYTES)] * 2
    details = engine.inspect()
    assert details["HostConfig"]["RestartPolicy"]["Name"] == "no"
    assert "GPUFLEET_SIM_GPUS=0,1" in details["Config"]["Env"]


def test_healthcheck_reports_healthy(engine: Container) -> None:
    """The image's own HEALTHCHECK (every 5 s) turns the container healthy once /health answers."""
    deadline = time.monotonic() + 60
    while engine.health_status() != "healthy" and time.monotonic() < deadline:
        time.sleep(1)
    health = engine.inspect()["State"]["Health"]
    assert health["Status"] == "healthy", json.dumps(health, indent=2)[-2000:]
    assert health["Log"][-1]["ExitCode"] == 0
