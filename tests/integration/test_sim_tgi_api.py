"""The simulator's TGI surface: /generate, /generate_stream framing, /info, /health, /metrics, 422 and 429."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet import __version__
from gpufleet.sim import tokenizer
from tests.integration.test_sim_vllm_api import MODEL, RunningSim


@pytest.fixture(scope="module")
def tgi() -> Iterator[RunningSim]:
    with RunningSim("--api", "tgi", "--max-concurrent-requests", "2") as server:
        yield server


def test_generate_answers_text_and_details(tgi: RunningSim) -> None:
    inputs = tokenizer.text_of_tokens(30, seed=2)
    response = httpx.post(f"{tgi.url}/generate", json={"inputs": inputs, "parameters": {"max_new_tokens": 5}})
    assert response.status_code == 200
    assert set(response.json()) == {"generated_text"} and response.json()["generated_text"]
    assert response.headers["x-prompt-tokens"] == "30"
    detailed = httpx.post(f"{tgi.url}/generate",
                          json={"inputs": inputs, "parameters": {"max_new_tokens": 4, "details": True}}).json()
    details = detailed["details"]
    assert details["generated_tokens"] == len(details["tokens"]) <= 4
    assert details["finish_reason"] in ("length", "eos_token")
    assert set(details["tokens"][0]) == {"id", "text", "logprob", "special"}
    compat = httpx.post(f"{tgi.url}/", json={"inputs": inputs, "parameters": {"max_new_tokens": 2}})
    assert isinstance(compat.json(), list) and "generated_text" in compat.json()[0]


def test_generate_stream_uses_tgi_framing(tgi: RunningSim) -> None:
    body = {"inputs": "Tell me about GPUs.", "parameters": {"max_new_tokens": 6, "details": True}}
    with httpx.stream("POST", f"{tgi.url}/generate_stream", json=body) as response:
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_raw()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data:{") for e in events)  # no space after the colon
    payloads = [json.loads(e[len("data:"):]) for e in events]
    assert [p["index"] for p in payloads] == list(range(1, len(payloads) + 1))
    assert all(p["generated_text"] is None and p["details"] is None for p in payloads[:-1])
    last = payloads[-1]
    assert last["details"]["generated_tokens"] == len(payloads)
    assert last["details"]["input_length"] == tokenizer.count_tokens("Tell me about GPUs.")
    text = "".join(p["token"]["text"] for p in payloads if not p["token"]["special"])
    assert last["generated_text"] == text


def test_info_and_health(tgi: RunningSim) -> None:
    info = httpx.get(f"{tgi.url}/info").json()
    assert info["model_id"] == MODEL and info["max_concurrent_requests"] == 2
    assert info["max_total_tokens"] == 8192 and info["max_input_tokens"] == 8191
    assert info["version"] == f"gpufleet-sim {__version__}"
    health = httpx.get(f"{tgi.url}/health")
    assert health.status_code == 200 and health.content == b""


def test_validation_errors_are_422(tgi: RunningSim) -> None:
    url = f"{tgi.url}/generate"
    too_long = httpx.post(url, json={"inputs": tokenizer.text_of_tokens(8000), "parameters": {"max_new_tokens": 500}})
    assert too_long.status_code == 422
    assert too_long.json() == {
        "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 8192. "
                 "Given: 8000 `inputs` tokens and 500 `max_new_tokens`",
        "error_type": "validation"}
    zero = httpx.post(url, json={"inputs": "hi", "parameters": {"max_new_tokens": 0}})
    assert zero.json()["error"] == "Input validation error: `max_new_tokens` must be strictly positive"
    empty = httpx.post(url, json={"inputs": ""})
    assert empty.status_code == 422 and empty.json()["error_type"] == "validation"


def test_overload_is_429_and_counted(tgi: RunningSim) -> None:
    body = {"inputs": "a long answer please", "parameters": {"max_new_tokens": 150}}
    opened = threading.Barrier(3)
    done: list[int] = []

    def hold() -> None:
        with httpx.stream("POST", f"{tgi.url}/generate_stream", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            opened.wait()
            for _ in lines:
                pass
            done.append(response.status_code)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    opened.wait(timeout=30)
    refused = httpx.post(f"{tgi.url}/generate", json={"inputs": "one more", "parameters": {"max_new_tokens": 1}})
    assert refused.status_code == 429
    assert refused.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    chat = httpx.post(f"{tgi.url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert chat.status_code == 429
    for thread in holders:
        thread.join(60)
    assert done == [200, 200]
    text = httpx.get(f"{tgi.url}/metrics").text
    assert 'tgi_request_failure{err="overloaded"} 2' in text.splitlines()
    after = httpx.post(f"{tgi.url}/generate", json={"inputs": "now", "parameters": {"max_new_tokens": 1}})
    assert after.status_code == 200


def test_metrics_are_tgis(tgi: RunningSim) -> None:
    httpx.post(f"{tgi.url}/generate", json={"inputs": "count me", "parameters": {"max_new_tokens": 3}})
    text = httpx.get(f"{tgi.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("tgi_request_count", "tgi_request_success", "tgi_request_failure", "tgi_batch_inference_count"):
        assert families[name].type == "counter"
        assert f"# TYPE {name} counter" in text and f"{name}_total" not in text
    for name in ("tgi_request_duration", "tgi_request_queue_duration", "tgi_request_inference_duration",
                 "tgi_request_mean_time_per_token_duration", "tgi_batch_forward_duration"):
        buckets = [s for s in families[name].samples if s.name.endswith("_bucket")]
        assert families[name].type == "histogram" and len({s.labels["le"] for s in buckets}) == 36
    for name in ("tgi_queue_size", "tgi_batch_current_size", "tgi_batch_max_total_tokens"):
        assert families[name].type == "gauge"
    count = next(s.value for s in families["tgi_request_count"].samples)
    success = next(s.value for s in families["tgi_request_success"].samples)
    assert count >= success >= 1
    assert "vllm:" not in text


def test_openai_routes_use_tgi_framing(tgi: RunningSim) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{tgi.url}/v1/chat/completions", json=body) as response:
        raw = b"".join(response.iter_raw()).decode()
    assert raw.startswith("data:{") and raw.endswith("data:[DONE]\n\n")


def test_api_key_guards_generation_routes_only() -> None:
    with RunningSim("--api", "tgi", "--api-key", "sk-tgi") as tgi:
        refused = httpx.post(f"{tgi.url}/generate", json={"inputs": "hi"})
        assert refused.status_code == 401
        allowed = httpx.post(f"{tgi.url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}},
                             headers={"Authorization": "Bearer sk-tgi"})
        assert allowed.status_code == 200
        assert httpx.get(f"{tgi.url}/info").status_code == 200
        started = time.monotonic()
        assert httpx.get(f"{tgi.url}/health").status_code == 200 and time.monotonic() - started < 5


def test_faults_in_tgi_shapes() -> None:
    with RunningSim("--api", "tgi", "--error-rate", "1", "--hang-health-timeout", "0") as tgi:
        failed = httpx.post(f"{tgi.url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}})
        assert failed.status_code == 424 and failed.json()["error_type"] == "generation"
        assert 'tgi_request_failure{err="generation"} 1' in httpx.get(f"{tgi.url}/metrics").text.splitlines()
        assert httpx.post(f"{tgi.url}/admin/faults", json={"hang": True}).status_code == 200
        health = httpx.get(f"{tgi.url}/health")
        assert health.status_code == 503 and health.json() == {"error": "unhealthy", "error_type": "healthcheck"}
