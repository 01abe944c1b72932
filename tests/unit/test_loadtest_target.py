"""The load test's target, read from the inventory: the gateway's URL as this machine reaches it, the
load test client's key, the served model, whose SLOs judge the run and the Prometheus watching the GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.errors import ConfigError
from gpufleet.fleet import load_fleet
from gpufleet.loadtest.target import LOADTEST_CLIENT, controller_address, resolve
from tests.conftest import VALID_KEYS, base_file

LOADTEST_KEY = "sk-gf-loadtest0123456789abcdefghijklmn"
KEYS = VALID_KEYS + f"loadtest {LOADTEST_KEY}\n"
GATEWAY_VARS = base_file("group_vars/gateway.yml") + "  unlimited_clients: [loadtest]\n"
HOSTS = base_file("hosts.yml")
LOOPBACK_NOTE = "Prometheus on mon-01 listens on 127.0.0.1, out of this machine's reach"


def gateway_vars(extra: str = "") -> str:
    return GATEWAY_VARS + extra


def with_monitoring_listen(address: str) -> str:
    return base_file("group_vars/all.yml") + f"  listen_address: {address}\n"


def rendered(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    return excinfo.value.render()


@pytest.fixture
def loadtest_inventory(make_inventory):
    """An inventory whose gateway exempts the 'loadtest' client, which has a key; `files` change it further."""

    def build(files: dict[str, str | None] | None = None, keys: str | None = KEYS, name: str = "fleet") -> Path:
        return make_inventory({"group_vars/gateway.yml": GATEWAY_VARS, **(files or {})}, keys=keys, name=name)

    return build


# ---- where the load goes ----------------------------------------------------------------------


def test_a_gateway_on_every_address_is_reached_at_its_ansible_host(loadtest_inventory) -> None:
    target = resolve(load_fleet(loadtest_inventory()))
    assert target.url == "http://192.0.2.10:8080"  # the seed's listen 0.0.0.0:8080
    assert target.gateway == "gw-01" and target.client == LOADTEST_CLIENT


def test_a_gateway_on_a_specific_address_is_reached_there(loadtest_inventory) -> None:
    root = loadtest_inventory({"group_vars/gateway.yml": gateway_vars("  listen: 198.51.100.7:9000\n")})
    assert resolve(load_fleet(root)).url == "http://198.51.100.7:9000"


def test_a_gateway_on_loopback_is_refused_with_the_ways_to_reach_it(loadtest_inventory) -> None:
    root = loadtest_inventory({"group_vars/gateway.yml": gateway_vars("  listen: 127.0.0.1:8080\n")})
    fleet = load_fleet(root)
    with pytest.raises(ConfigError) as caught:
        resolve(fleet)
    text = rendered(caught)
    assert "(host gw-01): gateway.listen: the gateway listens on 127.0.0.1:8080, which only gw-01 itself reaches" \
        in text
    assert "group_vars/gateway.yml:" in text  # where listen was set, not where the host is defined
    assert "fix: run the load test on gw-01, or through a tunnel with --target URL" in text
    # a tunnel named with --target is the way out: the rest still comes from the inventory
    assert resolve(fleet, url="http://127.0.0.1:18080").url == "http://127.0.0.1:18080"


def test_target_url_replaces_only_the_address(loadtest_inventory) -> None:
    target = resolve(load_fleet(loadtest_inventory()), url="http://127.0.0.1:18080/")
    assert target.url == "http://127.0.0.1:18080"  # no trailing slash: paths are appended to it
    assert target.api_key == LOADTEST_KEY
    assert target.served_name == "Qwen/Qwen2.5-7B-Instruct"
    assert target.slo_host == "gpu-01" and target.gateway == "gw-01"


def test_the_model_slo_host_and_gpus_come_from_the_gateways_backends(loadtest_inventory) -> None:
    root = loadtest_inventory({
        "host_vars/gpu-01.yml": "model: {name: Qwen/Qwen2.5-7B-Instruct, served_name: qwen-7b, "
                                "max_model_len: 32768}\n",
        "host_vars/gpu-02.yml": "model: {name: Qwen/Qwen2.5-7B-Instruct, served_name: qwen-7b, "
                                "max_model_len: 32768}\n",
    })
    target = resolve(load_fleet(root))
    assert target.served_name == "qwen-7b"  # what every request names as its model
    assert target.engine == "vllm"
    assert target.slo_host == "gpu-01"  # the first backend host's slo judges the run
    assert target.gpu_selector == 'host=~"gpu-01|gpu-02"'


def test_the_key_is_kept_out_of_the_targets_repr(loadtest_inventory) -> None:
    target = resolve(load_fleet(loadtest_inventory()))
    assert target.api_key == LOADTEST_KEY
    assert LOADTEST_KEY not in repr(target)  # a logged or printed target never shows the key


def test_a_test_bed_gateway_is_reached_at_its_published_port(loadtest_inventory, monkeypatch) -> None:
    asked: list[tuple[str, int]] = []

    def published_port(host, port: int) -> int:
        asked.append((host.name, port))
        return 49153

    monkeypatch.setattr("gpufleet.testbed.bed.published_port", published_port)
    hosts = HOSTS.replace("gw-01: {ansible_host: 192.0.2.10}",
                          "gw-01: {ansible_host: gpufleet-tb-gw-01, ansible_connection: docker}")
    target = resolve(load_fleet(loadtest_inventory({"hosts.yml": hosts})))
    assert target.url == "http://127.0.0.1:49153"
    assert asked == [("gw-01", 8080)]  # the gateway's own port, as the harness published it


# ---- which gateway ------------------------------------------------------------------------------


def test_gateway_picks_one_of_several_and_the_first_is_the_default(loadtest_inventory) -> None:
    hosts = HOSTS.replace("        gw-01: {ansible_host: 192.0.2.10}\n",
                          "        gw-02: {ansible_host: 192.0.2.9}\n        gw-01: {ansible_host: 192.0.2.10}\n")
    fleet = load_fleet(loadtest_inventory({"hosts.yml": hosts}))
    assert resolve(fleet).gateway == "gw-01"
    chosen = resolve(fleet, gateway="gw-02")
    assert chosen.gateway == "gw-02" and chosen.url == "http://192.0.2.9:8080"


def test_naming_a_host_that_is_no_gateway_lists_the_gateways(loadtest_inventory) -> None:
    hosts = HOSTS.replace("        gw-01: {ansible_host: 192.0.2.10}\n",
                          "        gw-01: {ansible_host: 192.0.2.10}\n        gw-02: {ansible_host: 192.0.2.9}\n")
    fleet = load_fleet(loadtest_inventory({"hosts.yml": hosts}))
    with pytest.raises(ConfigError) as caught:
        resolve(fleet, gateway="gpu-01")
    text = rendered(caught)
    assert "'gpu-01' is not a gateway host" in text
    assert "fix: name one of: gw-01, gw-02" in text


# ---- the load test's key ------------------------------------------------------------------------


def test_a_client_without_a_key_is_refused_with_the_command_that_adds_one(make_inventory) -> None:
    root = make_inventory()  # only 'web' has a key, and no client is exempt
    fleet = load_fleet(root)
    with pytest.raises(ConfigError) as caught:
        resolve(fleet)
    text = rendered(caught)
    assert f"{root}/secrets/api_keys (host gw-01): no API key for client 'loadtest'" in text
    assert f"fix: gpufleet keys add {root} loadtest" in text
    assert "gateway.unlimited_clients" in text and "--client NAME" in text


def test_a_rate_limited_client_is_refused_since_the_run_would_measure_the_limit(make_inventory) -> None:
    root = make_inventory(keys=KEYS)  # 'loadtest' has a key but is not in unlimited_clients
    fleet = load_fleet(root)
    with pytest.raises(ConfigError) as caught:
        resolve(fleet)
    problem = caught.value.problems[0]
    assert problem.key == "gateway.unlimited_clients" and problem.host == "gw-01"
    assert "client 'loadtest' is held to 2 requests/s and 8 connections per key" in problem.message
    assert "add loadtest to gateway.unlimited_clients and deploy the gateway again" in problem.fix


def test_client_names_another_exempt_client_of_the_keys_file(loadtest_inventory) -> None:
    root = loadtest_inventory({"group_vars/gateway.yml": base_file("group_vars/gateway.yml")
                               + "  unlimited_clients: [web]\n"})
    target = resolve(load_fleet(root), client="web")
    assert target.client == "web"
    assert target.api_key == VALID_KEYS.split()[1]
    with pytest.raises(ConfigError, match="unlimited_clients"):
        resolve(load_fleet(root))  # the default client, 'loadtest', is not exempt there


# ---- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_on_loopback_is_left_out_with_a_note(loadtest_inventory) -> None:
    target = resolve(load_fleet(loadtest_inventory()))  # the role default: 127.0.0.1
    assert target.prometheus_url is None
    assert len(target.notes) == 1 and target.notes[0].startswith(LOOPBACK_NOTE)
    assert "--prometheus URL" in target.notes[0]


def test_prometheus_on_every_address_is_reached_at_the_monitoring_hosts_address(loadtest_inventory) -> None:
    root = loadtest_inventory({"group_vars/all.yml": with_monitoring_listen("0.0.0.0")})
    target = resolve(load_fleet(root))
    assert target.prometheus_url == "http://192.0.2.20:9090"
    assert target.notes == ()


def test_prometheus_on_a_specific_address_is_reached_there(loadtest_inventory) -> None:
    root = loadtest_inventory({"group_vars/all.yml": with_monitoring_listen("198.51.100.20")})
    assert resolve(load_fleet(root)).prometheus_url == "http://198.51.100.20:9090"


def test_a_given_prometheus_url_wins_and_silences_the_note(loadtest_inventory) -> None:
    fleet = load_fleet(loadtest_inventory({"group_vars/all.yml": with_monitoring_listen("0.0.0.0")}))
    target = resolve(fleet, prometheus_url="http://127.0.0.1:19090")
    assert target.prometheus_url == "http://127.0.0.1:19090"
    on_loopback = resolve(load_fleet(loadtest_inventory(name="loopback")), prometheus_url="http://127.0.0.1:19090")
    assert on_loopback.prometheus_url == "http://127.0.0.1:19090" and on_loopback.notes == ()


def test_a_test_bed_prometheus_shares_this_machines_network(loadtest_inventory) -> None:
    hosts = HOSTS.replace("mon-01: {ansible_host: 192.0.2.20}",
                          "mon-01: {ansible_host: gpufleet-tb-mon-01, ansible_connection: docker}")
    target = resolve(load_fleet(loadtest_inventory({"hosts.yml": hosts})))
    assert target.prometheus_url == "http://127.0.0.1:9090"  # its loopback is this machine's
    assert target.notes == ()


def test_without_a_monitoring_host_there_is_no_prometheus_and_no_note(loadtest_inventory) -> None:
    hosts = HOSTS.split("    monitoring:\n")[0]
    target = resolve(load_fleet(loadtest_inventory({"hosts.yml": hosts})))
    assert target.prometheus_url is None and target.notes == ()


# ---- controller_address -------------------------------------------------------------------------


def test_controller_address_follows_the_bind_address(loadtest_inventory) -> None:
    host = load_fleet(loadtest_inventory()).host("gw-01")
    assert controller_address("0.0.0.0", host) == "192.0.2.10"
    assert controller_address("::", host) == "192.0.2.10"
    assert controller_address("198.51.100.7", host) == "198.51.100.7"
    assert controller_address("127.0.0.1", host) is None
    assert controller_address("::1", host) is None


# ---- the loader's check of gateway.unlimited_clients ----------------------------------------------
# (a client with no key at all: test_gateway_plan.py::test_an_unlimited_client_without_a_key_is_refused)


def test_a_misspelt_unlimited_client_is_refused_at_its_line_and_the_others_pass(make_inventory) -> None:
    root = make_inventory({"group_vars/gateway.yml": base_file("group_vars/gateway.yml")
                           + "  unlimited_clients: [web, loadtset]\n"})
    with pytest.raises(ConfigError) as caught:
        load_fleet(root)
    assert [(p.key, p.file, p.line) for p in caught.value.problems] == [
        ("gateway.unlimited_clients", f"{root}/group_vars/gateway.yml", 3)
    ]
    text = rendered(caught)
    assert f"client 'loadtset' has no key in {root}/secrets/api_keys" in text
    assert f"fix: add one: gpufleet keys add {root} loadtset (or correct the name)" in text
    assert "'web'" not in text  # web has a key
