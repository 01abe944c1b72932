"""deploy/site.py and deploy/rollout.py on the test bed: nginx in front of two simulated instances.

One host container (4 simulated GPUs, layout 2 x TP2) is its own gateway, as in
inventories/local; its gateway port is published on this machine's 127.0.0.1, which is where
the test's clients connect. Checked: keys and hidden engine paths through the real nginx, a
second site run changing nothing, a rolling update under steady streaming load losing no
admitted request, and a broken image rolled back with the instance serving its old spec.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpufleet.fleet import load_fleet
from gpufleet.paths import REPO_ROOT
from gpufleet.schema.units import parse_listen
from gpufleet.testbed import hosts as testbed
from gpufleet.testbed.bed import prepare_mirror
from tests.e2e.test_gpu_provisioning import changed_operations, grand_total, make_inventory
from tests.e2e.test_serving import PYINFRA, deploy, engines, set_host_vars

# the gateway's port and its stub_status port, as inventories/local (its role defaults) sets them
_GATEWAY = load_fleet(REPO_ROOT / "inventories" / "local", check_secrets=False).hosts[0].config.gateway
GATEWAY_PORT = parse_listen(_GATEWAY.listen)[1]
STATUS_PORT = _GATEWAY.status_port
TWO_INSTANCES = "layout: {instances: 2, tensor_parallel_size: 2}\n"
# the test's load comes from one key; the seed's 2 r/s would refuse most of it
GENEROUS_LIMITS = "gateway: {rate_per_second: 200, burst: 200, max_conns_per_key: 64}\n"
LOAD_CLIENTS = 3


@dataclass
class Bed:
    inventory: Path
    host: testbed.TestbedHost
    port: int
    key: str


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    mirror = prepare_mirror(tmp_path_factory.mktemp("mirror"), sim_image=True)
    name = f"e2e-{uuid.uuid4().hex[:6]}-g"
    with testbed.testbed_hosts([name], mirror_dir=mirror, publish={name: [GATEWAY_PORT]}) as [host]:
        inventory = make_inventory(tmp_path_factory.mktemp("inv") / "local", [name], gateway=True)
        set_host_vars(inventory, host, TWO_INSTANCES + GENEROUS_LIMITS)
        deploy(inventory, "site.py")
        key = load_fleet(inventory.parent).host(name).api_keys[0].key
        yield Bed(inventory, host, host.published(GATEWAY_PORT), key)


def request(bed: Bed, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict, str]:
    conn = http.client.HTTPConnection("127.0.0.1", bed.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST" if body is not None else "GET", path, json.dumps(body) if body is not None else None, headers)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, dict(response.getheaders()), text


COMPLETION = {"model": "qwen2.5-7b-instruct", "prompt": "hello", "max_tokens": 4}


def test_the_gateway_needs_a_key_and_hides_the_engines(bed: Bed) -> None:
    status, headers, text = request(bed, "/v1/completions", COMPLETION)
    assert status == 401 and json.loads(text)["error"]["type"] == "authentication_error"
    assert "nginx/" not in headers.get("Server", "")
    status, _, text = request(bed, "/v1/completions", COMPLETION, key=bed.key)
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 4
    for path in ("/metrics", "/health", "/admin/token-log"):
        status, _, text = request(bed, path, key=bed.key)
        assert status == 404 and json.loads(text)["error"]["type"] == "not_found_error", path
    # the keys map is root's alone; nginx's stub_status answers on the host's loopback
    mode = bed.host.exec("stat", "-c", "%a %U", "/etc/nginx/gpufleet/api_keys.map").stdout.strip()
    assert mode == "600 root"
    stub = bed.host.exec("curl", "-s", f"http://127.0.0.1:{STATUS_PORT}/stub_status").stdout
    assert stub.startswith("Active connections")


def test_a_second_site_run_changes_nothing(bed: Bed) -> None:
    output = deploy(bed.inventory, "site.py")
    assert grand_total(output)["changed"] == 0, "\n".join(changed_operations(output))


@dataclass
class Load:
    """Streaming completions from a few clients until stopped; every admitted one must complete."""

    bed: Bed
    record_starts: bool = False  # failures read "@<monotonic start> <what>"
    stop: threading.Event = field(default_factory=threading.Event)
    done: int = 0
    refused: int = 0  # 429: not admitted, allowed
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self) -> None:
        body = {"model": "qwen2.5-7b-instruct", "prompt": "hello", "max_tokens": 24, "stream": True}
        deadline = time.monotonic() + 600  # bounded whatever happens to the test
        while not self.stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            outcome = self._one(body)
            if self.record_starts and outcome not in ("ok", "429"):
                outcome = f"@{started} {outcome}"
            with self.lock:
                if outcome == "ok":
                    self.done += 1
                elif outcome == "429":
                    self.refused += 1
                else:
                    self.failures.append(outcome)

    def _one(self, body: dict) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.bed.port, timeout=60)
        try:
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json", "Authorization": f"Bearer {self.bed.key}"})
            response = conn.getresponse()
            text = response.read().decode()
        except (OSError, http.client.HTTPException) as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        if response.status == 429:
            return "429"
        if response.status != 200 or not text.rstrip().endswith("data: [DONE]"):
            return f"{response.status}: {text[-300:]}"
        return "ok"

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(LOAD_CLIENTS)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)


def test_a_killed_instance_fails_no_request_that_had_not_started(bed: Bed) -> None:
    """Docker restarts the crashed engine (restart unless-stopped); meanwhile its published port is
    Docker's proxy, which accepts and drops connections: nginx must send those requests on."""
    with Load(bed, record_starts=True) as load:
        time.sleep(2)
        # a crash, not `docker kill` (Docker counts that as a manual stop and does not restart)
        bed.host.exec("sh", "-c", "kill -9 $(docker inspect --format '{{.State.Pid}}' gpufleet-engine-1)")
        killed_at = time.monotonic()  # requests started before this may have been on the engine
        time.sleep(12)  # through the engine's restart and start-up delay, and its return
    late = [f for f in load.failures if f.startswith("@") and float(f[1:].split(" ", 1)[0]) > killed_at]
    assert late == [], late[:5]
    assert len(load.failures) <= LOAD_CLIENTS, load.failures  # at most the streams open on it
    assert load.done > 20
    restarts = bed.host.exec("docker", "inspect", "--format", "{{.RestartCount}}", "gpufleet-engine-1").stdout
    assert int(restarts) >= 1


def spec_hashes(bed: Bed) -> dict[str, str]:
    return {name: info["Config"]["Labels"]["io.gpufleet.spec-hash"] for name, info in engines(bed.host).items()}


def test_a_rolling_update_under_load_loses_no_admitted_request(bed: Bed) -> None:
    before = spec_hashes(bed)
    set_host_vars(bed.inventory, bed.host,
                  TWO_INSTANCES + GENEROUS_LIMITS + "engine: {extra_args: [--startup-delay, '3']}\n")
    with Load(bed) as load:
        time.sleep(2)
        output = deploy(bed.inventory, "rollout.py")
        time.sleep(2)
        served_during = load.done
    assert load.failures == [], load.failures[:5]
    assert served_during > 20
    after = spec_hashes(bed)
    assert sorted(after) == sorted(before) and all(after[name] != before[name] for name in before), output[-3000:]
    for info in engines(bed.host).values():
        assert info["Args"][-2:] == ["--startup-delay", "3"]
    assert "down;" not in bed.host.exec("cat", "/etc/nginx/gpufleet/upstream.conf").stdout
    output = deploy(bed.inventory, "rollout.py")  # everything at its spec: nothing to roll
    assert grand_total(output)["changed"] == 0, "\n".join(changed_operations(output))


def test_a_broken_image_is_rolled_back_and_the_old_spec_keeps_serving(bed: Bed) -> None:
    before = spec_hashes(bed)
    # an image that exists but cannot serve: busybox under the simulator's name
    bed.host.exec("docker", "tag", "gpufleet/busybox:standin", "gpufleet/sim:0.0.0-broken")
    set_host_vars(bed.inventory, bed.host, TWO_INSTANCES + GENEROUS_LIMITS
                  + "engine: {image: 'gpufleet/sim:0.0.0-broken', extra_args: [--startup-delay, '3']}\n")
    with Load(bed) as load:
        time.sleep(1)
        proc_output = _rollout_expecting_failure(bed)
    assert "rollout stopped" in proc_output and "the previous container serves again" in proc_output
    assert spec_hashes(bed) == before  # instance 0 restored, instance 1 never touched
    assert load.failures == [], load.failures[:5]
    assert "down;" not in bed.host.exec("cat", "/etc/nginx/gpufleet/upstream.conf").stdout
    status, _, _ = request(bed, "/v1/completions", COMPLETION, key=bed.key)
    assert status == 200


def _rollout_expecting_failure(bed: Bed) -> str:
    proc = subprocess.run([PYINFRA, "-y", str(bed.inventory), "deploy/rollout.py"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    return output
