"""`gpufleet loadtest INVENTORY`: the Locust command it builds from the inventory and the options, the
arguments it refuses, and the preflight that stops a run against a target that does not answer."""

from __future__ import annotations

import tests.unit.locust_unpatched  # noqa: F401  (before anything imports Locust)

# isort: split

import json
import shlex
import stat
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gpufleet.cli import loadtest_cmd
from gpufleet.cli.main import main
from gpufleet.paths import REPO_ROOT
from tests.conftest import VALID_KEYS, base_file

pytestmark = pytest.mark.unit

LOADTEST_KEY = "sk-gf-loadtest0123456789abcdefghijklmn"
KEYS = VALID_KEYS + f"loadtest {LOADTEST_KEY}\n"
GATEWAY_VARS = base_file("group_vars/gateway.yml") + "  unlimited_clients: [loadtest]\n"
PROMETHEUS_EVERYWHERE = base_file("group_vars/all.yml") + "  listen_address: 0.0.0.0\n"
LOCUSTFILE = REPO_ROOT / "loadtests" / "locustfile.py"


@pytest.fixture
def inventory(make_inventory) -> Path:
    """A fleet whose gateway gw-01 exempts the 'loadtest' client, whose Prometheus the controller reaches."""
    return make_inventory({"group_vars/gateway.yml": GATEWAY_VARS, "group_vars/all.yml": PROMETHEUS_EVERYWHERE},
                          keys=KEYS)


@pytest.fixture
def no_locust(monkeypatch) -> None:
    """Fail the test if the command would start Locust."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        pytest.fail(f"Locust was started: {args}")

    monkeypatch.setattr(loadtest_cmd.subprocess, "run", refuse)


def printed_command(capsys, root: Path, *options: str) -> list[str]:
    code = main(["loadtest", str(root), "--print-command", "--out", "reports/run", *options])
    out, err = capsys.readouterr()
    assert code == 0, err
    return shlex.split(out)


def value(command: list[str], flag: str) -> str:
    assert command.count(flag) == 1, f"{flag} in {command}"
    return command[command.index(flag) + 1]


# ---- the Locust command -------------------------------------------------------------------------


def test_the_printed_command_runs_the_seed_ramp_headless_against_the_gateway(capsys, inventory, no_locust) -> None:
    command = printed_command(capsys, inventory)
    assert command[:3] == [sys.executable, "-m", "locust"]
    assert value(command, "-f") == f"{LOCUSTFILE},{REPO_ROOT / 'loadtests' / 'ramp.py'}"
    assert value(command, "--host") == "http://192.0.2.10:8080"
    assert value(command, "--gpufleet-model") == "Qwen/Qwen2.5-7B-Instruct"
    assert value(command, "--gpufleet-api") == "openai-chat"
    assert value(command, "--gpufleet-slo-host") == "gpu-01"
    assert value(command, "--gpufleet-inventory") == str(inventory)
    assert value(command, "--gpufleet-concurrency") == "1,4,8,16,32,64"
    assert value(command, "--gpufleet-warmup-s") == "30" and value(command, "--gpufleet-measure-s") == "120"
    assert value(command, "--gpufleet-prompts") == "synthetic"
    assert value(command, "--gpufleet-input-tokens") == "512" and value(command, "--gpufleet-max-tokens") == "512"
    assert value(command, "--gpufleet-report-dir") == "reports/run"
    assert value(command, "--gpufleet-records-file") == "reports/run/records.jsonl"
    assert value(command, "--gpufleet-prometheus-url") == "http://192.0.2.20:9090"
    assert value(command, "--gpufleet-gpu-selector") == 'host=~"gpu-01|gpu-02"'
    assert "--headless" in command
    assert "--processes" not in command and "--web-host" not in command
    assert "--gpufleet-rates" not in command  # the ramp's options only


def test_the_printed_command_never_holds_the_api_key(capsys, inventory, no_locust) -> None:
    key = next(line.split()[1] for line in (inventory / "secrets" / "api_keys").read_text().splitlines()
               if line.split()[0] == "loadtest")
    main(["loadtest", str(inventory), "--print-command"])
    out, err = capsys.readouterr()
    assert key not in out and key not in err
    command = shlex.split(out)
    assert value(command, "--gpufleet-api-key-file") == "<key file>"


def test_the_open_loop_gets_its_rates_and_arrival_process(capsys, inventory, no_locust) -> None:
    command = printed_command(capsys, inventory, "--shape", "open-loop", "--rates", "1,2")
    assert value(command, "-f") == f"{LOCUSTFILE},{REPO_ROOT / 'loadtests' / 'openloop.py'}"
    assert value(command, "--gpufleet-rates") == "1,2"
    assert value(command, "--gpufleet-burstiness") == "1"
    assert "--gpufleet-concurrency" not in command and "--gpufleet-max-in-flight" not in command
    constant = printed_command(capsys, inventory, "--shape", "open-loop", "--rates", "4", "--burstiness", "inf",
                               "--max-in-flight", "64")
    assert value(constant, "--gpufleet-burstiness") == "inf"
    assert value(constant, "--gpufleet-max-in-flight") == "64"


def test_the_options_reach_the_command(capsys, inventory, no_locust) -> None:
    command = printed_command(capsys, inventory, "--concurrency", "2,8", "--warmup-s", "5", "--measure-s", "12.5",
                              "--api", "openai-completions", "--input-tokens", "128", "--output-tokens", "64",
                              "--seed", "7", "--processes", "2", "--prometheus", "http://127.0.0.1:19090")
    assert value(command, "--gpufleet-concurrency") == "2,8"
    assert value(command, "--gpufleet-warmup-s") == "5" and value(command, "--gpufleet-measure-s") == "12.5"
    assert value(command, "--gpufleet-api") == "openai-completions"
    assert value(command, "--gpufleet-input-tokens") == "128" and value(command, "--gpufleet-max-tokens") == "64"
    assert value(command, "--gpufleet-seed") == "7"
    assert value(command, "--processes") == "2"
    assert value(command, "--gpufleet-prometheus-url") == "http://127.0.0.1:19090"


def test_target_and_no_prometheus(capsys, inventory, no_locust) -> None:
    command = printed_command(capsys, inventory, "--target", "http://127.0.0.1:18080/", "--no-prometheus")
    assert value(command, "--host") == "http://127.0.0.1:18080"
    assert value(command, "--gpufleet-model") == "Qwen/Qwen2.5-7B-Instruct"  # still the inventory's
    assert "--gpufleet-prometheus-url" not in command and "--gpufleet-gpu-selector" not in command


def test_web_runs_the_ui_on_loopback_instead_of_headless(capsys, inventory, no_locust) -> None:
    command = printed_command(capsys, inventory, "--web")
    assert value(command, "--web-host") == "127.0.0.1" and value(command, "--web-port") == "8089"
    assert "--headless" not in command and "--only-summary" not in command


@pytest.mark.parametrize("shape", ["ramp", "open-loop"])
def test_locust_and_the_gpufleet_plugins_accept_every_option_of_the_command(capsys, inventory, no_locust,
                                                                            shape: str) -> None:
    from locust.argument_parser import get_parser

    from gpufleet.loadtest import locust_gate, shape_options, users

    command = printed_command(capsys, inventory, "--shape", shape, "--max-in-flight", "8", "--processes", "3")
    parser = get_parser(default_config_files=[])
    for add in (users.add_arguments, locust_gate.add_arguments, shape_options.add_arguments):
        add(parser)
    options = parser.parse_args(command[3:])  # an unknown option or a bad value exits here
    assert options.host == "http://192.0.2.10:8080" and options.headless
    assert options.gpufleet_slo_host == "gpu-01" and options.processes == 3


# ---- refused arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    (["--prompts", "chat-set", "--api", "tgi"], "error: --prompts chat-set holds chat messages: use it with "
                                                "--api openai-chat"),
    (["--processes", "0"], "error: --processes must be >= 1, got 0"),
    (["--input-tokens", "0"], "error: --input-tokens and --output-tokens must be >= 1"),
])
def test_bad_arguments_exit_2_with_the_reason(capsys, inventory, no_locust, options: list[str], message: str) -> None:
    assert main(["loadtest", str(inventory), *options]) == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""


def test_an_inventory_that_gives_no_target_exits_2_with_its_problem(capsys, make_inventory, no_locust) -> None:
    root = make_inventory()  # no key for the 'loadtest' client
    assert main(["loadtest", str(root)]) == 2
    err = capsys.readouterr().err
    assert "no API key for client 'loadtest'" in err and f"fix: gpufleet keys add {root} loadtest" in err


# ---- preflight ----------------------------------------------------------------------------------


def test_an_unreachable_target_exits_2_before_locust_starts(capsys, inventory, no_locust) -> None:
    assert main(["loadtest", str(inventory), "--target", "http://127.0.0.1:9", "--no-prometheus"]) == 2
    err = capsys.readouterr().err
    assert "error: GET http://127.0.0.1:9/v1/models: the target does not answer" in err
    assert "fix: check that the gateway and its engines are up" in err


class Answers:
    """What the fake gateway answers to GET /v1/models, and the Authorization headers it saw."""

    def __init__(self) -> None:
        self.status = 200
        self.body = json.dumps({"object": "list", "data": [{"id": "Qwen/Qwen2.5-7B-Instruct"}]}).encode()
        self.seen: list[tuple[str, str | None]] = []


@pytest.fixture
def gateway() -> Iterator[tuple[str, Answers]]:
    answers = Answers()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answers.seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(answers.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answers.body)))
            self.end_headers()
            self.wfile.write(answers.body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answers
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_preflight_passes_a_target_that_lists_its_models_with_the_key(gateway) -> None:
    url, answers = gateway
    assert loadtest_cmd.preflight(url, "sk-gf-secret") is None
    assert answers.seen == [("/v1/models", "Bearer sk-gf-secret")]


def test_preflight_explains_a_refused_key(gateway) -> None:
    url, answers = gateway
    answers.status, answers.body = 401, b'{"error": "invalid key"}'
    message, fix = loadtest_cmd.preflight(url, "sk-gf-stale")
    assert message == f"GET {url}/v1/models: HTTP 401, the key was refused"
    assert "deploy the gateway again after adding keys" in fix


def test_preflight_reports_a_server_error_and_an_answer_that_is_not_json(gateway) -> None:
    url, answers = gateway
    answers.status, answers.body = 503, b"{}"
    message, fix = loadtest_cmd.preflight(url, "k")
    assert message == f"GET {url}/v1/models: HTTP 503" and "gateway and its engines are up" in fix
    answers.status, answers.body = 200, b"<html>not an API</html>"
    message, _ = loadtest_cmd.preflight(url, "k")
    assert message.startswith(f"GET {url}/v1/models:")


def test_a_run_hands_the_key_to_locust_in_a_private_file_and_returns_its_exit_code(capsys, inventory, gateway,
                                                                                  monkeypatch, tmp_path) -> None:
    url, answers = gateway
    seen: dict[str, Any] = {}

    def run(command: list[str], **kwargs: Any) -> Any:
        key_file = Path(value(command, "--gpufleet-api-key-file"))
        seen.update(command=command, cwd=kwargs.get("cwd"), key=key_file.read_text(),
                    mode=stat.S_IMODE(key_file.stat().st_mode), folder=stat.S_IMODE(key_file.parent.stat().st_mode))
        seen["key_file"] = key_file
        return type("Completed", (), {"returncode": 1})()  # the gate's "an SLO failed"

    monkeypatch.setattr(loadtest_cmd.subprocess, "run", run)
    report = tmp_path / "report"
    code = main(["loadtest", str(inventory), "--target", url, "--out", str(report), "--no-prometheus"])
    out = capsys.readouterr().out
    assert code == 1
    assert answers.seen == [("/v1/models", f"Bearer {LOADTEST_KEY}")]  # the preflight used the client's key
    assert seen["key"] == LOADTEST_KEY + "\n"
    assert seen["mode"] == 0o600 and seen["folder"] == 0o700
    assert not any(LOADTEST_KEY in part for part in seen["command"])
    assert not seen["key_file"].exists()  # removed when the run ends
    assert value(seen["command"], "--host") == url and seen["cwd"] == REPO_ROOT
    assert f"load test: {url} (gw-01), model Qwen/Qwen2.5-7B-Instruct, slo of gpu-01, report in {report}" in out


def sweep_with(monkeypatch, verdicts: dict[str, int]) -> list[str]:
    """Fake Locust runs whose exit code is the gate's verdict for the step level; the levels run, in order."""
    ran: list[str] = []

    def run(command: list[str], **_: Any) -> Any:
        level = value(command, "--gpufleet-concurrency" if "--gpufleet-concurrency" in command else "--gpufleet-rates")
        ran.append(level)
        assert value(command, "--gpufleet-report-dir").endswith(("concurrency-" + level, "rate-" + level))
        return type("Completed", (), {"returncode": verdicts.get(level, 1)})()

    monkeypatch.setattr(loadtest_cmd.subprocess, "run", run)
    return ran


def test_the_sweep_bisects_to_the_highest_concurrency_that_passes(capsys, inventory, gateway, monkeypatch,
                                                                  tmp_path) -> None:
    url, _ = gateway
    ran = sweep_with(monkeypatch, {"1": 0, "4": 0, "8": 0, "9": 0, "10": 0})
    code = main(["loadtest", str(inventory), "--target", url, "--out", str(tmp_path), "--no-prometheus", "--sweep",
                 "--concurrency", "1,4,8,16"])
    out = capsys.readouterr().out
    assert code == 0
    assert ran == ["1", "4", "8", "16", "12", "10", "11"]  # in order to the first fail, then bisection
    assert "sweep: highest concurrency meeting every SLO: 10 (11 failed;" in out


def test_a_sweep_trial_that_cannot_be_judged_stops_the_search_with_exit_2(capsys, inventory, gateway, monkeypatch,
                                                                          tmp_path) -> None:
    url, _ = gateway
    ran = sweep_with(monkeypatch, {"0.5": 0, "1": 2})
    code = main(["loadtest", str(inventory), "--target", url, "--out", str(tmp_path), "--no-prometheus", "--sweep",
                 "--shape", "open-loop", "--rates", "0.5,1,2"])
    assert code == 2 and ran == ["0.5", "1"]
    assert "sweep stopped: rate-1 could not be judged (exit 2)" in capsys.readouterr().out


def test_a_sweep_where_even_the_lowest_level_fails_exits_1(capsys, inventory, gateway, monkeypatch, tmp_path) -> None:
    url, _ = gateway
    sweep_with(monkeypatch, {})
    code = main(["loadtest", str(inventory), "--target", url, "--out", str(tmp_path), "--no-prometheus", "--sweep",
                 "--concurrency", "4,8"])
    assert code == 1 and "sweep: no concurrency met every SLO (4 fail)" in capsys.readouterr().out


@pytest.mark.parametrize(("options", "message"), [
    (["--concurrency", "1,x"], "--concurrency: '1,x' is not a comma-separated list of whole numbers"),
    (["--concurrency", "4,0"], "concurrency levels must be >= 1"),
    (["--measure-s", "0"], "the measured time > 0"),
    (["--shape", "open-loop", "--rates", "2,-1"], "rate must be a positive finite number"),
    (["--shape", "open-loop", "--max-in-flight", "0"], "max_in_flight must be >= 1"),
])
def test_a_plan_that_cannot_be_built_exits_2_before_any_request(capsys, inventory, no_locust, monkeypatch,
                                                                options: list[str], message: str) -> None:
    def no_request(*_: Any, **__: Any) -> None:
        raise AssertionError("the pre-check ran: the plan should have been refused first")

    monkeypatch.setattr(loadtest_cmd, "preflight", no_request)
    code = main(["loadtest", str(inventory), "--target", "http://127.0.0.1:9", *options])
    assert code == 2
    assert message in capsys.readouterr().err
