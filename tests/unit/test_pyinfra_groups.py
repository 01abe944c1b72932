"""The inventory as pyinfra sees it: groups, SSH settings and each host's typed configuration."""

from __future__ import annotations

from gpufleet.fleet import load_fleet
from gpufleet.inventory.pyinfra_groups import fleet_groups


def _data(groups, group, host):
    return next(data for name, data in groups[group] if name == host)


def test_ansible_connection_variables_become_pyinfra_ssh_settings(make_inventory):
    root = make_inventory({"host_vars/gpu-01.yml": """
        ansible_port: 2222
        ansible_user: ops
        ansible_ssh_private_key_file: ~/.ssh/fleet
        ansible_become: true
    """})
    groups = fleet_groups(load_fleet(root))
    data = _data(groups, "gpu", "gpu-01")
    assert data["ssh_hostname"] == "192.0.2.11"
    assert data["ssh_port"] == 2222
    assert data["ssh_user"] == "ops"
    assert data["ssh_key"] == "~/.ssh/fleet"
    assert data["_sudo"] is True
    assert "ssh_port" not in _data(groups, "gpu", "gpu-02")


def test_every_group_is_published_with_its_members(make_inventory):
    root = make_inventory({"hosts.yml": """
        all:
          children:
            gpu:
              children:
                rack_1:
                  hosts:
                    gpu-01: {ansible_host: 192.0.2.11}
            gateway:
              hosts:
                gw-01: {ansible_host: 192.0.2.10}
    """})
    groups = fleet_groups(load_fleet(root))
    assert {g: [n for n, _ in members] for g, members in groups.items()} == {
        "gpu": ["gpu-01"], "rack_1": ["gpu-01"], "gateway": ["gw-01"],
    }


def test_hosts_carry_their_validated_config_and_plan(make_inventory):
    groups = fleet_groups(load_fleet(make_inventory()))
    fleet_host = _data(groups, "gpu", "gpu-01")["gpufleet"]
    assert fleet_host.config.layout.tensor_parallel_size == 4
    assert fleet_host.plan.instances[0].gpus == (0, 1, 2, 3)
    assert _data(groups, "gateway", "gw-01")["gpufleet"].plan is None


def test_local_and_docker_connections_use_pyinfra_connectors(make_inventory):
    root = make_inventory({"hosts.yml": """
        all:
          children:
            gpu:
              hosts:
                gpu-01: {ansible_connection: docker, ansible_host: testbed-gpu-01}
            gateway:
              hosts:
                gw-01: {ansible_connection: local}
    """})
    groups = fleet_groups(load_fleet(root))
    assert [n for n, _ in groups["gpu"]] == ["@docker/testbed-gpu-01"]
    assert [n for n, _ in groups["gateway"]] == ["@local"]
    assert _data(groups, "gpu", "@docker/testbed-gpu-01")["gpufleet_name"] == "gpu-01"
