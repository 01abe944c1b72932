"""Grafana's provisioning and dashboards rendered from the inventory: the committed copies equal the
rendering, every panel is complete, every query is valid PromQL (promtool) over metrics something
produces, and the thresholds follow the inventory."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.exporter.metrics import ALL_METRICS as GPU_EXPORTER_METRICS
from gpufleet.fleet import load_fleet
from gpufleet.gatewaylog.metrics import ALL_METRICS as GATEWAY_EXPORTER_METRICS
from gpufleet.monitoring.dashboards import DASHBOARD_UIDS, dashboards, expand, gpu_memory_limits, panel_queries
from gpufleet.monitoring.dashboards_panels import DATASOURCE, GRID_WIDTH, SCHEMA_VERSION, all_panels
from gpufleet.monitoring.grafana import (
    DASHBOARDS_DIR,
    DASHBOARDS_PATH,
    DATASOURCE_UID,
    DATASOURCES_FILE,
    PROVIDERS_FILE,
    render_grafana,
)
from gpufleet.monitoring.render import GRAFANA_DIR, render_files
from gpufleet.monitoring.rules import ENGINE_METRICS, ITL_OLD, KV_CACHE_OLD, rule_groups
from gpufleet.monitoring.thresholds import fleet_thresholds
from gpufleet.sim.metrics import VllmMetrics
from gpufleet.sim.types import EngineStats, SimConfig
from tests.conftest import InventoryFactory, base_file

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventories" / "example"
GRAFANA = REPO / "monitoring" / GRAFANA_DIR

Board = dict[str, Any]

# node_exporter's and nginx-prometheus-exporter's names the dashboards may read (their own projects
# define them); `up` and `ALERTS` are Prometheus' own series
OTHER_EXPORTERS = {
    "node_memory_MemAvailable_bytes", "node_memory_MemTotal_bytes", "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes", "node_cpu_seconds_total", "node_load1",
    "nginx_up", "nginx_connections_active", "nginx_connections_accepted", "nginx_connections_handled",
    "nginx_connections_reading", "nginx_connections_writing", "nginx_connections_waiting",
    "nginx_http_requests_total",
}
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan", "Inf", "NaN"}


def boards_for(root: Path) -> dict[str, Board]:
    return {board["uid"]: board for board in dashboards(load_fleet(root, check_secrets=False))}


def panel(board: Board, title: str) -> dict[str, Any]:
    (found,) = [p for p in all_panels(board) if p["title"] == title]
    return found


def steps(panel_: dict[str, Any]) -> list[float]:
    """The threshold values of a panel (the base step has none)."""
    return [s["value"] for s in panel_["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["value"] is not None]


def promtool() -> str:
    """promtool on PATH; a clear failure, not a skip, without it."""
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool is not installed: run scripts/bootstrap.sh as root, or apt-get install prometheus",
                    pytrace=False)
    return found


# ---- the committed copies ------------------------------------------------------------------------


def test_committed_grafana_files_are_the_example_inventorys_rendering() -> None:
    rendered = {rel: text for rel, text in render_files(EXAMPLE).items() if rel.parts[0] == str(GRAFANA_DIR)}
    expected = {GRAFANA_DIR / DATASOURCES_FILE, GRAFANA_DIR / PROVIDERS_FILE,
                *(GRAFANA_DIR / DASHBOARDS_DIR / f"{uid}.json" for uid in DASHBOARD_UIDS)}
    assert set(rendered) == expected
    committed = {p.relative_to(GRAFANA.parent) for p in GRAFANA.rglob("*") if p.is_file()}
    assert committed == expected, "monitoring/grafana holds files the rendering does not"
    for rel, text in rendered.items():
        assert (GRAFANA.parent / rel).read_text(encoding="utf-8") == text, (
            f"monitoring/{rel} is stale: run python -m gpufleet.monitoring.render inventories/example monitoring"
        )
        if rel.suffix == ".json":
            assert text == json.dumps(json.loads(text), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def test_provisioning_files() -> None:
    datasources = yaml.safe_load((GRAFANA / DATASOURCES_FILE).read_text())
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source | {"jsonData": None} == {
        "name": "gpufleet Prometheus", "type": "prometheus", "uid": DATASOURCE_UID, "access": "proxy",
        "url": "http://127.0.0.1:9090", "isDefault": True, "editable": False, "version": 1, "jsonData": None,
    }
    assert source["jsonData"]["timeInterval"] == "15s"  # the inventory's scrape interval
    providers = yaml.safe_load((GRAFANA / PROVIDERS_FILE).read_text())
    (provider,) = providers["providers"]
    assert provider["folder"] == "gpufleet" and provider["type"] == "file"
    assert provider["disableDeletion"] is True and provider["allowUiUpdates"] is False
    assert provider["updateIntervalSeconds"] == 30
    assert provider["options"]["path"] == DASHBOARDS_PATH == "/var/lib/grafana/dashboards/gpufleet"


# ---- every dashboard and panel ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def example() -> dict[str, Board]:
    return boards_for(EXAMPLE)


def test_four_dashboards_with_stable_uids_and_common_settings(example: dict[str, Board]) -> None:
    assert list(example) == ["gpufleet-slo", "gpufleet-gpus", "gpufleet-gateway", "gpufleet-engine"]
    assert len(set(DASHBOARD_UIDS)) == len(DASHBOARD_UIDS) == 4
    titles = [board["title"] for board in example.values()]
    assert len(set(titles)) == len(titles)
    for board in example.values():
        assert board["schemaVersion"] == SCHEMA_VERSION == 39
        assert board["tags"] == ["gpufleet"]
        assert board["time"] == {"from": "now-1h", "to": "now"} and board["refresh"] == "30s"
        first = board["templating"]["list"][0]
        assert (first["name"], first["type"], first["query"]) == ("datasource", "datasource", "prometheus")
        ids = [p["id"] for p in board["panels"]]
        assert len(set(ids)) == len(ids)


def test_every_panel_has_title_description_unit_and_targets(example: dict[str, Board]) -> None:
    for uid, board in example.items():
        panels = list(all_panels(board))
        assert len(panels) >= 8, uid
        for p in panels:
            where = f"{uid}: {p.get('title')!r}"
            assert p["title"].strip() and p["description"].strip(), where
            assert p["fieldConfig"]["defaults"]["unit"], where
            assert p["datasource"] == DATASOURCE == {"type": "prometheus", "uid": "${datasource}"}, where
            assert p["targets"], where
            ref_ids = [t["refId"] for t in p["targets"]]
            assert len(set(ref_ids)) == len(ref_ids), where
            for target in p["targets"]:
                assert target["expr"].strip() and isinstance(target["legendFormat"], str), where
                assert target["datasource"] == DATASOURCE, where


def test_panels_fit_the_grid_without_overlapping(example: dict[str, Board]) -> None:
    for uid, board in example.items():
        taken: set[tuple[int, int]] = set()
        for p in board["panels"]:
            pos = p["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= GRID_WIDTH, (uid, p["title"])
            cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                     for y in range(pos["y"], pos["y"] + pos["h"])}
            assert not cells & taken, (uid, p["title"])
            taken |= cells


def test_no_expression_is_written_twice(example: dict[str, Board]) -> None:
    for uid, board in example.items():
        exprs = [expr for _, expr in panel_queries(board)]
        repeated = {e for e in exprs if exprs.count(e) > 1}
        assert not repeated, (uid, repeated)


def test_rate_windows_are_grafanas_rate_interval(example: dict[str, Board]) -> None:
    for board in example.values():
        for title, expr in panel_queries(board):
            for window in re.findall(r"\[([^\]]+)\]", expr):
                assert window in ("$__rate_interval", "$__range"), (title, expr)


def test_variables_in_queries_are_defined_before_use(example: dict[str, Board]) -> None:
    for uid, board in example.items():
        variables = board["templating"]["list"]
        defined = {"datasource"}
        for variable in variables[1:]:
            used = set(re.findall(r"\$(\w+)", variable["definition"]))
            assert used <= defined, (uid, variable["name"], used - defined)
            defined.add(variable["name"])
        for title, expr in panel_queries(board):
            used = {name for name in re.findall(r"\$\{?(\w+)", expr) if not name.startswith("__")}
            assert used <= defined - {"datasource"}, (uid, title, used - defined)


# ---- the queries are valid PromQL over metrics something produces ----------------------------------


def variable_selectors(board: Board) -> list[tuple[str, str]]:
    """The series selector of each label_values() query variable."""
    found = []
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["definition"])
            assert match, variable["definition"]
            found.append((f"variable {variable['name']}", match.group(1)))
    return found


def all_queries(boards: dict[str, Board]) -> list[tuple[str, str]]:
    return [(f"{uid}: {title}", expr) for uid, board in boards.items()
            for title, expr in [*panel_queries(board), *variable_selectors(board)]]


def test_promtool_accepts_every_query_with_variables_expanded(example: dict[str, Board], tmp_path: Path) -> None:
    chosen = {"host": ["gpu-01", "gw.01"], "instance": ["198.51.100.11:8000"], "gpu": "0|1",
              "model_name": ["qwen2.5-7b-instruct"], "__rate_interval": "2m"}
    rules = []
    for values in ({}, chosen):
        for where, expr in all_queries(example):
            rules.append({"record": f"gpufleet_check:panel_{len(rules)}", "expr": expand(expr, values),
                          "labels": {"where": where}})
    path = tmp_path / "panels.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}, sort_keys=False))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels, keywords or numbers)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for token in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[token.end():].lstrip().startswith("(") or token.group() in KEYWORDS:
            continue
        names.add(token.group())
    return names


def simulator_metric_names() -> set[str]:
    config = SimConfig(model="Qwen/Qwen2.5-7B-Instruct", served_model_name="qwen", max_model_len=4096,
                       max_num_seqs=8, max_num_batched_tokens=2048, block_size=16, num_gpu_blocks=100,
                       gpu_memory_utilization=0.9, tensor_parallel_size=1)
    stats = EngineStats(num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=100,
                        prompt_tokens_total=0, generation_tokens_total=0, preemptions_total=0, steps_total=0)
    exposed = VllmMetrics(config, lambda: stats, profile="p").render().decode()
    return set(re.findall(r"^(vllm:[a-z0-9_]+)", exposed, re.MULTILINE))


def test_metric_name_extraction() -> None:
    assert metric_names('sum by (host, le) (rate(a_bucket{x="b c"}[5m])) / on (host) group_left b or vector(0)') == {
        "a_bucket", "b"}
    assert metric_names("model_name:x:rate5m{model_name=\"m\"} / (1 - 0.99)") == {"model_name:x:rate5m"}


def test_every_metric_a_query_reads_is_produced(example: dict[str, Board]) -> None:
    fleet = load_fleet(EXAMPLE, check_secrets=False)
    records = {rule["record"] for group in rule_groups(fleet) for rule in group["rules"] if "record" in rule}
    known = (
        set(ENGINE_METRICS) | {ITL_OLD, KV_CACHE_OLD} | simulator_metric_names() | records
        | {m.name for m in GPU_EXPORTER_METRICS} | {m.name for m in GATEWAY_EXPORTER_METRICS}
        | OTHER_EXPORTERS | PROMETHEUS_SERIES
    )
    unknown = {}
    for where, expr in all_queries(example):
        names = metric_names(expr)
        assert names, (where, expr)
        for name in names:
            if name not in known and re.sub(r"_(bucket|count|sum)$", "", name) not in known:
                unknown[name] = where
    assert not unknown, unknown


# ---- thresholds follow the inventory ----------------------------------------------------------------


def test_slo_thresholds_come_from_the_inventory(make_inventory: InventoryFactory) -> None:
    base = boards_for(make_inventory(name="base"))
    assert steps(panel(base["gpufleet-slo"], "Time to first token")) == [0.5]
    assert steps(panel(base["gpufleet-slo"], "End-to-end latency p99")) == []  # no slo.e2e_p99_ms
    assert steps(panel(base["gpufleet-engine"], "End-to-end latency")) == []
    all_yml = base_file("group_vars/all.yml")
    for before, after in [("ttft_p99_ms: 500", "ttft_p99_ms: 300\n  e2e_p99_ms: 20000"),
                          ("itl_p99_ms: 80", "itl_p99_ms: 100"),
                          ("max_error_rate: 0.01", "max_error_rate: 0.02"),
                          ("min_output_tokens_per_s: 500", "min_output_tokens_per_s: 700"),
                          ("availability_target: 0.999", "availability_target: 0.995")]:
        assert before in all_yml
        all_yml = all_yml.replace(before, after)
    root = make_inventory({"group_vars/all.yml": all_yml}, name="changed")
    boards = boards_for(root)
    slo = boards["gpufleet-slo"]
    ttft = panel(slo, "Time to first token")
    assert steps(ttft) == [0.3]
    assert "300 ms" in ttft["description"] and "the nearest one, 250 ms" in ttft["description"]
    assert steps(panel(slo, "Inter-token latency p99")) == [0.1]
    assert steps(panel(slo, "End-to-end latency p99")) == [20.0]
    tokens = panel(slo, "Output tokens/s")["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert tokens == [{"color": "red", "value": None}, {"color": "green", "value": 700}]
    assert steps(panel(slo, "Gateway 5xx ratio")) == [0.02]
    burn = [t["expr"] for t in panel(slo, "Error-budget burn rate (1h)")["targets"]]
    assert any("ratio_rate1h" in e and e.endswith("/ (1 - 0.995)") for e in burn)
    assert steps(panel(slo, "Error-budget burn rate (1h)")) == [1.0, 14.4]
    engine = boards["gpufleet-engine"]
    assert steps(panel(engine, "Time to first token")) == [0.3]
    assert steps(panel(engine, "Inter-token latency")) == [0.1]
    assert steps(panel(engine, "End-to-end latency")) == [20.0]
    assert steps(panel(boards["gpufleet-gateway"], "5xx ratio")) == [0.02]
    assert any("qwen" in p["title"].lower() and "300 ms" in p["title"] for p in slo["panels"] if p["type"] == "row")


def test_alert_thresholds_come_from_monitoring_alerts(make_inventory: InventoryFactory) -> None:
    root = make_inventory({"group_vars/monitoring.yml": """
        monitoring:
          alerts:
            kv_cache_ratio: 0.8
            gpu_temperature_celsius: 80
            gateway_limited_ratio: 0.2
    """})
    boards = boards_for(root)
    assert steps(panel(boards["gpufleet-engine"], "KV cache usage")) == [0.8]
    assert steps(panel(boards["gpufleet-gpus"], "Temperature")) == [80]
    assert steps(panel(boards["gpufleet-gateway"], "429 ratio")) == [0.2]
    assert steps(panel(boards["gpufleet-slo"], "Gateway 429 ratio")) == [0.2]


def test_gpu_memory_threshold_is_the_gpumemoryhigh_limit(make_inventory: InventoryFactory) -> None:
    root = make_inventory({"host_vars/gpu-02.yml": "serving:\n  gpu_memory_utilization: 0.8\n"})
    fleet = load_fleet(root, check_secrets=False)
    limits = gpu_memory_limits(fleet, fleet_thresholds(fleet))
    assert limits == {"gpu-01": 0.97, "gpu-02": 0.9}
    memory = panel(boards_for(root)["gpufleet-gpus"], "GPU memory in use")
    assert steps(memory) == [0.9, 0.97]
    assert "gpu-01: 97%; gpu-02: 90%" in memory["description"]
    # the same limits as the alert's, one definition per host
    alerts = [r for g in rule_groups(fleet) for r in g["rules"] if r.get("alert") == "GpuMemoryHigh"]
    assert {float(r["expr"].rsplit(">", 1)[1]) for r in alerts} == set(limits.values())


def test_expected_gpu_count_comes_from_gpus_count(example: dict[str, Board]) -> None:
    answering = panel(example["gpufleet-gpus"], "GPUs answering NVML")
    assert answering["fieldConfig"]["defaults"]["thresholds"]["steps"] == [
        {"color": "red", "value": None}, {"color": "green", "value": 4}]


# ---- the data source -------------------------------------------------------------------------------


def datasource(files: dict[Path, str]) -> dict[str, Any]:
    (source,) = yaml.safe_load(files[DATASOURCES_FILE])["datasources"]
    return source


def test_datasource_is_the_monitoring_hosts_prometheus(make_inventory: InventoryFactory) -> None:
    root = make_inventory({"group_vars/monitoring.yml": """
        monitoring:
          listen_address: 10.0.0.5
          scrape_interval_s: 30
          ports:
            prometheus: 9091
    """})
    source = datasource(render_grafana(load_fleet(root, check_secrets=False)))
    assert source["url"] == "http://10.0.0.5:9091"
    assert source["jsonData"]["timeInterval"] == "30s"
    assert source["uid"] == DATASOURCE_UID and source["isDefault"] is True and source["editable"] is False


@pytest.mark.parametrize(("address", "url"), [("0.0.0.0", "http://127.0.0.1:9090"), ("::", "http://[::1]:9090"),
                                              ("fd00::5", "http://[fd00::5]:9090")])
def test_wildcard_and_ipv6_listen_addresses(make_inventory: InventoryFactory, address: str, url: str) -> None:
    root = make_inventory({"group_vars/monitoring.yml": f"monitoring:\n  listen_address: '{address}'\n"})
    assert datasource(render_grafana(load_fleet(root, check_secrets=False)))["url"] == url


def test_host_name_picks_the_monitoring_hosts_prometheus(make_inventory: InventoryFactory) -> None:
    mon_01 = "        mon-01: {ansible_host: 192.0.2.20}\n"
    hosts = base_file("hosts.yml").replace(mon_01, mon_01 + mon_01.replace("01", "02").replace(".20", ".21"))
    root = make_inventory({"hosts.yml": hosts, "host_vars/mon-01.yml": "monitoring:\n  listen_address: 10.0.0.20\n",
                           "host_vars/mon-02.yml": "monitoring:\n  listen_address: 10.0.0.21\n"})
    fleet = load_fleet(root, check_secrets=False)
    assert datasource(render_grafana(fleet))["url"] == "http://10.0.0.20:9090"  # the first monitoring host's
    assert datasource(render_grafana(fleet, "mon-02"))["url"] == "http://10.0.0.21:9090"
    assert datasource(render_grafana(fleet, "mon-01"))["url"] == "http://10.0.0.20:9090"
    with pytest.raises(ValueError, match="no such host"):
        render_grafana(fleet, "mon-03")


# ---- expand() ----------------------------------------------------------------------------------------


def test_expand_replaces_grafanas_variables() -> None:
    expr = 'rate(x{host=~"$host", instance=~"${instance}", gpu=~"[[gpu]]", m=~"${model_name:regex}"}[$__rate_interval])'
    assert expand(expr) == 'rate(x{host=~".*", instance=~".*", gpu=~".*", m=~".*"}[1m])'
    assert expand(expr, {"host": ["gpu-01", "gw.01"], "instance": "a|b", "__rate_interval": "5m"}) == (
        'rate(x{host=~"(gpu-01|gw\\\\.01)", instance=~"a|b", gpu=~".*", m=~".*"}[5m])')
    assert expand("increase(x[$__range]) + y[$__interval]") == "increase(x[1h]) + y[15s]"
    with pytest.raises(ValueError, match="datasource"):
        expand('x{a="$datasource"}')
    with pytest.raises(ValueError, match="built-in"):
        expand("x[$__unknown]")
