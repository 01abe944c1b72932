"""`pyinfra inventories/<fleet>/inventory.py deploy/site.py`, run as the pyinfra CLI runs it.

Only hosts with `ansible_connection: local` are deployed to (and only with --dry); the SSH hosts
of the example use documentation addresses and pyinfra's debug-inventory never connects.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from gpufleet.hostops import SYSTEMD_CHECK
from tests.integration.conftest import EXAMPLE, gpufleet, pyinfra


def _local_fleet(tmp_path: Path) -> Path:
    root = tmp_path / "local"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("secrets", "host_vars", "gateway.yml"))
    hosts = "all:\n  children:\n    gpu:\n      hosts:\n        gpu-01: {ansible_connection: local}\n"
    (root / "hosts.yml").write_text(hosts)
    return root


def _local_monitoring_host(tmp_path: Path) -> Path:
    """This machine as a monitoring host: site.py's GPU roles skip it, and its monitoring roles need
    systemd, which a CI container lacks (tests/e2e/test_full_stack.py runs them on systemd host
    containers)."""
    root = _local_fleet(tmp_path)
    (root / "group_vars" / "gpu.yml").unlink()
    hosts = "all:\n  children:\n    monitoring:\n      hosts:\n        mon-01: {ansible_connection: local}\n"
    (root / "hosts.yml").write_text(hosts)
    return root


def test_pyinfra_reads_the_yaml_inventory_with_ssh_settings(example_copy: Path):
    assert gpufleet("keys", "add", str(example_copy), "ci").code == 0
    result = pyinfra(str(example_copy / "inventory.py"), "debug-inventory", "--json")
    assert result.code == 0, result.err
    hosts = {host["name"]: host for host in json.loads(result.out)}
    assert set(hosts) == {"gpu-01", "gpu-02", "gw-01", "mon-01"}
    gpu01 = hosts["gpu-01"]
    assert gpu01["data"]["ssh_hostname"] == "192.0.2.11"
    assert gpu01["data"]["ssh_user"] == "ubuntu"
    assert gpu01["data"]["_sudo"] is True
    assert "gpu" in gpu01["groups"]
    # the host's validated configuration and plan travel with it
    manifest = gpu01["data"]["gpufleet"]
    assert manifest["instances"][0]["gpus"] == [0, 1, 2, 3]
    assert hosts["gpu-02"]["data"]["gpufleet"]["instances"][0]["port"] == 8100


def test_pyinfra_stops_on_a_bad_inventory_before_any_host(example_copy: Path):
    assert gpufleet("keys", "add", str(example_copy), "ci").code == 0
    (example_copy / "host_vars" / "gpu-02.yml").write_text("layout:\n  instances: 2\n")
    result = pyinfra(str(example_copy / "inventory.py"), "deploy/site.py", "--dry")
    assert result.code == 2
    assert "Traceback" not in result.err + result.out
    assert "Connecting to hosts" not in result.err + result.out
    assert (f"error: {example_copy}/host_vars/gpu-02.yml:2 (host gpu-02): layout.instances: the layout needs 8 GPUs "
            "(2 x TP4) but the host has 4") in result.err


def test_pyinfra_stops_when_secrets_are_missing(example_copy: Path):
    result = pyinfra(str(example_copy / "inventory.py"), "debug-inventory")
    assert result.code == 2
    assert "the API keys file" in result.err and "does not exist" in result.err


def test_site_deploy_plans_the_host_manifest_on_a_local_host(tmp_path: Path):
    root = _local_monitoring_host(tmp_path)
    result = pyinfra(str(root / "inventory.py"), "deploy/site.py", "--dry")
    assert result.code == 0, result.err + result.out
    output = result.err + result.out
    assert "host manifest | host manifest" in output
    assert "[@local] Ready: deploy/site.py" in output
    # without systemd as init, the services are not planned; a step that fails the host says why
    init = subprocess.run(["sh", "-c", SYSTEMD_CHECK], capture_output=True, text=True).stdout.strip()
    assert ("systemd runs the services" in output) == (init != "systemd")
    assert ("prometheus" in output) == (init == "systemd")
