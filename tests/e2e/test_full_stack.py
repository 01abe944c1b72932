"""The whole chain as `make demo` runs it, then the chaos drills an on-call engineer would run.

`python -m gpufleet.demo up` on an inventory shaped as inventories/local, with test-unique host
names: a GPU host (4 simulated 4090Ds as 2 x TP2, so one instance can fail while the other serves,
its own gateway published on 127.0.0.1) and a monitoring host on this machine's network at a
loopback address of its own (so a demo running on this machine keeps its ports). The demo builds
or finds the images, starts the hosts, runs deploy/site.py and the SLO ramp through the gateway,
and must pass the gate. Then, on that stack:

- every target the inventory implies is scraped and up; every recording rule and dashboard
  query returns data; Grafana is provisioned and password-protected;
- the gateway wants a key and hides the engines' own paths;
- a second demo run reuses the running hosts and its site run changes nothing;
- drills under streaming load through the gateway: an engine process crashes (Docker restarts
  it) and no request started after the crash fails; an engine is killed and stays down, the
  gateway keeps serving, EngineDown fires and notifies the webhook receiver (this machine's
  loopback), and resolves once the engine is started again; a rolling update loses no admitted
  request; a broken image is rolled back and the old spec keeps serving;
- `demo down` removes the hosts.

Traffic goes only to 127.0.0.1, the monitoring host's loopback address and `docker exec`.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from gpufleet.fleet import Fleet, load_fleet
from gpufleet.monitoring.dashboards import expand, panel_queries
from gpufleet.monitoring.grafana import render_grafana
from gpufleet.monitoring.rules import render_rules
from gpufleet.monitoring.targets import scrape_targets
from gpufleet.paths import REPO_ROOT
from gpufleet.pyinfra_output import changed_operations
from gpufleet.schema.units import parse_listen
from gpufleet.testbed import bed
from gpufleet.testbed import hosts as testbed
from tests.e2e.test_gpu_provisioning import grand_total, make_inventory
from tests.e2e.test_serving import PYINFRA, deploy, engines

PYTHON = sys.executable
WAIT_S = 180  # every wait below is bounded by this
TWO_INSTANCES = {"layout": {"instances": 2, "tensor_parallel_size": 2}}
# the drills' load comes from one ordinary key; the seed's 2 r/s would refuse most of it
GENEROUS_LIMITS = {"gateway": {"rate_per_second": 200, "burst": 200, "max_conns_per_key": 64}}
LOAD_CLIENTS = 3
# exactly 4 tokens: the profile ends an answer early at random (EOS) unless told not to
COMPLETION = {"model": "qwen2.5-7b-instruct", "prompt": "hello", "max_tokens": 4, "ignore_eos": True}


class Receiver(http.server.ThreadingHTTPServer):
    """Alertmanager's webhook receiver: keeps every notification it is sent."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.notifications: list[dict] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/alerts"

    def received(self, alertname: str, status: str) -> list[dict]:
        with self.lock:
            return [n for n in self.notifications if n.get("status") == status
                    and any(a["labels"].get("alertname") == alertname for a in n.get("alerts", []))]


class _ReceiverHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server: Receiver = self.server  # type: ignore[assignment]
        with server.lock:
            server.notifications.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Stack:
    inventory: Path  # the inventory folder
    fleet: Fleet = field(repr=False)
    gpu: testbed.TestbedHost
    mon: testbed.TestbedHost
    prometheus: str  # http://address:port
    grafana: str
    gateway_port: int  # on 127.0.0.1
    key: str  # an ordinary client's (rate-limited, generously)
    receiver: Receiver
    reports: Path
    first_run: subprocess.CompletedProcess[str]


def run_demo(inventory: Path, reports: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "gpufleet.demo", "up", "--inventory", str(inventory), "--reports",
                           str(reports), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)


def demo_runs(reports: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(reports.glob("demo-*/demo.json"))]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, docker_ready: None) -> Iterator[Stack]:
    suffix = uuid.uuid4().hex[:6]
    gpu_name, mon_name = f"e2e-{suffix}-g", f"e2e-{suffix}-p"
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    root = make_inventory(tmp_path_factory.mktemp("inv") / "local", [gpu_name], gateway=True,
                          monitoring=mon_name).parent
    address = testbed.loopback_address(mon_name)
    host_vars = root / "host_vars"
    host_vars.mkdir(exist_ok=True)
    (host_vars / f"{mon_name}.yml").write_text(yaml.safe_dump({"monitoring": {
        "listen_address": address, "exporter_address": address,
        "receivers": [{"name": "e2e", "kind": "webhook", "url": receiver.url}],
    }}))
    (host_vars / f"{gpu_name}.yml").write_text(yaml.safe_dump(TWO_INSTANCES | GENEROUS_LIMITS))
    reports = tmp_path_factory.mktemp("reports")
    fleet = load_fleet(root)
    try:
        first = run_demo(root, reports)
        gateway_port = parse_listen(fleet.host(gpu_name).config.gateway.listen)[1]
        gpu = testbed.TestbedHost(gpu_name, testbed.container_name(gpu_name), 4)
        mon = testbed.TestbedHost(mon_name, testbed.container_name(mon_name), 0)
        ports = fleet.host(mon_name).config.monitoring.ports
        key = next(k.key for k in fleet.host(gpu_name).api_keys if k.name == "e2e")
        yield Stack(inventory=root, fleet=fleet, gpu=gpu, mon=mon, prometheus=f"http://{address}:{ports.prometheus}",
                    grafana=f"http://{address}:{ports.grafana}", gateway_port=gpu.published(gateway_port)
                    if testbed.host_state(gpu_name) else 0, key=key, receiver=receiver, reports=reports,
                    first_run=first)
    finally:
        receiver.shutdown()
        bed.down(root)


# --- the demo ----------------------------------------------------------------------------------


def test_the_demo_runs_the_chain_and_the_gate_passes(stack: Stack) -> None:
    proc = stack.first_run
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for step in ("[1/4] Docker and the test bed's images", "[2/4] test bed hosts of", "[3/4] deploy/site.py",
                 f"[4/4] SLO ramp through {stack.gpu.name}'s gateway"):
        assert re.search(re.escape(step) + r".*done in \d+:\d\d", output), f"{step}: no 'done' line\n{output[-3000:]}"
    assert "SLO gate      PASS (exit 0): highest concurrency meeting every SLO: 8" in proc.stdout
    assert f"gateway {stack.gpu.name} http://127.0.0.1:{stack.gateway_port}" in proc.stdout
    assert f"Prometheus    {stack.prometheus}" in proc.stdout
    assert f"docker exec {stack.mon.container} cat /etc/grafana/admin_password" in proc.stdout
    assert "--web" in proc.stdout and "make demo-down" in proc.stdout

    [run] = demo_runs(stack.reports)
    assert [s["exit_code"] for s in run["steps"]] == [0, 0, 0, 0]
    assert run["verdict"]["status"] == "pass"
    report = Path(run["run_dir"]) / "loadtest"
    markdown = (report / "loadtest.md").read_text()
    # the GPU columns come from the monitoring host's Prometheus, which the inventory names
    assert "| VRAM per GPU" in markdown and "omitted" not in markdown, markdown[:3000]
    data = json.loads((report / "loadtest.json").read_text())
    assert [s["step"] for s in data["steps"]] == ["concurrency=1", "concurrency=4", "concurrency=8"]
    assert all(s["completed"] >= 100 for s in data["steps"])


# --- monitoring --------------------------------------------------------------------------------


def _get(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def query(stack: Stack, expr: str) -> list[dict]:
    status, body = _get(f"{stack.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def wait_for(what: str, check, timeout: float = WAIT_S, every: float = 2.0):
    """Poll `check` until it returns something truthy; fail naming `what` and the last value otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:.0f}s (last: {last!r})")


def until_none_left(what: str, left, timeout: float = WAIT_S, every: float = 5.0) -> None:
    """Poll `left` (what is still missing) until it is empty; fail listing what was still missing."""
    deadline = time.monotonic() + timeout
    missing = left()
    while missing and time.monotonic() < deadline:
        time.sleep(every)
        missing = left()
    assert not missing, f"{what}: still missing after {timeout:.0f}s:\n" + "\n".join(map(str, missing))


def request(stack: Stack, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict, str]:
    conn = http.client.HTTPConnection("127.0.0.1", stack.gateway_port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST" if body is not None else "GET", path, json.dumps(body) if body is not None else None, headers)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, dict(response.getheaders()), text


def send_requests(stack: Stack, count: int) -> None:
    """Streamed completions through the gateway (bounded): the engine, gateway and GPU series get values."""
    for _ in range(count):
        status, _, _ = request(stack, "/v1/completions", COMPLETION | {"max_tokens": 8, "stream": True}, stack.key)
        assert status == 200


def test_every_target_the_inventory_implies_is_scraped_and_up(stack: Stack) -> None:
    fleet = stack.fleet
    expected = {(t.job, t.host, t.address) for t in scrape_targets(fleet.hosts, fleet.host(stack.mon.name))}
    assert {job for job, _, _ in expected} == {"gpufleet-engine", "gpufleet-gpu-exporter", "node", "nginx",
                                               "gpufleet-gateway", "prometheus", "alertmanager"}
    assert sum(job == "gpufleet-engine" for job, _, _ in expected) == 2  # one per instance

    def all_up() -> set | None:
        found = {(s["metric"]["job"], s["metric"]["host"], s["metric"]["instance"]): s["value"][1]
                 for s in query(stack, "up")}
        return found if set(found) == expected and set(found.values()) == {"1"} else None

    wait_for("every target up", lambda: all_up() or query(stack, "up"))


def test_every_recording_rule_returns_data(stack: Stack) -> None:
    send_requests(stack, 40)
    groups = yaml.safe_load(render_rules(stack.fleet))["groups"]
    records = [r["record"] for g in groups for r in g["rules"] if "record" in r]
    assert len(records) >= 20

    def missing() -> list[str]:
        send_requests(stack, 5)  # the rates over 5 minutes need requests in their window
        return [r for r in records if not query(stack, r)]

    until_none_left("recording rules with a value", missing)


def test_every_dashboard_panel_query_returns_data(stack: Stack) -> None:
    send_requests(stack, 20)
    dashboards = {path: json.loads(text) for path, text in render_grafana(stack.fleet, stack.mon.name).items()
                  if path.suffix == ".json"}
    assert len(dashboards) == 4
    queries = [(dashboard["title"], title, expand(expr, {}))
               for dashboard in dashboards.values() for title, expr in panel_queries(dashboard)]
    assert len(queries) >= 30

    def empty() -> list[tuple[str, str, str]]:
        send_requests(stack, 5)
        return [q for q in queries if not query(stack, q[2])]

    until_none_left("dashboard panels with data", empty)


def test_grafana_is_provisioned_and_needs_the_generated_password(stack: Stack) -> None:
    status, health = _get(f"{stack.grafana}/api/health")
    assert status == 200 and health["database"] == "ok"
    status, _ = _get(f"{stack.grafana}/api/search")
    assert status == 401  # anonymous access is off
    mode = stack.mon.exec("stat", "-c", "%a %U", "/etc/grafana/admin_password").stdout.strip()
    assert mode == "600 grafana"
    password = stack.mon.exec("cat", "/etc/grafana/admin_password").stdout.strip()
    assert len(password) >= 20
    wrong = {"Authorization": "Basic " + base64.b64encode(b"admin:admin").decode()}
    assert _get(f"{stack.grafana}/api/search", wrong)[0] == 401
    auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}
    status, found = _get(f"{stack.grafana}/api/search?type=dash-db", auth)
    assert status == 200
    assert {d["uid"] for d in found} == {"gpufleet-slo", "gpufleet-gpus", "gpufleet-gateway", "gpufleet-engine"}
    status, sources = _get(f"{stack.grafana}/api/datasources", auth)
    assert status == 200 and [s["url"] for s in sources] == [stack.prometheus]


# --- the gateway -------------------------------------------------------------------------------


def test_the_gateway_needs_a_key_and_hides_the_engines(stack: Stack) -> None:
    status, headers, text = request(stack, "/v1/completions", COMPLETION)
    assert status == 401 and json.loads(text)["error"]["type"] == "authentication_error"
    assert "nginx/" not in headers.get("Server", "")
    status, _, text = request(stack, "/v1/completions", COMPLETION, key=stack.key)
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 4
    for path in ("/metrics", "/health", "/admin/token-log"):
        status, _, text = request(stack, path, key=stack.key)
        assert status == 404 and json.loads(text)["error"]["type"] == "not_found_error", path
    # the keys map is root's alone; nginx's stub_status answers on the host's loopback
    mode = stack.gpu.exec("stat", "-c", "%a %U", "/etc/nginx/gpufleet/api_keys.map").stdout.strip()
    assert mode == "600 root"
    status_port = stack.fleet.host(stack.gpu.name).config.gateway.status_port
    stub = stack.gpu.exec("curl", "-s", f"http://127.0.0.1:{status_port}/stub_status").stdout
    assert stub.startswith("Active connections")


def test_a_second_demo_run_reuses_the_hosts_and_changes_nothing(stack: Stack) -> None:
    def boot_times() -> dict[str, str]:  # pid 1's start time: the same until a container restarts
        return {host.container: host.exec("cat", "/proc/1/stat").stdout.split()[21] for host in (stack.gpu, stack.mon)}

    containers = boot_times()
    proc = run_demo(stack.inventory, stack.reports, "--ramp",
                    "--concurrency 4 --warmup-s 2 --measure-s 10 --input-tokens 128 --output-tokens 32")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    logs = Path(demo_runs(stack.reports)[-1]["run_dir"]) / "logs"
    assert "reusing the running host(s)" in (logs / "2-testbed.log").read_text()
    assert boot_times() == containers
    site_log = (logs / "3-site.log").read_text()
    assert grand_total(site_log)["changed"] == 0, "\n".join(changed_operations(site_log))


# --- drills under load -------------------------------------------------------------------------


@dataclass
class Load:
    """Streaming completions from a few clients until stopped; every admitted one must complete."""

    stack: Stack
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
        conn = http.client.HTTPConnection("127.0.0.1", self.stack.gateway_port, timeout=60)
        try:
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json", "Authorization": f"Bearer {self.stack.key}"})
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

    def failed_after(self, moment: float) -> list[str]:
        """Failures of requests that started after `moment` (record_starts)."""
        return [f for f in self.failures if f.startswith("@") and float(f[1:].split(" ", 1)[0]) > moment]

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(LOAD_CLIENTS)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)


def test_a_crashed_engine_fails_no_request_that_had_not_started(stack: Stack) -> None:
    """Docker restarts the crashed engine (restart unless-stopped); meanwhile its published port is
    Docker's proxy, which accepts and drops connections: nginx must send those requests on."""
    with Load(stack, record_starts=True) as load:
        time.sleep(2)
        # a crash, not `docker kill` (Docker counts that as a manual stop and does not restart)
        stack.gpu.exec("sh", "-c", "kill -9 $(docker inspect --format '{{.State.Pid}}' gpufleet-engine-1)")
        crashed_at = time.monotonic()  # requests started before this may have been on the engine
        time.sleep(12)  # through the engine's restart and start-up delay, and its return
    assert load.failed_after(crashed_at) == [], load.failed_after(crashed_at)[:5]
    assert len(load.failures) <= LOAD_CLIENTS, load.failures  # at most the streams open on it
    assert load.done > 20
    restarts = stack.gpu.exec("docker", "inspect", "--format", "{{.RestartCount}}", "gpufleet-engine-1").stdout
    assert int(restarts) >= 1


def test_a_killed_engine_fires_engine_down_while_the_gateway_serves_and_resolves_when_back(stack: Stack) -> None:
    """`docker kill` is a stop Docker does not undo: the engine stays down until someone starts it
    (the runbook's remedy), long enough for EngineDown (engine_down_for_s: 20 on the test bed)."""
    engine = "gpufleet-engine-0"
    try:
        with Load(stack, record_starts=True) as load:
            time.sleep(2)
            stack.gpu.exec("docker", "kill", engine, timeout=60)
            killed_at = time.monotonic()
            firing = wait_for("EngineDown firing",
                              lambda: query(stack, 'ALERTS{alertname="EngineDown", alertstate="firing"}'))
            served_while_down = load.done
            time.sleep(3)
            served_while_down = load.done - served_while_down
        assert [a["metric"]["host"] for a in firing] == [stack.gpu.name]
        assert load.failed_after(killed_at + 1) == [], load.failed_after(killed_at + 1)[:5]
        assert served_while_down > 0, "the gateway served nothing with one engine down"
        notified = wait_for("the webhook receiver got EngineDown",
                            lambda: stack.receiver.received("EngineDown", "firing"))
        alert = next(a for a in notified[0]["alerts"] if a["labels"]["alertname"] == "EngineDown")
        assert alert["labels"]["host"] == stack.gpu.name and alert["labels"]["severity"] == "page"
        assert alert["annotations"]["runbook_url"].endswith("EngineDown.md")
    finally:
        stack.gpu.exec("docker", "start", engine, timeout=60)
    wait_for("EngineDown resolved", lambda: not query(stack, 'ALERTS{alertname="EngineDown"}') or None)


def spec_hashes(stack: Stack) -> dict[str, str]:
    return {name: info["Config"]["Labels"]["io.gpufleet.spec-hash"] for name, info in engines(stack.gpu).items()}


def set_gpu_vars(stack: Stack, extra: dict) -> None:
    (stack.inventory / "host_vars" / f"{stack.gpu.name}.yml").write_text(
        yaml.safe_dump(TWO_INSTANCES | GENEROUS_LIMITS | extra))


def test_a_rolling_update_under_load_loses_no_admitted_request(stack: Stack) -> None:
    before = spec_hashes(stack)
    set_gpu_vars(stack, {"engine": {"extra_args": ["--startup-delay", "3"]}})
    with Load(stack) as load:
        time.sleep(2)
        output = deploy(stack.inventory / "inventory.py", "rollout.py")
        time.sleep(2)
        served_during = load.done
    assert load.failures == [], load.failures[:5]
    assert served_during > 20
    after = spec_hashes(stack)
    assert sorted(after) == sorted(before) and all(after[name] != before[name] for name in before), output[-3000:]
    for info in engines(stack.gpu).values():
        assert info["Args"][-2:] == ["--startup-delay", "3"]
    assert "down;" not in stack.gpu.exec("cat", "/etc/nginx/gpufleet/upstream.conf").stdout
    output = deploy(stack.inventory / "inventory.py", "rollout.py")  # everything at its spec: nothing to roll
    assert grand_total(output)["changed"] == 0, "\n".join(changed_operations(output))


def test_a_broken_image_is_rolled_back_and_the_old_spec_keeps_serving(stack: Stack) -> None:
    before = spec_hashes(stack)
    # an image that exists but cannot serve: busybox under the simulator's name
    stack.gpu.exec("docker", "tag", "gpufleet/busybox:standin", "gpufleet/sim:0.0.0-broken")
    set_gpu_vars(stack, {"engine": {"image": "gpufleet/sim:0.0.0-broken", "extra_args": ["--startup-delay", "3"]}})
    with Load(stack) as load:
        time.sleep(1)
        proc = subprocess.run([PYINFRA, "-y", str(stack.inventory / "inventory.py"), "deploy/rollout.py"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "rollout stopped" in output and "the previous container serves again" in output
    assert spec_hashes(stack) == before  # instance 0 restored, instance 1 never touched
    assert load.failures == [], load.failures[:5]
    assert "down;" not in stack.gpu.exec("cat", "/etc/nginx/gpufleet/upstream.conf").stdout
    status, _, _ = request(stack, "/v1/completions", COMPLETION, key=stack.key)
    assert status == 200


def test_demo_down_removes_the_hosts(stack: Stack) -> None:
    proc = subprocess.run([PYTHON, "-m", "gpufleet.demo", "down", "--inventory", str(stack.inventory)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"removed host {stack.gpu.name}" in proc.stdout and f"removed host {stack.mon.name}" in proc.stdout
    assert testbed.host_state(stack.gpu.name) is None and testbed.host_state(stack.mon.name) is None
    assert (stack.inventory / "secrets" / "api_keys").exists()  # without --all the keys stay
