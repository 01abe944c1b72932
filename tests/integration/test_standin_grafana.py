"""The stand-in Grafana server as shipped, run with python3 on 127.0.0.1 against a fake Prometheus on 127.0.0.1.

Each server gets a temporary ini file (the admin password comes from a $__file{} file), a
provisioning folder (one Prometheus data source pointing at the fake, one dashboard provider) and
port 0; its stderr says where it listens. The fake Prometheus answers /api/v1/query and
/api/v1/query_range as Prometheus does and records what it was asked. All waits are bounded; all
traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpufleet.testbed.standin import packages

pytestmark = pytest.mark.integration

PASSWORD = "s3cret pw; #1 ü"  # read from a file: ; and # are not comments there
START_TIMEOUT_S = 20
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never through a proxy
SERIES = [
    {"__name__": "gpufleet_gpu_up", "instance": "gpu-01:9400", "gpu": "0"},
    {"__name__": "gpufleet_gpu_up", "instance": "gpu-01:9400", "gpu": "1"},
]
GET_UID = "P" + hashlib.sha256(b"Prometheus (GET)").hexdigest()[:16].upper()  # Grafana's uid from the name
DASHBOARDS = {
    "fleet.json": {"uid": "gpufleet-fleet", "title": "GPU fleet", "tags": ["gpufleet", "gpu"], "panels": []},
    "slo.json": {"uid": "gpufleet-slo", "title": "Serving SLOs", "tags": ["gpufleet", "slo"], "panels": []},
}


# --- a fake Prometheus ------------------------------------------------------------------------------------------


@dataclass
class FakePrometheus:
    url: str
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (method, path, params)

    def last(self, path: str) -> tuple[str, dict[str, str]]:
        found = [(method, params) for method, where, params in self.requests if where == path]
        assert found, f"the fake Prometheus was not asked for {path}: {self.requests}"
        return found[-1]


def prometheus_answer(path: str, params: dict[str, str]) -> tuple[int, dict]:
    query = params.get("query", "")
    if "syntax error" in query:
        return 400, {
            "status": "error",
            "errorType": "bad_data",
            "error": 'invalid parameter "query": 1:8: parse error: unexpected identifier "error"',
        }
    if "absent_series" in query:
        kind = "matrix" if path.endswith("query_range") else "vector"
        return 200, {"status": "success", "data": {"resultType": kind, "result": []}}
    if path == "/api/v1/query_range":
        start, end, step = float(params["start"]), float(params["end"]), float(params["step"])
        times = [start + step * i for i in range(int((end - start) // step) + 1)][:4]
        result = [
            {"metric": SERIES[0], "values": [[t, "1"] for t in times]},
            {"metric": SERIES[1], "values": [[t, "NaN" if i == 1 else "0.5"] for i, t in enumerate(times)]},
        ]
        return 200, {"status": "success", "data": {"resultType": "matrix", "result": result}}
    if path == "/api/v1/query":
        moment = float(params["time"])
        if query.startswith("scalar("):
            return 200, {"status": "success", "data": {"resultType": "scalar", "result": [moment, "2"]}}
        result = [{"metric": SERIES[0], "value": [moment, "1"]}, {"metric": SERIES[1], "value": [moment, "+Inf"]}]
        return 200, {"status": "success", "data": {"resultType": "vector", "result": result}}
    return 404, {"status": "error", "errorType": "not_found", "error": f"no {path}"}


@pytest.fixture(scope="module")
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus("")

    class Handler(BaseHTTPRequestHandler):
        def answer(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            raw = url.query
            if method == "POST":
                assert self.headers["Content-Type"] == "application/x-www-form-urlencoded"
                raw = self.rfile.read(int(self.headers["Content-Length"])).decode()
            params = dict(urllib.parse.parse_qsl(raw))
            fake.requests.append((method, url.path, params))
            status, payload = prometheus_answer(url.path, params)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.answer("GET")

        def do_POST(self) -> None:
            self.answer("POST")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- the stand-in ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/grafana exactly as the package ships it."""
    path = tmp_path_factory.mktemp("bin") / "grafana"
    home = packages.GRAFANA_HOME
    path.write_bytes(next(e.data for e in packages.grafana_package().files if e.path == f"{home}/bin/grafana"))
    path.chmod(0o755)
    return path


@dataclass
class Grafana:
    url: str
    process: subprocess.Popen[str]
    lines: list[str]
    root: Path

    def log(self) -> str:
        return "\n".join(self.lines)


def layout(root: Path, prometheus_url: str, *, anonymous: bool = False) -> list[str]:
    """An ini file, a password file and provisioning under `root`, as the monitoring role lays them out."""
    (root / "provisioning/datasources").mkdir(parents=True)
    (root / "provisioning/dashboards").mkdir(parents=True)
    (root / "dashboards/gpufleet").mkdir(parents=True)
    (root / "admin_password").write_text(PASSWORD + "\n")
    (root / "grafana.ini").write_text(
        "# written by the test, as the monitoring role writes /etc/grafana/grafana.ini\n"
        "[server]\nhttp_addr = 127.0.0.1\nhttp_port = 0\n\n"
        f"[security]\nadmin_user = admin\nadmin_password = $__file{{{root / 'admin_password'}}}\n\n"
        f"[auth.anonymous]\nenabled = {'true' if anonymous else 'false'}\n"
    )
    (root / "provisioning/datasources/gpufleet.yml").write_text(
        "apiVersion: 1\n"
        "datasources:\n"
        "  - name: Prometheus\n"
        "    type: prometheus\n"
        "    uid: gpufleet-prometheus\n"
        "    access: proxy\n"
        f"    url: {prometheus_url}\n"
        "    isDefault: true\n"
        "    editable: false\n"
        "    jsonData:\n"
        "      timeInterval: 15s\n"
        "      httpMethod: POST\n"
        "    secureJsonData:\n"
        "      httpHeaderValue1: 'not served'\n"
        "  - name: Prometheus (GET)\n"
        "    type: prometheus\n"
        f"    url: {prometheus_url}/\n"
        "    jsonData: {httpMethod: GET, timeInterval: 30s}\n"
    )
    (root / "provisioning/dashboards/gpufleet.yaml").write_text(
        "apiVersion: 1\n"
        "providers:\n"
        "  - name: gpufleet\n"
        "    folder: gpufleet\n"
        "    type: file\n"
        "    disableDeletion: true\n"
        "    options:\n"
        f"      path: {root / 'dashboards/gpufleet'}\n"
    )
    for name, dashboard in DASHBOARDS.items():
        (root / "dashboards/gpufleet" / name).write_text(json.dumps(dashboard))
    return [
        f"--config={root / 'grafana.ini'}",
        f"--homepath={root}",
        f"cfg:default.paths.provisioning={root / 'provisioning'}",
        f"cfg:default.paths.data={root / 'data'}",
    ]


def start(program: Path, root: Path, args: list[str]) -> Grafana:
    """The server, started and listening (its stderr read on a thread), or AssertionError with its log."""
    process = subprocess.Popen(
        [sys.executable, str(program), "server", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    listening = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if 'msg="HTTP Server Listen"' in line:
                listening.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not listening.is_set() and process.poll() is None and time.monotonic() < deadline:
        listening.wait(0.05)
    if not listening.is_set():
        process.kill()
        process.wait(timeout=10)
        raise AssertionError("the stand-in did not start:\n" + "\n".join(lines))
    match = re.search(r"address=(127\.0\.0\.1:\d+)", "\n".join(lines))
    assert match, lines
    return Grafana(f"http://{match.group(1)}", process, lines, root)


def stop(grafana: Grafana) -> int:
    if grafana.process.poll() is None:
        grafana.process.send_signal(signal.SIGTERM)
    try:
        return grafana.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        grafana.process.kill()
        grafana.process.wait(timeout=10)
        raise


@pytest.fixture(scope="module")
def grafana(program: Path, prometheus: FakePrometheus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grafana]:
    root = tmp_path_factory.mktemp("grafana")
    server = start(program, root, layout(root, prometheus.url))
    try:
        yield server
    finally:
        stop(server)


@pytest.fixture(scope="module")
def anonymous(program: Path, prometheus: FakePrometheus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grafana]:
    root = tmp_path_factory.mktemp("anonymous")
    server = start(program, root, layout(root, prometheus.url, anonymous=True))
    try:
        yield server
    finally:
        stop(server)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: object


def call(
    url: str, method: str = "GET", body: object = None, auth: tuple[str, str] | None = ("admin", PASSWORD)
) -> Response:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with OPENER.open(request, timeout=15) as response:
            status, headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, headers, raw = exc.code, dict(exc.headers), exc.read()
    is_json = headers.get("Content-Type", "").startswith("application/json")
    return Response(status, headers, json.loads(raw) if is_json else raw.decode())


def query(grafana: Grafana, *queries: dict, frm: str = "now-5m", to: str = "now") -> Response:
    return call(f"{grafana.url}/api/ds/query", "POST", {"queries": list(queries), "from": frm, "to": to})


# --- health, auth, the stand-in's label --------------------------------------------------------------------------


def test_health_needs_no_auth_and_says_stand_in(grafana: Grafana) -> None:
    health = call(f"{grafana.url}/api/health", auth=None)
    assert health.status == 200
    assert health.body == {"commit": "gpufleet-standin", "database": "ok", "version": "12.2.1"}
    assert health.headers["X-Gpufleet-Standin"] == "grafana"
    assert "gpufleet STAND-IN for Grafana, not Grafana" in grafana.log()
    assert 'msg="Starting Grafana" version=12.2.1' in grafana.log()


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        (None, "Unauthorized"),
        (("admin", "admin"), "Invalid username or password"),
        (("root", PASSWORD), "Invalid username or password"),
        (("admin", PASSWORD + "\n"), "Invalid username or password"),
    ],
)
def test_api_needs_the_admin_password_from_the_file(
    grafana: Grafana, auth: tuple[str, str] | None, message: str
) -> None:
    for path in ("/api/datasources", "/api/search", "/api/dashboards/uid/gpufleet-fleet"):
        refused = call(f"{grafana.url}{path}", auth=auth)
        assert refused.status == 401, path
        assert isinstance(refused.body, dict) and refused.body["message"] == message
        assert refused.headers["X-Gpufleet-Standin"] == "grafana"
    assert query(grafana, {"refId": "A", "datasource": {"uid": "gpufleet-prometheus"}, "expr": "up"}).status == 200
    assert call(f"{grafana.url}/api/search", "GET", auth=("admin", PASSWORD)).status == 200


def test_there_is_no_ui(grafana: Grafana) -> None:
    page = call(f"{grafana.url}/", auth=None)
    assert page.status == 404 and "no UI" in str(page.body)


# --- provisioning -------------------------------------------------------------------------------------------------


def test_datasources_are_provisioned(grafana: Grafana, prometheus: FakePrometheus) -> None:
    listing = call(f"{grafana.url}/api/datasources")
    assert listing.status == 200
    assert isinstance(listing.body, list)
    assert [(ds["name"], ds["uid"], ds["type"]) for ds in listing.body] == [
        ("Prometheus", "gpufleet-prometheus", "prometheus"),
        ("Prometheus (GET)", GET_UID, "prometheus"),
    ]
    one = call(f"{grafana.url}/api/datasources/uid/gpufleet-prometheus").body
    assert isinstance(one, dict)
    assert (one["url"], one["access"], one["isDefault"], one["readOnly"]) == (prometheus.url, "proxy", True, True)
    assert one["jsonData"] == {"timeInterval": "15s", "httpMethod": "POST"}
    assert one["secureJsonFields"] == {"httpHeaderValue1": True}
    assert "not served" not in json.dumps(listing.body)
    by_name = call(f"{grafana.url}/api/datasources/name/{urllib.parse.quote('Prometheus (GET)')}")
    assert isinstance(by_name.body, dict) and by_name.body["jsonData"] == {"httpMethod": "GET", "timeInterval": "30s"}
    missing = call(f"{grafana.url}/api/datasources/uid/nope")
    assert (missing.status, missing.body) == (404, {"message": "Data source not found"})


def test_dashboards_are_provisioned_into_their_folder(grafana: Grafana) -> None:
    search = call(f"{grafana.url}/api/search?type=dash-db")
    assert search.status == 200 and isinstance(search.body, list)
    assert [(h["uid"], h["title"], h["folderTitle"], h["tags"], h["type"]) for h in search.body] == [
        ("gpufleet-fleet", "GPU fleet", "gpufleet", ["gpufleet", "gpu"], "dash-db"),
        ("gpufleet-slo", "Serving SLOs", "gpufleet", ["gpufleet", "slo"], "dash-db"),
    ]
    tagged = call(f"{grafana.url}/api/search?type=dash-db&tag=slo").body
    assert isinstance(tagged, list) and [h["uid"] for h in tagged] == ["gpufleet-slo"]
    by_title = call(f"{grafana.url}/api/search?query=fleet").body
    assert isinstance(by_title, list) and [h["type"] for h in by_title] == ["dash-folder", "dash-db"]
    folders = call(f"{grafana.url}/api/folders").body
    assert isinstance(folders, list) and [f["title"] for f in folders] == ["gpufleet"]
    found = call(f"{grafana.url}/api/dashboards/uid/gpufleet-slo")
    assert found.status == 200 and isinstance(found.body, dict)
    assert found.body["dashboard"]["title"] == "Serving SLOs" and found.body["dashboard"]["uid"] == "gpufleet-slo"
    meta = found.body["meta"]
    assert (meta["provisioned"], meta["provisionedExternalId"], meta["folderTitle"]) == (True, "slo.json", "gpufleet")
    assert meta["url"] == "/d/gpufleet-slo/serving-slos"
    missing = call(f"{grafana.url}/api/dashboards/uid/nope")
    assert (missing.status, missing.body) == (404, {"message": "Dashboard not found"})


# --- /api/ds/query --------------------------------------------------------------------------------------------------


def test_instant_query_is_proxied_with_labels_on_the_value_field(grafana: Grafana, prometheus: FakePrometheus) -> None:
    to_ms = 1_700_000_000_000
    answer = query(
        grafana,
        {
            "refId": "up",
            "datasource": {"uid": "gpufleet-prometheus", "type": "prometheus"},
            "expr": "gpufleet_gpu_up",
            "instant": True,
            "range": False,
        },
        frm=str(to_ms - 300_000),
        to=str(to_ms),
    )
    assert answer.status == 200, answer.body
    method, params = prometheus.last("/api/v1/query")
    assert method == "POST"  # jsonData.httpMethod
    assert params == {"query": "gpufleet_gpu_up", "time": "1700000000"}
    assert isinstance(answer.body, dict)
    result = answer.body["results"]["up"]
    assert result["status"] == 200
    frames = result["frames"]
    assert len(frames) == 2  # one per series
    for frame, labels in zip(frames, SERIES, strict=True):
        time_field, value_field = frame["schema"]["fields"]
        assert (time_field["name"], time_field["type"]) == ("Time", "time")
        assert (value_field["name"], value_field["type"], value_field["labels"]) == ("Value", "number", labels)
        assert frame["schema"]["refId"] == "up"
        assert frame["schema"]["meta"]["type"] == "numeric-multi"
        assert frame["data"]["values"][0] == [to_ms]
    assert frames[0]["data"]["values"][1] == [1.0]
    assert frames[1]["data"]["values"][1] == [None]  # +Inf: JSON cannot carry it, Grafana marks it
    assert frames[1]["data"]["entities"] == [None, {"Inf": [0]}]


def test_range_query_substitutes_variables_and_steps_by_interval(grafana: Grafana, prometheus: FakePrometheus) -> None:
    to_ms = 1_700_000_010_000  # not a multiple of the step: Grafana aligns start and end down
    answer = query(
        grafana,
        {
            "refId": "A",
            "datasource": {"uid": "gpufleet-prometheus"},
            "range": True,
            "intervalMs": 30_000,
            "expr": "sum(rate(gpufleet_tokens_total[$__rate_interval])) / $__interval_ms [$__interval] $__range",
            "legendFormat": "{{instance}} gpu {{gpu}}",
        },
        frm=str(to_ms - 600_000),
        to=str(to_ms),
    )
    assert answer.status == 200, answer.body
    method, params = prometheus.last("/api/v1/query_range")
    assert method == "POST"
    # $__rate_interval = max(4 * timeInterval (15s), interval (30s) + timeInterval) = 60s, as Go prints it
    assert params["query"] == "sum(rate(gpufleet_tokens_total[1m0s])) / 30000 [30s] 600s"
    assert (params["start"], params["end"], params["step"]) == ("1699999410", "1700000010", "30")
    assert isinstance(answer.body, dict)
    frames = answer.body["results"]["A"]["frames"]
    assert [frame["schema"]["fields"][1]["labels"] for frame in frames] == SERIES
    assert frames[0]["schema"]["meta"]["type"] == "timeseries-multi"
    assert frames[0]["schema"]["fields"][0]["config"] == {"interval": 30_000}
    assert frames[0]["data"]["values"][0] == [1699999410_000 + 30_000 * i for i in range(4)]
    assert frames[0]["data"]["values"][1] == [1.0, 1.0, 1.0, 1.0]
    assert frames[1]["data"]["values"][1] == [0.5, None, 0.5, 0.5]
    assert frames[1]["data"]["entities"] == [None, {"NaN": [1]}]
    assert frames[1]["schema"]["fields"][1]["config"] == {"displayNameFromDS": "gpu-01:9400 gpu 1"}


def test_range_query_defaults_to_the_scrape_interval_and_get(grafana: Grafana, prometheus: FakePrometheus) -> None:
    """No intervalMs: the step is the data source's timeInterval (30s here); httpMethod GET is honoured."""
    answer = query(grafana, {"refId": "B", "datasource": {"uid": GET_UID}, "expr": "up[$__rate_interval]"})
    assert answer.status == 200, answer.body
    method, params = prometheus.last("/api/v1/query_range")
    assert method == "GET"
    assert params["step"] == "30" and params["query"] == "up[2m0s]"  # 4 x 30s
    assert float(params["end"]) - float(params["start"]) == pytest.approx(300, abs=30)


def test_instant_and_range_together_and_empty_results(grafana: Grafana) -> None:
    both = query(
        grafana,
        {"refId": "A", "datasource": {"uid": "gpufleet-prometheus"}, "expr": "up", "instant": True, "range": True},
    )
    assert isinstance(both.body, dict)
    kinds = [frame["schema"]["meta"]["type"] for frame in both.body["results"]["A"]["frames"]]
    assert kinds == ["timeseries-multi"] * 2 + ["numeric-multi"] * 2
    empty = query(grafana, {"refId": "E", "datasource": {"uid": "gpufleet-prometheus"}, "expr": "absent_series"})
    assert isinstance(empty.body, dict)
    assert [frame["schema"]["fields"] for frame in empty.body["results"]["E"]["frames"]] == [[]]
    scalar = query(
        grafana, {"refId": "S", "datasource": {"uid": "gpufleet-prometheus"}, "expr": "scalar(up)", "instant": True}
    )
    assert isinstance(scalar.body, dict)
    (frame,) = scalar.body["results"]["S"]["frames"]
    assert frame["schema"]["fields"][1]["labels"] == {} and frame["data"]["values"][1] == [2.0]


def test_prometheus_errors_come_back_per_query(grafana: Grafana) -> None:
    answer = query(
        grafana,
        {"refId": "bad", "datasource": {"uid": "gpufleet-prometheus"}, "expr": "syntax error", "instant": True},
        {"refId": "good", "datasource": {"uid": "gpufleet-prometheus"}, "expr": "up", "instant": True},
    )
    assert answer.status == 400
    assert isinstance(answer.body, dict)
    bad = answer.body["results"]["bad"]
    assert bad["status"] == 400 and bad["error"].startswith('bad_data: invalid parameter "query"')
    assert answer.body["results"]["good"]["status"] == 200


def test_query_errors_of_the_request(grafana: Grafana) -> None:
    unknown = query(grafana, {"refId": "A", "datasource": {"uid": "nope"}, "expr": "up"})
    assert (unknown.status, unknown.body) == (404, {"message": "Data source not found"})
    empty = call(f"{grafana.url}/api/ds/query", "POST", {"queries": [], "from": "now-5m", "to": "now"})
    assert empty.status == 400
    bad_time = query(grafana, {"refId": "A", "datasource": {"uid": "gpufleet-prometheus"}, "expr": "up"}, frm="soon")
    assert bad_time.status == 400 and "invalid time" in str(bad_time.body)


def test_datasource_proxy_passes_requests_on(grafana: Grafana, prometheus: FakePrometheus) -> None:
    url = f"{grafana.url}/api/datasources/proxy/uid/gpufleet-prometheus/api/v1/query?query=up&time=1700000000"
    answer = call(url)
    assert answer.status == 200 and isinstance(answer.body, dict) and answer.body["status"] == "success"
    assert prometheus.last("/api/v1/query") == ("GET", {"query": "up", "time": "1700000000"})


# --- anonymous access ------------------------------------------------------------------------------------------------


def test_anonymous_access_is_off_unless_enabled(grafana: Grafana, anonymous: Grafana) -> None:
    assert call(f"{grafana.url}/api/search", auth=None).status == 401
    assert call(f"{anonymous.url}/api/search", auth=None).status == 200
    assert call(f"{anonymous.url}/api/dashboards/uid/gpufleet-fleet", auth=None).status == 200
    viewer = query(anonymous, {"refId": "A", "datasource": {"uid": "gpufleet-prometheus"}, "expr": "up"})
    assert viewer.status == 200
    assert call(f"{anonymous.url}/api/datasources", auth=None).status == 403  # a Viewer may query, not list
    assert call(f"{anonymous.url}/api/search", auth=("admin", "wrong")).status == 401  # bad credentials still fail
    assert call(f"{anonymous.url}/api/datasources").status == 200


# --- start and stop -------------------------------------------------------------------------------------------------


def test_sigterm_exits_zero_and_removes_the_pidfile(program: Path, prometheus: FakePrometheus, tmp_path: Path) -> None:
    pidfile = tmp_path / "grafana-server.pid"
    server = start(program, tmp_path, [*layout(tmp_path, prometheus.url), f"--pidfile={pidfile}", "--packaging=deb"])
    assert pidfile.read_text() == f"{server.process.pid}\n"
    assert call(f"{server.url}/api/health", auth=None).status == 200
    assert stop(server) == 0
    assert not pidfile.exists()
    assert 'msg="Shutdown completed"' in server.log()


def broken(root: Path) -> dict[str, tuple[Path, str]]:
    """Ways to break the provisioning laid out in `root`: name -> (the file to name, what the error says)."""
    datasources, dashboards = root / "provisioning/datasources", root / "provisioning/dashboards"
    return {
        "bad indentation": (datasources / "gpufleet.yml", "bad indentation"),
        "datasource without type": (datasources / "extra.yaml", "expected a mapping with name and type"),
        "tab-indented yaml": (dashboards / "gpufleet.yaml", "tabs cannot indent YAML"),
        "dashboard folder missing": (dashboards / "gpufleet.yaml", "is not a folder"),
        "dashboard json broken": (root / "dashboards/gpufleet/fleet.json", "Expecting"),
        "apiVersion 2": (datasources / "gpufleet.yml", "apiVersion: 1"),
    }


def break_provisioning(root: Path, case: str) -> None:
    target, _ = broken(root)[case]
    if case == "bad indentation":
        target.write_text(target.read_text().replace("    type: prometheus\n", "      type: prometheus\n", 1))
    elif case == "datasource without type":
        target.write_text("apiVersion: 1\ndatasources:\n  - name: Loki\n    url: http://127.0.0.1:3100\n")
    elif case == "tab-indented yaml":
        target.write_text(target.read_text().replace("  - name: gpufleet", "\t- name: gpufleet"))
    elif case == "dashboard folder missing":
        target.write_text(target.read_text().replace("dashboards/gpufleet", "dashboards/missing"))
    elif case == "dashboard json broken":
        target.write_text('{"title": "GPU fleet", "panels": [')
    elif case == "apiVersion 2":
        target.write_text(target.read_text().replace("apiVersion: 1", "apiVersion: 2"))


@pytest.mark.parametrize("case", list(broken(Path("/"))))
def test_invalid_provisioning_stops_the_start_naming_the_file(
    program: Path, prometheus: FakePrometheus, tmp_path: Path, case: str
) -> None:
    args = layout(tmp_path, prometheus.url)
    break_provisioning(tmp_path, case)
    target, message = broken(tmp_path)[case]
    process = subprocess.run(
        [sys.executable, str(program), "server", *args], capture_output=True, text=True, timeout=START_TIMEOUT_S
    )
    assert process.returncode == 1, process.stderr
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ✗ ") and str(target) in last and message in last, process.stderr
    assert "HTTP Server Listen" not in process.stderr


def test_two_default_datasources_stop_the_start(program: Path, prometheus: FakePrometheus, tmp_path: Path) -> None:
    args = layout(tmp_path, prometheus.url)
    (tmp_path / "provisioning/datasources/second.yaml").write_text(
        "apiVersion: 1\ndatasources:\n  - {name: Other, type: prometheus, url: 'http://127.0.0.1:1', isDefault: true}\n"
    )
    process = subprocess.run(
        [sys.executable, str(program), "server", *args], capture_output=True, text=True, timeout=START_TIMEOUT_S
    )
    assert process.returncode == 1
    assert "Only one datasource per organization can be marked as default (Prometheus, Other)" in process.stderr
