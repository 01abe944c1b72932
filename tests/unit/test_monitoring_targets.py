"""Prometheus' scrape targets come from the inventory: every engine instance, exporter and gateway,
at the address the monitoring host reaches, and a target it could not reach is refused up front."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gpufleet.errors import ConfigError
from gpufleet.fleet import load_fleet
from gpufleet.monitoring.prometheus_config import prometheus_config, render_prometheus
from gpufleet.monitoring.rules import render_rules
from gpufleet.monitoring.targets import scrape_targets
from tests.conftest import InventoryFactory, base_file

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _targets(root: Path, scraper: str = "mon-01") -> dict[str, list[tuple[str, str]]]:
    fleet = load_fleet(root, check_secrets=False)
    found: dict[str, list[tuple[str, str]]] = {}
    for target in scrape_targets(fleet.hosts, fleet.host(scraper)):
        found.setdefault(target.job, []).append((target.host, target.address))
    return found


def test_the_example_fleet_is_scraped_at_the_private_addresses_it_publishes() -> None:
    jobs = _targets(REPO / "inventories" / "example")
    assert jobs == {
        "gpufleet-engine": [("gpu-01", "198.51.100.11:8000"), ("gpu-02", "198.51.100.12:8100")],
        "gpufleet-gpu-exporter": [("gpu-01", "198.51.100.11:9400"), ("gpu-02", "198.51.100.12:9400")],
        "node": [("gpu-01", "198.51.100.11:9100"), ("gpu-02", "198.51.100.12:9100"),
                 ("gw-01", "198.51.100.10:9100"), ("mon-01", "127.0.0.1:9100")],
        "nginx": [("gw-01", "198.51.100.10:9113")],
        "gpufleet-gateway": [("gw-01", "198.51.100.10:9145")],
        "prometheus": [("mon-01", "127.0.0.1:9090")],
        "alertmanager": [("mon-01", "127.0.0.1:9093")],
    }


def test_every_instance_of_a_layout_is_a_target_and_wildcard_binds_use_ansible_host(
    make_inventory: InventoryFactory,
) -> None:
    root = make_inventory({"host_vars/gpu-02.yml": "layout: {instances: 4, tensor_parallel_size: 1}\n"
                                                   "monitoring: {ports: {node_exporter: 9200}}\n"})
    jobs = _targets(root)
    assert jobs["gpufleet-engine"] == [("gpu-01", "192.0.2.11:8000")] + [
        ("gpu-02", f"192.0.2.12:{8000 + i}") for i in range(4)
    ]
    assert ("gpu-02", "192.0.2.12:9200") in jobs["node"]  # a host's own port setting


def test_a_host_scrapes_its_own_loopback(make_inventory: InventoryFactory) -> None:
    hosts = base_file("hosts.yml").replace("        mon-01: {ansible_host: 192.0.2.20}\n", "        gpu-01:\n")
    root = make_inventory({"hosts.yml": hosts, "host_vars/gpu-01.yml": "monitoring: {exporter_address: 127.0.0.1}\n"})
    jobs = _targets(root, scraper="gpu-01")
    assert ("gpu-01", "127.0.0.1:8000") in jobs["gpufleet-engine"]  # bound to 0.0.0.0: its own loopback
    assert ("gpu-01", "127.0.0.1:9400") in jobs["gpufleet-gpu-exporter"]
    assert ("gpu-02", "192.0.2.12:9400") in jobs["gpufleet-gpu-exporter"]


def test_exporters_on_another_hosts_loopback_are_refused_with_the_key_to_set(make_inventory: InventoryFactory) -> None:
    root = make_inventory({"host_vars/gw-01.yml": "monitoring:\n  exporter_address: 127.0.0.1\n"})
    with pytest.raises(ConfigError) as caught:
        load_fleet(root, check_secrets=False)
    [problem] = caught.value.problems
    assert (problem.key, problem.host) == ("monitoring.exporter_address", "gw-01")
    assert problem.file.endswith("host_vars/gw-01.yml") and problem.line == 2
    assert "Prometheus on mon-01 cannot scrape gw-01's exporters: they listen on 127.0.0.1" in problem.message
    assert problem.fix == "set monitoring.exporter_address to gw-01's private address (host_vars/gw-01.yml)"


def test_engines_on_loopback_are_refused_once_per_host(make_inventory: InventoryFactory) -> None:
    root = make_inventory({"host_vars/gpu-02.yml": "engine: {listen_address: 127.0.0.1}\n"
                                                   "layout: {instances: 2, tensor_parallel_size: 2}\n"})
    with pytest.raises(ConfigError) as caught:
        load_fleet(root, check_secrets=False)
    keys = [(p.key, p.host) for p in caught.value.problems]
    # the gateway on gw-01 cannot reach them either: two refusals, one per consumer, none per instance
    assert keys.count(("engine.listen_address", "gpu-02")) == 2
    assert any("Prometheus on mon-01 cannot scrape gpu-02's engines' metrics" in p.message
               for p in caught.value.problems)


def test_monitoring_hosts_scrape_only_their_own_prometheus_and_alertmanager(make_inventory: InventoryFactory) -> None:
    mon_01 = "        mon-01: {ansible_host: 192.0.2.20}\n"
    hosts = base_file("hosts.yml").replace(mon_01, mon_01 + "        mon-02: {ansible_host: 192.0.2.21}\n")
    root = make_inventory({"hosts.yml": hosts})
    jobs = _targets(root, scraper="mon-02")
    assert jobs["prometheus"] == [("mon-02", "127.0.0.1:9090")]
    assert ("mon-01", "192.0.2.20:9100") in jobs["node"]  # but every host's node_exporter


def test_prometheus_yml_is_valid_and_names_the_rules_and_the_alertmanager(tmp_path: Path) -> None:
    fleet = load_fleet(REPO / "inventories" / "example", check_secrets=False)
    rules = tmp_path / "gpufleet.rules.yml"
    rules.write_text(render_rules(fleet))
    config = tmp_path / "prometheus.yml"
    config.write_text(render_prometheus(fleet, "mon-01", [str(rules)], "inventories/example"))
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    proc = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parsed = yaml.safe_load(config.read_text())
    assert parsed == prometheus_config(fleet, "mon-01", [str(rules)])
    assert parsed["alerting"]["alertmanagers"] == [{"static_configs": [{"targets": ["127.0.0.1:9093"]}]}]
    assert parsed["global"]["scrape_interval"] == "15s"
    for job in parsed["scrape_configs"]:
        for group in job["static_configs"]:
            assert set(group["labels"]) == {"host"}, job["job_name"]
