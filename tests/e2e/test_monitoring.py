"""deploy/site.py with a monitoring host on the test bed: the live acceptance of the monitoring stack.

Two host containers as in inventories/local: a GPU host (4 simulated GPUs, its own gateway) and a
monitoring host on this machine's network. Prometheus reaches the GPU host's exporters and engine
at the loopback address the harness publishes them on (testbed.HostNetwork); the test reaches
Prometheus, Alertmanager and Grafana on the monitoring host's loopback address, and runs the
webhook receiver Alertmanager notifies on 127.0.0.1. Checked: every target the inventory implies
is scraped and up; every recording rule and every dashboard panel's query returns data from the
live Prometheus; Grafana is provisioned, password-protected and anonymous-free; a stopped engine
fires EngineDown, whose notification reaches the receiver, and resolves when it is back.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
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

from gpufleet.fleet import load_fleet
from gpufleet.monitoring.dashboards import expand, panel_queries
from gpufleet.monitoring.grafana import render_grafana
from gpufleet.monitoring.rules import render_rules
from gpufleet.monitoring.targets import scrape_targets
from gpufleet.schema.units import parse_listen
from gpufleet.testbed import hosts as testbed
from gpufleet.testbed.bed import host_networks, prepare_mirror
from tests.e2e.test_gpu_provisioning import changed_operations, grand_total, make_inventory
from tests.e2e.test_serving import deploy

GENEROUS_LIMITS = "gateway: {rate_per_second: 200, burst: 200, max_conns_per_key: 64}\n"
WAIT_S = 180  # every wait below is bounded by this


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
    inventory: Path
    gpu: testbed.TestbedHost
    mon: testbed.TestbedHost
    prometheus: str  # http://address:port
    alertmanager: str
    grafana: str
    gateway_port: int
    key: str
    receiver: Receiver
    fleet: object = field(repr=False)


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


def send_requests(stack: Stack, count: int) -> None:
    """Completions through the gateway (bounded): the engine, gateway and GPU series get values."""
    body = json.dumps({"model": "qwen2.5-7b-instruct", "prompt": "hello", "max_tokens": 8, "stream": True})
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", stack.gateway_port, timeout=30)
        conn.request("POST", "/v1/completions", body,
                     {"Content-Type": "application/json", "Authorization": f"Bearer {stack.key}"})
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status == 200


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    mirror = prepare_mirror(tmp_path_factory.mktemp("mirror"), sim_image=True)
    suffix = uuid.uuid4().hex[:6]
    gpu_name, mon_name = f"e2e-{suffix}-g", f"e2e-{suffix}-p"
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    inventory = make_inventory(tmp_path_factory.mktemp("inv") / "local", [gpu_name], gateway=True,
                               monitoring=mon_name)
    # the monitoring host shares this machine's network: its services on a loopback address of its own
    address = testbed.loopback_address(mon_name)
    (inventory.parent / "host_vars").mkdir(exist_ok=True)
    (inventory.parent / "host_vars" / f"{mon_name}.yml").write_text(yaml.safe_dump({"monitoring": {
        "listen_address": address, "exporter_address": address,
        "receivers": [{"name": "e2e", "kind": "webhook", "url": receiver.url}],
    }}))
    (inventory.parent / "host_vars" / f"{gpu_name}.yml").write_text(GENEROUS_LIMITS)
    fleet = load_fleet(inventory.parent)
    gateway_port = parse_listen(fleet.host(gpu_name).config.gateway.listen)[1]
    try:
        with testbed.testbed_hosts([gpu_name, mon_name], mirror_dir=mirror, gpus={gpu_name: 4, mon_name: 0},
                                   publish={gpu_name: [gateway_port]}, networks=host_networks(fleet)) as [gpu, mon]:
            deploy(inventory, "site.py")
            ports = fleet.host(mon_name).config.monitoring.ports
            yield Stack(
                inventory=inventory, gpu=gpu, mon=mon, fleet=fleet,
                prometheus=f"http://{address}:{ports.prometheus}", alertmanager=f"http://{address}:{ports.alertmanager}",
                grafana=f"http://{address}:{ports.grafana}", gateway_port=gpu.published(gateway_port),
                key=fleet.host(gpu_name).api_keys[0].key, receiver=receiver,
            )
    finally:
        receiver.shutdown()


def test_every_target_the_inventory_implies_is_scraped_and_up(stack: Stack) -> None:
    fleet = stack.fleet
    expected = {(t.job, t.host, t.address) for t in scrape_targets(fleet.hosts, fleet.host(stack.mon.name))}
    assert {job for job, _, _ in expected} == {"gpufleet-engine", "gpufleet-gpu-exporter", "node", "nginx",
                                               "gpufleet-gateway", "prometheus", "alertmanager"}

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


def test_a_second_site_run_changes_nothing(stack: Stack) -> None:
    output = deploy(stack.inventory, "site.py")
    assert grand_total(output)["changed"] == 0, "\n".join(changed_operations(output))


def test_a_stopped_engine_fires_engine_down_notifies_and_resolves(stack: Stack) -> None:
    engine = "gpufleet-engine-0"
    stack.gpu.exec("docker", "stop", engine, timeout=60)
    try:
        wait_for("EngineDown firing", lambda: query(stack, 'ALERTS{alertname="EngineDown", alertstate="firing"}'))
        notified = wait_for("the webhook receiver got EngineDown",
                            lambda: stack.receiver.received("EngineDown", "firing"))
        alert = next(a for a in notified[0]["alerts"] if a["labels"]["alertname"] == "EngineDown")
        assert alert["labels"]["host"] == stack.gpu.name and alert["labels"]["severity"] == "page"
        assert alert["annotations"]["runbook_url"].endswith("EngineDown.md")
    finally:
        stack.gpu.exec("docker", "start", engine, timeout=60)
    wait_for("EngineDown resolved", lambda: not query(stack, 'ALERTS{alertname="EngineDown"}') or None)
