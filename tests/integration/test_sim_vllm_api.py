"""The simulator's vLLM surface, spoken to as clients speak to vLLM: the official openai client,
raw SSE, /metrics through prometheus_client's parser, and the error shapes.

Servers run in-process on 127.0.0.1 (a free port), in a background thread with their own event loop,
over the real AsyncEngine with the `bench` profile; `RunningSim` is shared with the TGI and fault tests.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.cli import sim_cmd
from gpufleet.cli.main import build_parser
from gpufleet.sim import tokenizer
from gpufleet.sim.metrics import ITERATION_TOKENS_BUCKETS, ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS
from gpufleet.sim.server import ServeOptions, SimServer

HOST = "127.0.0.1"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # the bench profile's model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def sim_options(*flags: str) -> ServeOptions:
    """Options exactly as `gpufleet sim serve FLAGS` resolves them (fast profile, no load delay by default)."""
    defaults = ["--profile", "bench", "--host", HOST]
    if "--startup-delay" not in flags:
        defaults += ["--startup-delay", "0"]
    if "--port" not in flags:
        defaults += ["--port", str(free_port())]
    args = build_parser().parse_args(["sim", "serve", *defaults, *flags])
    return sim_cmd.build_options(args)


class RunningSim:
    """A SimServer serving from a background thread; a context manager."""

    def __init__(self, *flags: str, wait_bound: bool = True) -> None:
        self.options = sim_options(*flags)
        self.port = self.options.port
        self.url = f"http://{HOST}:{self.port}"
        self.wait_bound = wait_bound
        self.exit_code: int | None = None
        self.server: SimServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.server = SimServer(self.options)
        try:
            await self.server.start()
        finally:
            self._bound.set()
        self.exit_code = await self.server.wait()

    def __enter__(self) -> RunningSim:
        self._thread.start()
        if self.wait_bound:
            assert self._bound.wait(20), "the simulator did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.loop is not None and self.server is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.server.request_stop)
        self._thread.join(15)
        assert not self._thread.is_alive(), "the simulator did not stop"

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30)

    def metrics(self) -> dict[str, Any]:
        text = httpx.get(f"{self.url}/metrics").text
        return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], family: str, name: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name}{labels} in {family}")


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSim]:
    with RunningSim("--served-model-name", "llama", MODEL) as server:
        yield server


# ---- the openai client, unchanged --------------------------------------------------------------


def test_openai_client_streams_chat_with_usage(sim: RunningSim) -> None:
    stream = sim.client().chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "Say hello to the simulator."}], max_tokens=12,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    token_chunks = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in token_chunks][-1] == "length"
    assert all(c.usage is None for c in token_chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.object == "chat.completion.chunk"
    expected_prompt = tokenizer.count_tokens("Say hello to the simulator.") + 5 + 3
    assert usage_chunk.usage.prompt_tokens == expected_prompt
    assert usage_chunk.usage.completion_tokens == 12 == len(token_chunks) - 1  # minus the role chunk
    assert usage_chunk.usage.total_tokens == expected_prompt + 12
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.model == "llama" for c in chunks)


def test_openai_client_streams_completions(sim: RunningSim) -> None:
    prompt = tokenizer.text_of_tokens(100, seed=3)
    stream = sim.client().completions.create(model=MODEL, prompt=prompt, max_tokens=6, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) == 6 and all(texts)
    assert chunks[-1].usage.prompt_tokens == 100 and chunks[-1].usage.completion_tokens == 6
    assert chunks[0].object == "text_completion" and chunks[0].id.startswith("cmpl-")


def test_non_streaming_chat_and_completion_report_usage(sim: RunningSim) -> None:
    client = sim.client()
    chat = client.chat.completions.create(
        model="llama", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=5, extra_body={"ignore_eos": True},
    )
    assert chat.object == "chat.completion" and chat.choices[0].finish_reason == "length"
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.completion_tokens == 5
    assert chat.usage.prompt_tokens == tokenizer.chat_prompt_tokens(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    completion = client.completions.create(model="llama", prompt=[1, 2, 3, 4], max_tokens=3,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.prompt_tokens == 4 and completion.usage.completion_tokens == 3
    assert completion.choices[0].finish_reason == "length"


def test_min_tokens_and_default_max_tokens(sim: RunningSim) -> None:
    # no max_tokens: what is left of max_model_len (8192) after the prompt
    prompt = tokenizer.text_of_tokens(8189, seed=4)
    body = httpx.post(f"{sim.url}/v1/completions", json={"model": "llama", "prompt": prompt, "ignore_eos": True},
                      timeout=30).json()
    assert body["usage"] == {"prompt_tokens": 8189, "total_tokens": 8192, "completion_tokens": 3,
                             "prompt_tokens_details": None}
    # the EOS may come once min_tokens are out, never before
    for _ in range(3):
        body = httpx.post(f"{sim.url}/v1/completions",
                          json={"model": "llama", "prompt": "x", "min_tokens": 4, "max_tokens": 6}).json()
        assert 4 <= body["usage"]["completion_tokens"] <= 6


def test_http_1_0_clients_get_an_unchunked_stream(sim: RunningSim) -> None:
    body = b'{"prompt":"hi","max_tokens":2,"ignore_eos":true,"stream":true}'
    with socket.create_connection((HOST, sim.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"Transfer-Encoding" not in head
    events = payload.decode().split("\n\n")
    assert len(events) == 4 and events[-2] == "data: [DONE]" and events[0].startswith("data: {")


def test_sse_framing_is_vllms(sim: RunningSim) -> None:
    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{sim.url}/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_raw()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [p["choices"][0]["delta"] for p in payloads[1:4]] and all("usage" in p for p in payloads)
    assert payloads[3]["choices"][0]["finish_reason"] == "length" and payloads[3]["choices"][0]["stop_reason"] is None
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3
    # without include_usage, chat chunks carry no usage key at all
    body.pop("stream_options")
    with httpx.stream("POST", f"{sim.url}/v1/chat/completions", json=body) as response:
        raw = b"".join(response.iter_raw()).decode()
    assert '"usage"' not in raw and raw.endswith("data: [DONE]\n\n")


def test_small_endpoints(sim: RunningSim) -> None:
    health = httpx.get(f"{sim.url}/health")
    assert health.status_code == 200 and health.content == b""
    assert httpx.get(f"{sim.url}/version").json() == {"version": f"gpufleet-sim {sim_cmd_version()}"}
    models = sim.client().models.list()
    ids = [m.id for m in models.data]
    assert ids == ["llama", MODEL]
    raw = httpx.get(f"{sim.url}/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["max_model_len"] == 8192 and raw["data"][0]["root"] == MODEL
    tokens = httpx.post(f"{sim.url}/tokenize", json={"prompt": "hello world, again"}).json()
    assert tokens["count"] == tokenizer.count_tokens("hello world, again") == len(tokens["tokens"])
    chat = httpx.post(f"{sim.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] == tokenizer.chat_prompt_tokens([{"role": "user", "content": "hi"}])


def sim_cmd_version() -> str:
    from gpufleet import __version__

    return __version__


# ---- errors -------------------------------------------------------------------------------------


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == response.status_code
    return body["error"]


def test_context_length_errors_use_vllms_words(sim: RunningSim) -> None:
    prompt = tokenizer.text_of_tokens(8000, seed=1)
    too_many = httpx.post(f"{sim.url}/v1/completions", json={"model": "llama", "prompt": prompt, "max_tokens": 500})
    assert too_many.status_code == 400
    assert _error(too_many) == {
        "message": "'max_tokens' or 'max_completion_tokens' is too large: 500. This model's maximum context length "
                   "is 8192 tokens and your request has 8000 input tokens (500 > 8192 - 8000).",
        "type": "BadRequestError", "param": None, "code": 400}
    too_long = httpx.post(f"{sim.url}/v1/completions",
                          json={"model": "llama", "prompt": tokenizer.text_of_tokens(9000, seed=1)})
    assert _error(too_long)["message"] == (
        "This model's maximum context length is 8192 tokens. However, your request has 9000 input tokens. "
        "Please reduce the length of the input messages.")
    with pytest.raises(openai.BadRequestError):
        sim.client().chat.completions.create(model="llama", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=500)


def test_bad_parameters_are_400(sim: RunningSim) -> None:
    url = f"{sim.url}/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    negative = httpx.post(url, json={"model": "llama", "messages": messages, "max_tokens": -1})
    assert negative.status_code == 400 and _error(negative)["message"] == "max_tokens must be at least 1, got -1."
    options = httpx.post(url, json={"model": "llama", "messages": messages, "stream_options": {"include_usage": True}})
    assert _error(options)["message"] == "Stream options can only be defined when `stream=True`."
    for body in ({"model": "llama"}, {"model": "llama", "messages": messages, "n": 2},
                 {"model": "llama", "messages": messages, "temperature": -1}):
        response = httpx.post(url, json=body)
        assert response.status_code == 400 and _error(response)["type"] == "BadRequestError"
    not_json = httpx.post(url, content=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400


def test_unknown_model_is_404(sim: RunningSim) -> None:
    response = httpx.post(f"{sim.url}/v1/completions", json={"model": "gpt-4", "prompt": "hi", "max_tokens": 1})
    assert response.status_code == 404
    assert _error(response) == {"message": "The model `gpt-4` does not exist.", "type": "NotFoundError",
                                "param": None, "code": 404}
    with pytest.raises(openai.NotFoundError):
        sim.client().completions.create(model="gpt-4", prompt="hi", max_tokens=1)


def test_api_key_protects_v1_only(tmp_path: Any) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-sim-test\n")
    with RunningSim("--api-key-file", str(key_file)) as sim:
        missing = httpx.post(f"{sim.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        wrong = httpx.get(f"{sim.url}/v1/models", headers={"Authorization": "Bearer nope"})
        for response in (missing, wrong):
            assert response.status_code == 401 and response.json() == {"error": "Unauthorized"}
        assert httpx.get(f"{sim.url}/health").status_code == 200
        assert httpx.get(f"{sim.url}/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            sim.client("wrong").models.list()
        answer = sim.client("sk-sim-test").completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                                               extra_body={"ignore_eos": True})
        assert answer.usage.completion_tokens == 2


# ---- metrics ------------------------------------------------------------------------------------

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
          "vllm:cache_config_info", "gpufleet_sim_info")
COUNTERS = ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success", "vllm:num_preemptions")
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": TTFT_BUCKETS,
    "vllm:inter_token_latency_seconds": ITL_BUCKETS,
    "vllm:request_time_per_output_token_seconds": ITL_BUCKETS,
    "vllm:e2e_request_latency_seconds": REQUEST_LATENCY_BUCKETS,
    "vllm:request_queue_time_seconds": REQUEST_LATENCY_BUCKETS,
    "vllm:request_inference_time_seconds": REQUEST_LATENCY_BUCKETS,
    "vllm:request_prefill_time_seconds": REQUEST_LATENCY_BUCKETS,
    "vllm:request_decode_time_seconds": REQUEST_LATENCY_BUCKETS,
    "vllm:request_prompt_tokens": (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
    "vllm:request_generation_tokens": (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
    "vllm:request_params_max_tokens": (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
    "vllm:request_params_n": (1, 2, 5, 10, 20),
    "vllm:iteration_tokens_total": ITERATION_TOKENS_BUCKETS,
}


def _buckets(family: Any) -> list[float]:
    return [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]


def test_metrics_have_vllm_v1_names_types_labels_and_buckets() -> None:
    with RunningSim("--served-model-name", "qwen-sim", "--profile", "bench") as sim:
        before = sim.metrics()
        for name in GAUGES:
            assert before[name].type == "gauge", name
        for name in COUNTERS:
            assert before[name].type == "counter", name
        for name, buckets in HISTOGRAMS.items():
            assert before[name].type == "histogram", name
            assert _buckets(before[name]) == [float(b) for b in buckets], name
        for reason in ("stop", "length", "abort"):  # pre-initialised before any traffic
            assert sample(before, "vllm:request_success", "vllm:request_success_total", finished_reason=reason,
                          model_name="qwen-sim", engine="0") == 0
        labels = next(s.labels for s in before["vllm:num_requests_running"].samples)
        assert labels == {"model_name": "qwen-sim", "engine": "0"}
        info = before["vllm:cache_config_info"].samples[0]
        assert info.value == 1 and info.labels["block_size"] == "16" and info.labels["num_gpu_blocks"] == "55665"
        sim_info = before["gpufleet_sim_info"].samples[0].labels
        assert sim_info["profile"] == "bench" and sim_info["api"] == "vllm"
        raw = httpx.get(f"{sim.url}/metrics").text
        assert "vllm:prompt_tokens_total{" in raw and "vllm:iteration_tokens_total_bucket{" in raw

        client = sim.client()
        for _ in range(3):
            client.completions.create(model="qwen-sim", prompt=tokenizer.text_of_tokens(40), max_tokens=7,
                                      extra_body={"ignore_eos": True})
        after = sim.metrics()
        assert sample(after, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == 120
        assert sample(after, "vllm:generation_tokens", "vllm:generation_tokens_total") == 21
        assert sample(after, "vllm:request_success", "vllm:request_success_total", finished_reason="length") == 3
        assert sample(after, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count") == 3
        assert sample(after, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 3
        assert sample(after, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") == 18
        assert sample(after, "vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum") == 120
        assert sample(after, "vllm:iteration_tokens_total", "vllm:iteration_tokens_total_count") > 0
        assert sample(after, "vllm:num_requests_running", "vllm:num_requests_running") == 0


def test_client_disconnect_aborts_the_engine_request(sim: RunningSim) -> None:
    before = sample(sim.metrics(), "vllm:request_success", "vllm:request_success_total", finished_reason="abort")
    body = {"model": "llama", "prompt": "go on", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{sim.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        families = sim.metrics()
        aborted = sample(families, "vllm:request_success", "vllm:request_success_total", finished_reason="abort")
        running = sample(families, "vllm:num_requests_running", "vllm:num_requests_running")
        if aborted == before + 1 and running == 0:
            break
        time.sleep(0.05)
    assert aborted == before + 1 and running == 0


# ---- start-up and the command line --------------------------------------------------------------


def _connect(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except ConnectionRefusedError:
        return False


def test_port_refuses_connections_while_loading_then_serves() -> None:
    with RunningSim("--startup-delay", "1.0", wait_bound=False) as sim:
        started = time.monotonic()
        time.sleep(0.3)
        assert not _connect(sim.port)
        while not _connect(sim.port):
            assert time.monotonic() - started < 10
            time.sleep(0.05)
        assert time.monotonic() - started >= 0.9
        assert httpx.get(f"{sim.url}/health").status_code == 200


def test_cli_serves_and_rejects_bad_flags() -> None:
    cli = [sys.executable, "-m", "gpufleet", "sim", "serve"]
    bad = subprocess.run([*cli, "--max-num-seqs", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--max-num-seqs: must be >= 1" in bad.stderr
    unknown = subprocess.run([*cli, "--no-such-flag"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unrecognized arguments: --no-such-flag" in unknown.stderr
    batched = subprocess.run([*cli, "--max-num-seqs", "512", "--max-num-batched-tokens", "256"],
                             capture_output=True, text=True, timeout=60)
    assert batched.returncode == 2 and "max_num_batched_tokens (256) must be greater" in batched.stderr
    port = free_port()
    proc = subprocess.Popen([*cli, "--profile", "bench", "--startup-delay", "0", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _connect(port):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.get(f"http://{HOST}:{port}/version").json()["version"].startswith("gpufleet-sim ")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "SIMULATED vLLM engine" in err


def test_gpu_flag_sizes_the_kv_cache_with_the_planner() -> None:
    options = sim_options("--profile", "rtx4090d-tp4-qwen2.5-7b", "--gpu", "rtx-4090d", "--gpu-memory-utilization",
                          "0.95", "--max-num-batched-tokens", "4096")
    assert options.config.num_gpu_blocks == 82062  # what `gpufleet plan` computes for the seed layout
    override = sim_options("--num-gpu-blocks-override", "4096")
    assert override.config.num_gpu_blocks == 4096 and override.num_gpu_blocks_override == 4096
    with pytest.raises(ValueError, match="larger than the maximum number of tokens"):
        sim_options("--num-gpu-blocks-override", "10")
    with pytest.raises(ValueError, match="the capacity planner refuses"):
        sim_options("--model", "Qwen/Qwen2.5-7B-Instruct", "--max-model-len", "65536", "--gpu", "rtx-4090d")
    roped = sim_options("--model", "Qwen/Qwen2.5-7B-Instruct", "--max-model-len", "65536", "--gpu", "rtx-4090d",
                        "--tensor-parallel-size", "4", "--hf-overrides",
                        '{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}')
    assert roped.config.max_model_len == 65536 and roped.config.served_model_name == "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(ValueError, match="not in the GPU catalogue"):
        sim_options("--gpu", "rtx-9999")


def test_api_key_sources(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert sim_options().api_key == "from-env"
    assert sim_options("--api-key", "from-flag").api_key == "from-flag"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert sim_options("--api-key", "from-flag", "--api-key-file", str(key_file)).api_key == "from-file"
    with pytest.raises(ValueError, match="is empty"):
        (tmp_path / "empty").write_text("")
        sim_options("--api-key-file", str(tmp_path / "empty"))
    monkeypatch.delenv("VLLM_API_KEY")
    assert sim_options().api_key is None
