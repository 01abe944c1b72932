"""`make demo`'s pieces without Docker: the progress display, reading pyinfra's stream, a step's
log and failure, the load test's lines, the summary a user reads at the end, bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpufleet.demo import progress as progress_module
from gpufleet.demo.progress import Progress, clock
from gpufleet.demo.run import (
    DemoResult,
    Step,
    StepFailed,
    loadtest_explain,
    loadtest_watch,
    read_verdict,
    run_step,
    summary,
)
from gpufleet.fleet import load_fleet
from gpufleet.paths import REPO_ROOT
from gpufleet.pyinfra_output import RunWatcher, changed_operations, grand_total

PYINFRA_STREAM = """\x1b[1m--> Loading config...\x1b[0m
--> Loading inventory...
--> Connecting to hosts...
    [@docker/gpufleet-tb-gpu-01] Connected
--> Preparing operation files...
    Loading: deploy/site.py
--> Detected changes:
--> Beginning operation run...
\x1b[34m--> Starting operation:\x1b[0m \x1b[1mdeploy/gpu.py | preflight | OS supported\x1b[0m
    [@docker/gpufleet-tb-gpu-01] No changes
--> Starting serial operation: deploy/gpu.py | nvidia driver | reboot if the module changed
    [@docker/gpufleet-tb-gpu-01] Success
--> Results:
    Operation                                   Hosts   Success   Error   No change
    deploy/gpu.py | preflight | OS supported    1       -         -       1
    deploy/gpu.py | nvidia driver | reboot ...  1       1         -       -
    Grand total                                 2       1         -       1
"""


def test_pyinfra_stream_gives_phases_and_numbered_operations() -> None:
    watcher = RunWatcher()
    shown = [s for s in map(watcher.feed, PYINFRA_STREAM.splitlines()) if s]
    assert shown[:4] == ["loading the inventory", "connecting to the hosts",
                         "preparing the operations (gathering facts)", "changes detected"]
    assert "operation 1: deploy/gpu.py | preflight | OS supported" in shown
    assert "operation 2: deploy/gpu.py | nvidia driver | reboot if the module changed" in shown
    assert shown[-1] == "done" and watcher.operations == 2


def test_pyinfra_results_table_gives_what_changed() -> None:
    assert grand_total(PYINFRA_STREAM) == {"hosts": 2, "changed": 1, "errors": 0, "unchanged": 1}
    [row] = changed_operations(PYINFRA_STREAM)
    assert row.startswith("deploy/gpu.py | nvidia driver | reboot ...")
    assert grand_total("pyinfra crashed before the table") is None


def test_progress_off_a_terminal_prints_start_heartbeat_and_end_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "HEARTBEAT_S", 0.0)
    monkeypatch.setattr(progress_module, "REDRAW_S", 0.05)
    out = io.StringIO()
    display = Progress(["images", "deploy"], stream=out, tty=False)
    display.start(0)
    display.finish(True, "4 images")
    display.start(1)
    display.detail("operation  7:   docker  ")
    time.sleep(0.3)  # a heartbeat or more, while the step prints nothing
    display.finish(False, "exit 1")
    display.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/2] images ..."
    assert lines[1].startswith("[1/2] images  done in 0:00  · 4 images")
    assert lines[2] == "[2/2] deploy ..."
    assert any(line.startswith("[2/2] deploy  0:00  · operation 7: docker") for line in lines[3:-1])
    assert lines[-1].startswith("[2/2] deploy  FAILED in 0:00  · exit 1")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # a log file stays clean


def test_progress_on_a_terminal_redraws_one_line() -> None:
    out = io.StringIO()
    display = Progress(["deploy"], stream=out, tty=True)
    display.start(0)
    display.detail("operation 3: nginx")
    display.finish(True)
    display.close()
    text = out.getvalue()
    assert "\r\x1b[K[1/1] deploy  0:00  · operation 3: nginx" in text
    assert text.endswith("[1/1] deploy  done in 0:00\n")


def test_clock() -> None:
    assert [clock(s) for s in (0, 59.9, 61, 3725)] == ["0:00", "0:59", "1:01", "1:02:05"]


def _python_step(code: str, ok_codes: tuple[int, ...] = (0,)) -> Step:
    return Step("check", "a check", [sys.executable, "-c", code], lambda line: line.strip() or None,
                note=lambda output: f"{len(output.splitlines())} lines", ok_codes=ok_codes)


def test_a_step_logs_its_command_and_output(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_step(_python_step("print('one'); print('two')"), tmp_path / "logs" / "1-check.log",
                      Progress(["a check"], stream=out, tty=False), 0)
    log = (tmp_path / "logs" / "1-check.log").read_text()
    assert log.splitlines()[1:] == ["one", "two"] and log.startswith("$ ")
    assert result.exit_code == 0 and result.title == "a check"
    assert "done in" in out.getvalue() and "2 lines" in out.getvalue()


def test_a_failed_step_says_what_failed_and_where_the_log_is(tmp_path: Path) -> None:
    step = _python_step("import sys; print('\\n'.join(f'line {i}' for i in range(40))); sys.exit(3)")
    out = io.StringIO()
    with pytest.raises(StepFailed) as failed:
        run_step(step, tmp_path / "1-check.log", Progress(["a check"], stream=out, tty=False), 0)
    message = str(failed.value)
    assert message.startswith("a check failed (exit 3): ")
    assert "line 39" in message and "line 10" not in message  # the tail only
    assert f"whole log: {tmp_path / '1-check.log'}" in message
    assert "FAILED in" in out.getvalue()


def test_an_slo_failure_is_a_verdict_not_a_broken_step(tmp_path: Path) -> None:
    result = run_step(_python_step("import sys; sys.exit(1)", ok_codes=(0, 1)), tmp_path / "x.log",
                      Progress(["a check"], stream=io.StringIO(), tty=False), 0)
    assert result.exit_code == 1


def test_loadtest_lines_show_the_running_step() -> None:
    assert loadtest_watch("[2026-11-22 12:00:00,000] host/INFO/locust.runners: Shape test updating to 8 users "
                          "at 8.00 spawn rate") == "concurrency 8"
    assert loadtest_watch("... Shape test updating to 0 users at 8.00 spawn rate") == "draining the last step"
    assert loadtest_watch("SLO gate: PASS (exit 0)") == "SLO gate: PASS (exit 0)"
    assert loadtest_watch("some other locust chatter") is None


def _report(folder: Path, status: str, code: int, reasons: list[str]) -> Path:
    folder.mkdir(parents=True)
    headline = {"text": "highest concurrency meeting every SLO: 8 (378.2 output tokens/s, goodput 11.82 req/s)"}
    (folder / "loadtest.json").write_text(json.dumps({"headline": headline, "verdict": {
        "status": status, "exit_code": code, "reasons": reasons}}))
    return folder


def test_the_summary_gives_the_verdict_report_and_where_to_go_next(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo-20261122T120000Z"
    verdict = read_verdict(_report(run_dir / "loadtest", "fail", 1, ["concurrency=8: p99 ITL 205.0 ms > 150.0 ms"]))
    result = DemoResult("inventories/local", str(run_dir), "2026-11-22T12:00:00+00:00", seconds=583.0,
                        verdict=verdict, urls={"gateway gpu-01": "http://127.0.0.1:32771",
                                               "Prometheus": "http://127.0.0.1:9090",
                                               "Alertmanager": "http://127.0.0.1:9093"})
    text = summary(result, load_fleet(REPO_ROOT / "inventories" / "local", check_secrets=False))
    assert "the chain ran in 9:43 on inventories/local" in text
    assert "SLO gate      FAIL (exit 1): highest concurrency meeting every SLO: 8" in text
    assert "concurrency=8: p99 ITL 205.0 ms > 150.0 ms" in text
    assert f"{run_dir}/loadtest/loadtest.md" in text
    assert "gateway gpu-01 http://127.0.0.1:32771" in text and "Prometheus    http://127.0.0.1:9090" in text
    assert "docker exec gpufleet-tb-mon-01 cat /etc/grafana/admin_password" in text
    assert "curl -s http://127.0.0.1:32771/v1/models" in text and "inventories/local/secrets/api_keys" in text
    assert "loadtest inventories/local --web" in text and "make demo-down" in text


@pytest.mark.parametrize("action", ["up", "down"])
def test_a_bad_inventory_stops_the_demo_before_anything_runs(tmp_path: Path, action: str) -> None:
    inventory = tmp_path / "inventory"
    inventory.mkdir()
    (inventory / "hosts.yml").write_text("all:\n  children:\n    gpu:\n      hosts:\n        gpu-01: {gpus: 4}\n")
    reports = ["--reports", str(tmp_path / "reports")] if action == "up" else []
    proc = subprocess.run([sys.executable, "-m", "gpufleet.demo", action, "--inventory", str(inventory), *reports],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(inventory / "hosts.yml") in proc.stderr and "gpus" in proc.stderr
    assert "fix:" in proc.stderr
    assert not (tmp_path / "reports").exists() and "removed" not in proc.stdout


def test_a_broken_load_test_is_explained_by_the_gate_not_by_locusts_table() -> None:
    lines = [f"{line}\n" for line in (
        "[2026] vm/INFO/locust.main: Shape test completed, shutting down",
        "SLO gate: INVALID (exit 2): slo of host gpu-01",
        "  concurrency=1: invalid: p99 TTFT rests on 89 samples",
        "note: 126 warm-up requests were left out",
        "report: reports/x/loadtest.md",
        "        reports/x/loadtest.html",
        "        reports/x/loadtest.json",
        "[2026] vm/INFO/locust.main: Shutting down (exit code 2)",
        *(f"POST /v1/chat/completions {i}" for i in range(30)),
    )]
    explained = [line.strip() for line in loadtest_explain(lines)]
    assert explained[0] == "SLO gate: INVALID (exit 2): slo of host gpu-01"
    assert "concurrency=1: invalid: p99 TTFT rests on 89 samples" in explained
    assert explained[-1] == "reports/x/loadtest.json" and not any("POST" in line for line in explained)
    refused = ["error: GET http://127.0.0.1:9/v1/models: the target does not answer\n", "  fix: check\n", "x\n"]
    assert loadtest_explain(refused) == refused[:2]


@pytest.mark.parametrize("action", ["up", "down"])
def test_the_demo_refuses_real_hosts(action: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "gpufleet.demo", action, "--inventory",
                           str(REPO_ROOT / "inventories" / "example")],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "inventories/example/hosts.yml" in proc.stderr and "ansible_connection" in proc.stderr
    assert "not test bed hosts" in proc.stderr and "docs/real-hosts.md" in proc.stderr


@pytest.mark.parametrize(("ramp", "said"), [
    ("--concurrency 0,4", "--ramp: "),
    ("--concurency 1,4", "gpufleet loadtest refuses these options"),
])
def test_a_bad_ramp_stops_the_demo_before_anything_runs(tmp_path: Path, ramp: str, said: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "gpufleet.demo", "up", "--ramp", ramp, "--reports", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert said in proc.stderr and "Docker" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no run folder: no step started
