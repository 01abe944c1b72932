"""The host agent: one reproducible zipapp that runs the exporters with nothing but python3, and the
commands the roles give it, derived from the inventory."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet.agent.bundle import build
from gpufleet.fleet import load_fleet
from roles.agent import unit_text
from roles.gpu_exporter import exporter_command

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_bundle_is_reproducible_so_an_unchanged_agent_is_not_uploaded_again(tmp_path: Path) -> None:
    first, second = build(tmp_path / "a" / "agent.pyz"), build(tmp_path / "b" / "agent.pyz")
    assert _sha(first) == _sha(second)


def test_the_bundle_runs_both_exporters_without_site_packages(tmp_path: Path) -> None:
    pyz = build(tmp_path / "agent.pyz")
    # -I -S: no site-packages, no user paths, no PYTHONPATH: only the standard library and the bundle
    for command, expected in ((["--help"], "gateway-exporter"), (["exporter", "--help"], "--simulate"),
                              (["gateway-exporter", "--help"], "--model-name")):
        proc = subprocess.run([sys.executable, "-I", "-S", str(pyz), *command], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stdout


def test_simulated_engines_get_simulated_gpus_driven_by_each_instance() -> None:
    fleet = load_fleet(REPO / "inventories" / "local", check_secrets=False)
    command = exporter_command(fleet.host("gpu-01"))
    assert command == ["exporter", "--listen", "0.0.0.0:9400", "--interval", "5", "--simulate", "4",
                       "--simulate-gpu", "rtx-4090d", "--engine-url", "http://127.0.0.1:8000",
                       "--engine-gpus", "0,1,2,3"]


def test_real_engines_get_nvml_on_the_exporter_address() -> None:
    fleet = load_fleet(REPO / "inventories" / "example", check_secrets=False)
    assert exporter_command(fleet.host("gpu-02")) == ["exporter", "--listen", "198.51.100.12:9400",
                                                      "--interval", "5"]


def test_the_unit_runs_unprivileged_and_read_only() -> None:
    text = unit_text("x", ["gateway-exporter", "--model-name", "a b"], groups=["adm"])
    assert "ExecStart=/usr/bin/python3 /opt/gpufleet/gpufleet-agent.pyz gateway-exporter --model-name 'a b'" in text
    for line in ("DynamicUser=yes", "SupplementaryGroups=adm", "ProtectSystem=strict", "NoNewPrivileges=yes"):
        assert line in text.splitlines()
