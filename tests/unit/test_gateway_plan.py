"""The gateway's plan and nginx files: which instances a gateway fronts, its cap, and what
nginx is told, decided before any host is contacted."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.apikeys import ApiKey
from gpufleet.errors import ConfigError
from gpufleet.fleet import load_fleet
from gpufleet.paths import REPO_ROOT
from roles.gateway.nginx_conf import UPSTREAM, nginx_rate, render, render_upstream
from roles.inference.rollout import Step, rollout_steps
from tests.conftest import base_file

HOSTS = base_file("hosts.yml")
GPU_VARS = base_file("group_vars/gpu.yml")
LOOPBACK_GPU_VARS = GPU_VARS.replace("  listen_address: 0.0.0.0  # gw-01 reaches each host at its ansible_host\n",
                                     "  listen_address: 127.0.0.1\n")


def _problems(root: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_fleet(root)
    return caught.value.render()


def test_a_remote_gateway_fronts_every_gpu_host_at_its_address(make_inventory) -> None:
    fleet = load_fleet(make_inventory())
    plan = fleet.host("gw-01").gateway
    assert [(b.host, b.server) for b in plan.backends] == [("gpu-01", "192.0.2.11:8000"), ("gpu-02", "192.0.2.12:8000")]
    assert plan.served_name == "Qwen/Qwen2.5-7B-Instruct" and plan.engine == "vllm"
    assert plan.max_concurrency == 512 and plan.derived_cap  # 256 max_num_seqs per instance, two instances
    assert fleet.host("gpu-01").gateway is None
    assert [k.name for k in fleet.host("gw-01").api_keys] == ["web"]


def test_the_example_fleet_reaches_its_engines_on_their_private_addresses() -> None:
    plan = load_fleet(REPO_ROOT / "inventories" / "example", check_secrets=False).host("gw-01").gateway
    assert [b.server for b in plan.backends] == ["198.51.100.11:8000", "198.51.100.12:8100"]


def test_engines_on_another_hosts_loopback_are_refused_with_the_fix(make_inventory) -> None:
    root = make_inventory({"group_vars/gpu.yml": LOOPBACK_GPU_VARS})
    text = _problems(root)
    assert f"{root}/group_vars/gpu.yml:15 (host gpu-01): engine.listen_address: the gateway on gw-01 cannot " \
           "reach gpu-01's engines: they are published on 127.0.0.1" in text
    assert "fix: set engine.listen_address to gpu-01's private address (host_vars/gpu-01.yml)" in text
    assert "(host gpu-02)" in text


def test_a_local_gateway_fronts_its_own_instances_on_loopback(make_inventory) -> None:
    hosts = HOSTS.replace("        gw-01: {ansible_host: 192.0.2.10}\n", "        gpu-01:\n        gpu-02:\n")
    hosts = hosts.split("    monitoring:\n")[0]  # engines on loopback: a Prometheus elsewhere could not scrape them
    two_instances = LOOPBACK_GPU_VARS.replace("instances: 1", "instances: 2")
    two_instances = two_instances.replace("parallel_size: 4", "parallel_size: 2")
    root = make_inventory({
        "hosts.yml": hosts, "group_vars/gpu.yml": two_instances,
        "group_vars/gateway.yml": "gateway:\n  api_keys_file: secrets/api_keys\n  backends: local\n",
    })
    fleet = load_fleet(root)
    for name in ("gpu-01", "gpu-02"):
        plan = fleet.host(name).gateway
        assert [(b.host, b.server) for b in plan.backends] == [(name, "127.0.0.1:8000"), (name, "127.0.0.1:8001")]
        assert plan.max_concurrency == 512


def test_a_local_gateway_on_a_host_without_engines_is_refused(make_inventory) -> None:
    local = "gateway:\n  api_keys_file: secrets/api_keys\n  backends: local\n"
    root = make_inventory({"group_vars/gateway.yml": local})
    text = _problems(root)
    assert "gateway.backends: is 'local', but this host runs no engines" in text and "(host gw-01)" in text


def test_fleet_gateways_share_the_derived_cap_and_an_inventory_cap_wins(make_inventory) -> None:
    hosts = HOSTS.replace("        gw-01: {ansible_host: 192.0.2.10}\n",
                          "        gw-01: {ansible_host: 192.0.2.10}\n        gw-02: {ansible_host: 192.0.2.9}\n")
    fleet = load_fleet(make_inventory({"hosts.yml": hosts}))
    assert fleet.host("gw-01").gateway.max_concurrency == fleet.host("gw-02").gateway.max_concurrency == 256
    fleet = load_fleet(make_inventory({
        "group_vars/gateway.yml": "gateway:\n  api_keys_file: secrets/api_keys\n  max_concurrency: 40\n",
    }, name="capped"))
    plan = fleet.host("gw-01").gateway
    assert plan.max_concurrency == 40 and not plan.derived_cap


def test_a_gateway_over_two_models_is_refused(make_inventory) -> None:
    root = make_inventory({
        "host_vars/gpu-02.yml": "model: {name: Qwen/Qwen2.5-7B-Instruct, served_name: other-name, "
                                "max_model_len: 32768}\n",
    })
    text = _problems(root)
    which = "(Qwen/Qwen2.5-7B-Instruct on gpu-01, other-name on gpu-02)"
    assert f"would front hosts serving different models {which}" in text


def test_api_keys_nginx_could_not_hold_verbatim_are_refused(make_inventory) -> None:
    root = make_inventory(keys='web sk-gf-0123456789abcdefghij$klmnopq\n')
    text = _problems(root)
    assert "the key of 'web' has characters the gateway cannot match" in text
    assert "secrets/api_keys" in text


@pytest.mark.parametrize(("rate", "expected"), [(2, "2r/s"), (2.0, "2r/s"), (0.5, "30r/m"), (1.25, "75r/m")])
def test_rates_become_nginx_syntax(rate: float, expected: str) -> None:
    assert nginx_rate(rate) == expected


def test_a_rate_below_one_a_minute_is_refused() -> None:
    with pytest.raises(ValueError, match="below nginx's lowest"):
        nginx_rate(0.001)


def test_the_rendered_files_carry_the_settings_and_keep_keys_in_the_key_map_only(make_inventory) -> None:
    fleet = load_fleet(make_inventory())
    host = fleet.host("gw-01")
    keys = [ApiKey("web", "sk-gf-" + "k" * 30), ApiKey("batch", "sk-gf-" + "b" * 30)]
    files = render(host.gateway, host.config.gateway, keys)
    assert "limit_req zone=gf_rate_per_key burst=4 nodelay;" in files.conf
    assert "limit_req_zone $gf_limited zone=gf_rate_per_key:10m rate=2r/s;" in files.conf
    assert "map $gf_client $gf_limited {\n    default $gf_client;\n}" in files.conf  # nobody exempt by default
    assert "limit_conn gf_conns_all 512;" in files.conf and "limit_conn gf_conns_per_key 8;" in files.conf
    assert "client_max_body_size 4m;" in files.conf and "proxy_read_timeout 600s;" in files.conf
    assert "listen 0.0.0.0:8080;" in files.conf and "listen 127.0.0.1:8081;" in files.conf
    assert "proxy_buffering off;" in files.conf and "server_tokens off;" in files.conf
    assert f"proxy_pass http://{UPSTREAM};" in files.conf
    assert "sk-gf-" not in files.conf and "sk-gf-" not in files.upstream
    # anchored, case-sensitive patterns (plain map strings would ignore case)
    assert files.keys_map.splitlines()[1:] == [
        f'"~^sk\\-gf\\-{"b" * 30}$" "batch";', f'"~^sk\\-gf\\-{"k" * 30}$" "web";'
    ]
    assert "server 192.0.2.11:8000 max_fails=1 fail_timeout=10s;" in files.upstream


def test_a_drained_instance_is_marked_down_and_the_others_stay(make_inventory) -> None:
    host = load_fleet(make_inventory()).host("gw-01")
    text = render_upstream(host.gateway, host.config.gateway, drained={"192.0.2.11:8000"})
    assert "server 192.0.2.11:8000 down;" in text
    assert "server 192.0.2.12:8000 max_fails=1 fail_timeout=10s;" in text


def test_rollout_steps_cover_every_instance_with_the_gateways_fronting_it() -> None:
    fleet = load_fleet(REPO_ROOT / "inventories" / "example", check_secrets=False)
    assert rollout_steps(fleet.hosts) == [
        Step("gpu-01", 0, "198.51.100.11:8000", ("gw-01",)),
        Step("gpu-02", 0, "198.51.100.12:8100", ("gw-01",)),
    ]
    local = load_fleet(REPO_ROOT / "inventories" / "local", check_secrets=False)
    assert [(s.host, s.server, s.gateways) for s in rollout_steps(local.hosts)] == [
        ("gpu-01", "127.0.0.1:8000", ("gpu-01",)),
        ("gpu-02", "127.0.0.1:8000", ("gpu-02",)),
    ]


def test_unlimited_clients_are_exempt_from_the_per_key_limits_only(make_inventory) -> None:
    """A load test's client is not counted by the per-key zones; the gateway-wide cap still counts it."""
    fleet = load_fleet(make_inventory())
    host = fleet.host("gw-01")
    settings = host.config.gateway.model_copy(update={"unlimited_clients": ["load.test", "bench"]})
    files = render(host.gateway, settings, [ApiKey("load.test", "sk-gf-" + "k" * 30)])
    assert ('map $gf_client $gf_limited {\n    default $gf_client;\n    "~^bench$" "";\n    "~^load\\.test$" "";\n}'
            in files.conf)
    assert "limit_conn_zone $gf_limited zone=gf_conns_per_key:10m;" in files.conf
    assert "limit_conn_zone $gf_everyone zone=gf_conns_all:1m;" in files.conf


def test_an_unlimited_client_without_a_key_is_refused(make_inventory, tmp_path) -> None:
    root = make_inventory()
    gateway_vars = root / "group_vars" / "gateway.yml"
    gateway_vars.write_text(gateway_vars.read_text() + "  unlimited_clients: [loadtest]\n")
    with pytest.raises(ConfigError) as caught:
        load_fleet(root)
    text = caught.value.render()
    assert "gateway.unlimited_clients: client 'loadtest' has no key in" in text
    assert "fix: add one: gpufleet keys add" in text and "loadtest" in text
