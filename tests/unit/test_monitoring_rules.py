"""The Prometheus rules and alertmanager.yml rendered from the inventory: thresholds follow it, the
committed copies equal the rendering, and every alert carries what on-call needs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.errors import ConfigError
from gpufleet.fleet import load_fleet
from gpufleet.monitoring import jobs
from gpufleet.monitoring.alertmanager import alertmanager_config
from gpufleet.monitoring.render import ALERTMANAGER_FILE, RULES_FILE, main, render_files
from gpufleet.monitoring.rules import ENGINE_METRICS, ITL_OLD, KV_CACHE_OLD, rule_groups
from gpufleet.monitoring.slo import model_slos, nearest_bucket
from gpufleet.sim.metrics import ITL_BUCKETS, TTFT_BUCKETS, VllmMetrics
from gpufleet.sim.types import EngineStats, SimConfig
from tests.conftest import InventoryFactory, base_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventories" / "example"
MONITORING = REPO / "monitoring"


def alerts_of(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def alert_rules(groups: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [rule for rule in alerts_of(groups) if rule["alert"] == name]


def groups_for(root: Path, **kwargs: Any) -> list[dict[str, Any]]:
    return rule_groups(load_fleet(root, check_secrets=False), **kwargs)


# ---- the committed copies ------------------------------------------------------------------------


def test_committed_files_are_the_example_inventorys_rendering() -> None:
    for rel, text in render_files(EXAMPLE).items():
        committed = (MONITORING / rel).read_text(encoding="utf-8")
        assert committed == text, (
            f"monitoring/{rel} is stale: run python -m gpufleet.monitoring.render inventories/example monitoring"
        )


def test_render_writes_then_check_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(EXAMPLE), str(tmp_path), "--check"]) == 1
    assert "differs from the rendering" in capsys.readouterr().err
    assert main([str(EXAMPLE), str(tmp_path)]) == 0
    assert (tmp_path / RULES_FILE).is_file() and (tmp_path / ALERTMANAGER_FILE).is_file()
    assert main([str(EXAMPLE), str(tmp_path), "--check"]) == 0
    assert main([str(EXAMPLE), str(MONITORING), "--check"]) == 0


def test_render_reports_an_invalid_inventory_without_a_traceback(
    make_inventory: InventoryFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_inventory({"group_vars/all.yml": "slo:\n  ttft_p99_ms: -5\n"})
    assert main([str(root), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_runbook_base_is_a_setting(tmp_path: Path) -> None:
    base = "https://git.example.com/ops/gpufleet/-/blob/main/runbooks"
    assert main([str(EXAMPLE), str(tmp_path), "--runbook-base", base]) == 0
    groups = yaml.safe_load((tmp_path / RULES_FILE).read_text())["groups"]
    assert {a["annotations"]["runbook_url"] for a in alert_rules(groups, "HostDown")} == {f"{base}/HostDown.md"}


# ---- every alert ---------------------------------------------------------------------------------


def test_every_alert_has_severity_component_summary_description_and_its_runbook_url() -> None:
    groups = yaml.safe_load((MONITORING / RULES_FILE).read_text())["groups"]
    alerts = alerts_of(groups)
    assert len({a["alert"] for a in alerts}) >= 20
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z]+", name), name
        assert alert["labels"]["severity"] in ("page", "ticket"), name
        assert alert["labels"]["component"] in ("host", "exporter", "engine", "gateway", "gpu", "slo"), name
        annotations = alert["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        assert annotations["runbook_url"] == f"runbooks/{name}.md", name
        assert (REPO / annotations["runbook_url"]).is_file(), name


def test_rules_select_the_documented_job_names() -> None:
    text = (MONITORING / RULES_FILE).read_text()
    selected = set(re.findall(r'job=~?"([^"]+)"', text))
    named = {job for sel in selected for job in sel.split("|")}
    # every job the alerts need is one the scrape configs have; Prometheus and Alertmanager scrape themselves only
    assert named == set(jobs.ALL_JOBS) - {jobs.JOB_PROMETHEUS, jobs.JOB_ALERTMANAGER}
    assert named == {"gpufleet-engine", "gpufleet-gpu-exporter", "node", "nginx", "gpufleet-gateway"}


def test_engine_metric_names_are_the_ones_the_simulator_exposes() -> None:
    config = SimConfig(model="Qwen/Qwen2.5-7B-Instruct", served_model_name="qwen", max_model_len=4096,
                       max_num_seqs=8, max_num_batched_tokens=2048, block_size=16, num_gpu_blocks=100,
                       gpu_memory_utilization=0.9, tensor_parallel_size=1)
    stats = EngineStats(num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=100,
                        prompt_tokens_total=0, generation_tokens_total=0, preemptions_total=0, steps_total=0)
    exposed = VllmMetrics(config, lambda: stats, profile="p").render().decode()
    names = set(re.findall(r"^(vllm:[a-z0-9_]+)", exposed, re.MULTILINE))
    for metric in ENGINE_METRICS:
        assert metric in names or f"{metric}_count" in names, metric
    # and every vllm: name the rules use is one of those or a documented fallback of an older vLLM
    used = set(re.findall(r"vllm:[a-z0-9_]+", (MONITORING / RULES_FILE).read_text()))
    for name in used:
        base = re.sub(r"_(bucket|count)$", "", name)
        assert base in names or f"{base}_count" in names or base in (ITL_OLD, KV_CACHE_OLD), name


def test_gpu_metric_names_come_from_the_exporters_definitions() -> None:
    from gpufleet.exporter.metrics import ALL_METRICS

    exported = {m.name for m in ALL_METRICS}
    used = set(re.findall(r"\bgpufleet_(?:gpu|exporter)_[a-z_]+", (MONITORING / RULES_FILE).read_text()))
    assert used and used <= exported, used - exported


# ---- thresholds follow the inventory ---------------------------------------------------------------


def test_slo_thresholds_come_from_the_inventory(make_inventory: InventoryFactory) -> None:
    root = make_inventory({"group_vars/all.yml": """
        slo:
          ttft_p99_ms: 300
          itl_p99_ms: 100
          max_error_rate: 0.02
          min_output_tokens_per_s: 500
          availability_target: 0.995
        monitoring:
          exporter_address: 0.0.0.0
    """})
    groups = groups_for(root)
    text = json.dumps(groups)
    # 300 ms lies between vLLM's 0.25 and 0.5 s buckets: the nearer, 0.25 s, measures it, and says so
    assert 'le=\\"0.25\\"' in text and 'le=\\"0.5\\"' not in text
    ttft = alert_rules(groups, "SloTtftBurnRate")
    assert len(ttft) == 3
    assert "300 ms" in ttft[0]["annotations"]["description"]
    assert "the nearest one, 250 ms, measures it" in ttft[0]["annotations"]["description"]
    itl = alert_rules(groups, "SloItlBurnRate")
    assert 'le=\\"0.1\\"' in text and "nearest" not in itl[0]["annotations"]["description"]
    availability = alert_rules(groups, "SloAvailabilityBurnRate")
    assert [a["labels"]["severity"] for a in availability] == ["page", "page", "ticket"]
    assert [(a["labels"]["long_window"], a["labels"]["short_window"]) for a in availability] == [
        ("1h", "5m"), ("6h", "30m"), ("3d", "6h")]
    assert "(14.4 * (1 - 0.995))" in availability[0]["expr"]
    assert "(1 * (1 - 0.995))" in availability[2]["expr"]
    assert "99.5% of requests succeed" in availability[0]["annotations"]["description"]
    (errors,) = alert_rules(groups, "GatewayErrorRatioHigh")
    assert errors["expr"].endswith("> 0.02") and 'host="gw-01"' in errors["expr"]


def test_gpu_memory_limit_is_the_seeds_or_the_planned_share_plus_margin(make_inventory: InventoryFactory) -> None:
    root = make_inventory({"host_vars/gpu-02.yml": "serving:\n  gpu_memory_utilization: 0.8\n"})
    rules = alert_rules(groups_for(root), "GpuMemoryHigh")
    limits = {rule["expr"].rsplit(">", 1)[1].strip(): rule for rule in rules}
    assert set(limits) == {"0.97", "0.9"}
    assert 'host="gpu-01"' in limits["0.97"]["expr"] and 'host="gpu-02"' in limits["0.9"]["expr"]
    assert "gpu_memory_utilization 0.95" in limits["0.97"]["annotations"]["description"]
    assert "the seed's limit of 90%" in limits["0.9"]["annotations"]["description"]
    # a different seed limit in the inventory moves both: one definition, monitoring.alerts
    (root / "group_vars" / "all.yml").write_text(
        (root / "group_vars" / "all.yml").read_text() + "  alerts:\n    gpu_memory_ratio: 0.99\n"
    )
    rules = alert_rules(groups_for(root), "GpuMemoryHigh")
    (only,) = rules
    assert only["expr"].endswith("> 0.99") and 'host=~"gpu-01|gpu-02"' in only["expr"]


def test_expected_gpu_count_per_host_comes_from_gpus_count(make_inventory: InventoryFactory) -> None:
    root = make_inventory({"host_vars/gpu-02.yml": "gpus:\n  count: 2\nlayout:\n  tensor_parallel_size: 2\n"})
    rules = alert_rules(groups_for(root), "GpuMissing")
    by_count = {rule["expr"].rsplit("<", 1)[1].strip(): rule["expr"] for rule in rules}
    assert set(by_count) == {"4", "2"}
    assert 'host="gpu-01"' in by_count["4"] and 'host="gpu-02"' in by_count["2"]


def test_host_names_are_escaped_in_regex_matchers(make_inventory: InventoryFactory) -> None:
    hosts = base_file("hosts.yml").replace("gpu-01:", "gpu-01.dc1:").replace("gpu-02:", "gpu-02.dc1:")
    (rule,) = alert_rules(groups_for(make_inventory({"hosts.yml": hosts})), "GpuMissing")
    assert 'host=~"gpu-01\\\\.dc1|gpu-02\\\\.dc1"' in rule["expr"]


def test_hosts_serving_one_model_must_share_its_slo(make_inventory: InventoryFactory) -> None:
    root = make_inventory({"host_vars/gpu-02.yml": "slo:\n  ttft_p99_ms: 800\n"})
    with pytest.raises(ConfigError) as caught:
        model_slos(load_fleet(root, check_secrets=False))
    (problem,) = caught.value.problems
    assert problem.key == "slo.ttft_p99_ms" and problem.file.endswith("host_vars/gpu-02.yml")
    assert "qwen2.5-7b-instruct" in problem.message or "Qwen" in problem.message


@pytest.mark.parametrize(
    ("slo_ms", "buckets", "bucket"),
    [(500, TTFT_BUCKETS, 0.5), (300, TTFT_BUCKETS, 0.25), (400, TTFT_BUCKETS, 0.5), (80, ITL_BUCKETS, 0.075),
     (87.5, ITL_BUCKETS, 0.1), (150, ITL_BUCKETS, 0.15), (10_000_000, TTFT_BUCKETS, 2560.0)],
)
def test_latency_thresholds_use_the_nearest_bucket(slo_ms: float, buckets: tuple[float, ...], bucket: float) -> None:
    threshold = nearest_bucket(slo_ms, buckets)
    assert threshold.bucket_s == bucket
    assert threshold.exact == (abs(bucket * 1000 - slo_ms) < 1e-9)
    assert (threshold.note() == "") == threshold.exact


# ---- Alertmanager ----------------------------------------------------------------------------------


def test_alertmanager_receivers_grouping_and_inhibition_from_the_inventory(make_inventory: InventoryFactory) -> None:
    root = make_inventory({"group_vars/monitoring.yml": """
        monitoring:
          receivers:
            - {name: oncall, kind: webhook, url: "https://pager.example.com/hook"}
            - {name: chat, kind: webhook, url: "http://127.0.0.1:5002/alerts"}
    """})
    config = alertmanager_config(load_fleet(root, check_secrets=False))
    assert config["route"]["receiver"] == "oncall"
    assert config["route"]["group_by"] == ["alertname", "host"]
    assert config["route"]["routes"] == [{"receiver": "oncall", "continue": True},
                                         {"receiver": "chat", "continue": True}]
    assert config["receivers"] == [
        {"name": "oncall", "webhook_configs": [{"url": "https://pager.example.com/hook", "send_resolved": True}]},
        {"name": "chat", "webhook_configs": [{"url": "http://127.0.0.1:5002/alerts", "send_resolved": True}]},
    ]
    host_down = config["inhibit_rules"][0]
    assert host_down["source_matchers"] == ['alertname="HostDown"'] and host_down["equal"] == ["host"]


def test_one_receiver_has_no_child_routes() -> None:
    config = alertmanager_config(load_fleet(EXAMPLE, check_secrets=False))
    assert "routes" not in config["route"]
    assert [r["name"] for r in config["receivers"]] == ["oncall"]


def test_monitoring_hosts_must_agree_on_receivers(make_inventory: InventoryFactory) -> None:
    mon_01 = "        mon-01: {ansible_host: 192.0.2.20}\n"
    hosts = base_file("hosts.yml").replace(mon_01, mon_01 + mon_01.replace("01", "02").replace(".20", ".21"))
    root = make_inventory({
        "hosts.yml": hosts,
        "host_vars/mon-02.yml": "monitoring:\n  receivers:\n    - {name: other, url: 'http://127.0.0.1:5009/x'}\n",
    })
    with pytest.raises(ConfigError) as caught:
        alertmanager_config(load_fleet(root, check_secrets=False))
    assert caught.value.problems[0].key == "monitoring.receivers"
    assert caught.value.problems[0].host == "mon-02"
