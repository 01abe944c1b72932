"""Fault injection: flags and the loopback-only admin endpoints, each fault observed from outside."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import httpx
import pytest
from aiohttp.test_utils import make_mocked_request

from gpufleet.sim.faults import is_local_request
from tests.integration.test_sim_vllm_api import HOST, RunningSim, free_port

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}


def chat(sim: RunningSim, timeout: float = 30, **changes: object) -> httpx.Response:
    return httpx.post(f"{sim.url}/v1/chat/completions", json={**CHAT, **changes}, timeout=timeout)


def faults(sim: RunningSim, **body: object) -> dict:
    url = f"{sim.url}/admin/faults"
    response = httpx.post(url, json=body) if body else httpx.get(url)
    assert response.status_code == 200, response.text
    return response.json()


def refuses(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True


def test_error_rate_answers_vllm_shaped_500s() -> None:
    with RunningSim("--error-rate", "1") as sim:
        response = chat(sim)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "InternalServerError" and error["code"] == 500 and "simulated" in error["message"]
        assert faults(sim)["state"]["errors_injected"] == 1
        faults(sim, error_rate=0.0)
        assert chat(sim).status_code == 200


def test_error_rate_is_a_seeded_fraction() -> None:
    outcomes = []
    for _ in range(2):
        with RunningSim("--error-rate", "0.5", "--seed", "7") as sim:
            outcomes.append([chat(sim, max_tokens=1).status_code for _ in range(12)])
    assert outcomes[0] == outcomes[1] and {200, 500} == set(outcomes[0])


def test_added_latency_per_token_and_per_request() -> None:
    with RunningSim("--added-latency-ms", "40") as sim:
        body = {**CHAT, "max_tokens": 5, "stream": True}
        with httpx.stream("POST", f"{sim.url}/v1/chat/completions", json=body) as response:
            b"".join(response.iter_raw())
        record = httpx.get(f"{sim.url}/admin/token-log").json()["requests"][-1]
        gaps = [b - a for a, b in zip(record["scheduled"], record["scheduled"][1:], strict=False)]
        assert len(gaps) == 4 and min(gaps) >= 0.040
        faults(sim, added_latency_ms=0, added_request_latency_ms=400)
        started = time.monotonic()
        assert chat(sim, max_tokens=1).status_code == 200
        assert time.monotonic() - started >= 0.4


def test_hang_then_dead_engine_then_resume() -> None:
    with RunningSim("--hang-health-timeout", "0.3") as sim:
        assert faults(sim, hang=True)["state"]["hung"] is True
        assert httpx.get(f"{sim.url}/health").status_code == 200  # a hang is not detected at once
        with pytest.raises(httpx.ReadTimeout):
            chat(sim, timeout=0.5)
        time.sleep(0.3)
        assert httpx.get(f"{sim.url}/health").status_code == 503
        dead = chat(sim)
        assert dead.status_code == 500 and dead.json()["error"]["type"] == "InternalServerError"
        assert faults(sim)["state"]["engine_dead"] is True
        faults(sim, hang=False)
        assert httpx.get(f"{sim.url}/health").status_code == 200
        assert chat(sim).status_code == 200


def test_hang_after_requests() -> None:
    with RunningSim("--hang-after-requests", "1", "--hang-health-timeout", "inf") as sim:
        assert faults(sim)["settings"]["hang_health_timeout_s"] is None  # inf: a hang never fails /health
        assert chat(sim).status_code == 200
        time.sleep(0.1)
        with pytest.raises(httpx.ReadTimeout):
            chat(sim, timeout=0.5)
        state = faults(sim)["state"]
        assert state["hung"] is True and state["requests_finished"] >= 1 and state["engine_dead"] is False
        assert httpx.get(f"{sim.url}/health").status_code == 200
        faults(sim, hang=False)  # the trigger fires once: resumed, the engine keeps serving
        assert chat(sim).status_code == 200 and chat(sim).status_code == 200


def test_crash_after_requests_exits_non_zero_and_closes_the_port() -> None:
    sim = RunningSim("--crash-after-requests", "2")
    with sim:
        assert chat(sim).status_code == 200
        assert chat(sim).status_code == 200
        sim.join(10)
        assert sim.exit_code == 1
        assert refuses(sim.port)


def test_crash_drops_open_streams() -> None:
    with RunningSim() as sim:
        failure: list[BaseException] = []
        first_line = threading.Event()

        def stream() -> None:
            body = {**CHAT, "max_tokens": 2000, "stream": True}
            try:
                with httpx.stream("POST", f"{sim.url}/v1/chat/completions", json=body, timeout=30) as response:
                    for _ in response.iter_lines():
                        first_line.set()
            except httpx.HTTPError as exc:
                failure.append(exc)

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_line.wait(20)
        faults(sim, crash=True)
        reader.join(20)
        sim.join(10)
        assert failure and isinstance(failure[0], httpx.RemoteProtocolError)
        assert sim.exit_code == 1


def test_cli_process_crashes_after_seconds() -> None:
    port = free_port()
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "gpufleet", "sim", "serve", "--profile", "bench", "--startup-delay", "0", "--port",
         str(port), "--crash-after-seconds", "0.5"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "simulated engine crash (crash_after_seconds=0.5 reached)" in proc.stderr
    assert time.monotonic() - started >= 0.5


def test_token_log_records_schedule_and_write_times() -> None:
    with RunningSim() as sim:
        with httpx.stream("POST", f"{sim.url}/v1/completions",
                          json={"prompt": "x", "max_tokens": 8, "ignore_eos": True, "stream": True}) as response:
            b"".join(response.iter_raw())
        httpx.post(f"{sim.url}/v1/completions", json={"prompt": "y", "max_tokens": 2, "ignore_eos": True})
        log = httpx.get(f"{sim.url}/admin/token-log").json()
        assert log["clock"] == "time.monotonic"
        streamed, collected = log["requests"]
        assert streamed["route"] == "/v1/completions" and streamed["finish_reason"] == "length"
        assert len(streamed["scheduled"]) == len(streamed["written"]) == 8
        assert all(w >= s - 0.001 for s, w in zip(streamed["scheduled"], streamed["written"], strict=True))
        assert streamed["scheduled"] == sorted(streamed["scheduled"])
        assert len(collected["scheduled"]) == 2
        assert httpx.delete(f"{sim.url}/admin/token-log").status_code == 204
        assert httpx.get(f"{sim.url}/admin/token-log").json()["requests"] == []


def test_admin_refuses_anything_but_direct_loopback_clients() -> None:
    with RunningSim() as sim:
        proxied = httpx.get(f"{sim.url}/admin/faults", headers={"X-Forwarded-For": "203.0.113.9"})
        assert proxied.status_code == 403
        assert httpx.post(f"{sim.url}/admin/faults", json={"hang": True},
                          headers={"X-Real-IP": "203.0.113.9"}).status_code == 403
        assert faults(sim)["state"]["hung"] is False
        unknown = httpx.post(f"{sim.url}/admin/faults", json={"explode": True})
        assert unknown.status_code == 400 and "unknown fault setting" in unknown.json()["error"]
        out_of_range = httpx.post(f"{sim.url}/admin/faults", json={"error_rate": 2})
        assert out_of_range.status_code == 400
    for peer, local in ((("192.0.2.7", 40000), False), (("127.0.0.1", 40000), True), (("::1", 40000, 0, 0), True)):
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda name, default=None, peer=peer: peer if name == "peername" \
            else default
        request = make_mocked_request("GET", "/admin/faults", transport=transport)
        assert is_local_request(request) is local
