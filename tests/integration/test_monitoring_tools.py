"""The rendered rules and Alertmanager configuration in the real tools: promtool checks the rules
and runs their unit tests, amtool checks the configuration and its routes, and a real Alertmanager
on loopback shows HostDown silencing its own host's GPU alerts and no other host's."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.monitoring.render import ALERTMANAGER_FILE, RULES_FILE, main

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
RULES = MONITORING / RULES_FILE
ALERTMANAGER = MONITORING / ALERTMANAGER_FILE


def tool(*names: str) -> str:
    """The first of `names` on PATH; a clear failure, not a skip, when none is installed."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        f"{' or '.join(names)} is not installed: run scripts/bootstrap.sh as root, or apt-get install "
        "prometheus prometheus-alertmanager (promtool and amtool come with them)",
        pytrace=False,
    )


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=300)


def test_promtool_accepts_the_rules() -> None:
    result = run(tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    files = sorted(str(p) for p in (MONITORING / "tests").glob("*.test.yml"))
    assert len(files) >= 5
    result = run(tool("promtool"), "test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files), result.stdout


def test_amtool_accepts_the_configuration() -> None:
    result = run(tool("amtool"), "check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "2 inhibit rules" in result.stdout


def test_every_alert_routes_to_the_inventorys_receiver() -> None:
    amtool = tool("amtool")
    for labels in (["alertname=HostDown", "host=gpu-01", "severity=page"],
                   ["alertname=SloTtftBurnRate", "model_name=qwen2.5-7b-instruct", "severity=ticket"]):
        result = run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == "oncall", result.stdout


def test_the_test_bed_inventory_renders_files_the_tools_accept(tmp_path: Path) -> None:
    assert main([str(REPO / "inventories" / "local"), str(tmp_path)]) == 0
    result = run(tool("promtool"), "check", "rules", str(tmp_path / RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(tool("amtool"), "check-config", str(tmp_path / ALERTMANAGER_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


# ---- a real Alertmanager ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(url: str, body: object | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as reply:
        text = reply.read().decode()
    return json.loads(text) if text else None


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """The committed alertmanager.yml in a real Alertmanager on 127.0.0.1, clustering off; its base URL."""
    binary = tool("prometheus-alertmanager", "alertmanager")
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={ALERTMANAGER}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HOME": str(tmp_path)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Alertmanager did not start:\n{(tmp_path / 'alertmanager.log').read_text()}")
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def alert(name: str, **labels: str) -> dict[str, object]:
    return {"labels": {"alertname": name, **labels}, "annotations": {"summary": name}}


def states(alertmanager: str, label: str, count: int) -> dict[tuple[str, str], str]:
    """{(alertname, the alert's `label`): active or suppressed} once Alertmanager has `count` alerts."""
    state: dict[tuple[str, str], str] = {}
    deadline = time.monotonic() + 10
    while len(state) < count and time.monotonic() < deadline:
        alerts = request(f"{alertmanager}/api/v2/alerts")
        state = {(a["labels"]["alertname"], a["labels"][label]): a["status"]["state"] for a in alerts}
        time.sleep(0.1)
    return state


def test_host_down_silences_its_own_hosts_gpu_and_engine_alerts_only(alertmanager: str) -> None:
    request(f"{alertmanager}/api/v2/alerts", [
        alert("HostDown", host="gpu-01", severity="page", component="host"),
        alert("GpuLost", host="gpu-01", gpu="2", severity="page", component="gpu"),
        alert("EngineDown", host="gpu-01", instance="192.0.2.11:8000", severity="page", component="engine"),
        alert("GpuLost", host="gpu-02", gpu="0", severity="page", component="gpu"),
        alert("HostDiskSpaceLow", host="gpu-01", mountpoint="/", severity="ticket", component="host"),
    ])
    assert states(alertmanager, "host", 5) == {
        ("HostDown", "gpu-01"): "active",
        ("GpuLost", "gpu-01"): "suppressed",
        ("EngineDown", "gpu-01"): "suppressed",
        ("GpuLost", "gpu-02"): "active",
        # a host alert of the same host is not silenced: it is not a consequence of the host being down
        ("HostDiskSpaceLow", "gpu-01"): "active",
    }


def test_a_paging_burn_rate_alert_silences_its_ticket(alertmanager: str) -> None:
    common = {"model_name": "qwen2.5-7b-instruct", "component": "slo"}
    request(f"{alertmanager}/api/v2/alerts", [
        alert("SloTtftBurnRate", severity="page", long_window="1h", short_window="5m", **common),
        alert("SloTtftBurnRate", severity="ticket", long_window="3d", short_window="6h", **common),
        alert("SloItlBurnRate", severity="ticket", long_window="3d", short_window="6h", **common),
    ])
    assert states(alertmanager, "severity", 3) == {
        ("SloTtftBurnRate", "page"): "active",
        ("SloTtftBurnRate", "ticket"): "suppressed",
        ("SloItlBurnRate", "ticket"): "active",
    }
