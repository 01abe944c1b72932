"""The simulator's metrics: vLLM V1's and TGI's names, types, labels and buckets, and what each observation means."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet import __version__
from gpufleet.sim.metrics import (
    Histogram,
    TgiMetrics,
    VllmMetrics,
    build_1_2_5_buckets,
    tgi_duration_buckets,
    tgi_linear_buckets,
)
from gpufleet.sim.types import EngineStats, RequestTiming, SimConfig, StepRecord

CONFIG = SimConfig(model="Qwen/Qwen2.5-7B-Instruct", served_model_name="qwen", max_model_len=32768, max_num_seqs=256,
                   max_num_batched_tokens=4096, block_size=16, num_gpu_blocks=1000, gpu_memory_utilization=0.95,
                   tensor_parallel_size=4)
STATS = EngineStats(num_running=3, num_waiting=2, kv_blocks_used=250, kv_blocks_total=1000, prompt_tokens_total=1234,
                    generation_tokens_total=567, preemptions_total=1, steps_total=42)


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], name: str, **labels: str) -> float:
    for fam in fams.values():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{name}{labels} not found")


def timing(**changes: Any) -> RequestTiming:
    base = dict(arrival=10.0, prompt_tokens=100, max_tokens=50, first_scheduled=10.2, first_token=10.5,
                last_token=12.5, generation_tokens=21, finish_reason="length")
    return RequestTiming(**{**base, **changes})


def test_build_1_2_5_buckets_matches_vllm() -> None:
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert build_1_2_5_buckets(32768)[-3:] == (5000, 10000, 20000)
    assert build_1_2_5_buckets(1) == (1,)


def test_tgi_buckets() -> None:
    durations = tgi_duration_buckets()
    assert len(durations) == 35
    assert durations[0] == pytest.approx(0.00015) and durations[-1] == pytest.approx(145.6, rel=1e-3)
    assert all(b / a == pytest.approx(1.5) for a, b in itertools.pairwise(durations))
    assert tgi_linear_buckets(1000) == tuple(float(10 * i) for i in range(1, 101))


def test_histogram_counts_le_inclusively() -> None:
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        h.observe(v)
    assert list(h.cumulative()) == [("1.0", 2), ("2.0", 3), ("+Inf", 4)]
    assert h.sum == 6.0 and h.count == 4


def test_vllm_gauges_and_counters_come_from_engine_stats() -> None:
    metrics = VllmMetrics(CONFIG, lambda: STATS, profile="p1", cache_dtype="fp8")
    fams = families(metrics.render().decode())
    base = {"model_name": "qwen", "engine": "0"}
    assert value(fams, "vllm:num_requests_running", **base) == 3
    assert value(fams, "vllm:num_requests_waiting") == 2
    assert value(fams, "vllm:kv_cache_usage_perc") == 0.25
    assert value(fams, "vllm:prompt_tokens_total", **base) == 1234
    assert value(fams, "vllm:generation_tokens_total") == 567
    assert value(fams, "vllm:num_preemptions_total") == 1
    assert fams["vllm:prompt_tokens"].type == "counter"
    assert value(fams, "vllm:prompt_tokens_created") > 1e9  # prometheus_client's _created, as vLLM exposes
    for reason in ("stop", "length", "abort"):
        assert value(fams, "vllm:request_success_total", finished_reason=reason, **base) == 0
    info = fams["vllm:cache_config_info"].samples[0].labels
    assert info["cache_dtype"] == "fp8" and info["num_gpu_blocks"] == "1000" and info["engine"] == "0"
    assert "model_name" not in info
    assert fams["gpufleet_sim_info"].samples[0].labels == {"profile": "p1", "api": "vllm", "version": __version__}
    assert "python_gc_objects_collected" in fams and "process_cpu_seconds" in fams


def test_vllm_request_histograms_follow_vllms_intervals() -> None:
    metrics = VllmMetrics(CONFIG, lambda: STATS, profile="p")
    metrics.request_finished("r1", timing())
    metrics.ttft.observe(10.5 - 10.0)  # the surface's observation at the first token
    fams = families(metrics.render().decode())

    def hist_sum(name: str) -> float:
        return value(fams, f"{name}_sum")

    assert value(fams, "vllm:request_success_total", finished_reason="length") == 1
    assert hist_sum("vllm:e2e_request_latency_seconds") == pytest.approx(2.5)  # arrival -> last token
    assert hist_sum("vllm:request_queue_time_seconds") == pytest.approx(0.2)  # arrival -> first scheduled
    assert hist_sum("vllm:request_prefill_time_seconds") == pytest.approx(0.3)  # scheduled -> first token
    assert hist_sum("vllm:request_decode_time_seconds") == pytest.approx(2.0)  # first -> last token
    assert hist_sum("vllm:request_inference_time_seconds") == pytest.approx(2.3)  # scheduled -> last token
    assert hist_sum("vllm:request_time_per_output_token_seconds") == pytest.approx(0.1)  # 2.0 s / 20 gaps
    assert hist_sum("vllm:time_to_first_token_seconds") == pytest.approx(0.5)
    assert hist_sum("vllm:request_prompt_tokens") == 100 and hist_sum("vllm:request_generation_tokens") == 21
    assert hist_sum("vllm:request_params_max_tokens") == 50 and hist_sum("vllm:request_params_n") == 1
    assert value(fams, "vllm:request_prompt_tokens_bucket", le="100.0") == 1
    assert value(fams, "vllm:request_prompt_tokens_bucket", le="50.0") == 0


def test_an_aborted_request_without_tokens() -> None:
    metrics = VllmMetrics(CONFIG, lambda: STATS, profile="p", clock=lambda: 11.0)
    metrics.request_finished("r", timing(first_scheduled=None, first_token=None, last_token=None,
                                         generation_tokens=0, finish_reason="abort"))
    fams = families(metrics.render().decode())
    assert value(fams, "vllm:request_success_total", finished_reason="abort") == 1
    assert value(fams, "vllm:e2e_request_latency_seconds_sum") == pytest.approx(1.0)  # arrival -> now
    assert value(fams, "vllm:request_queue_time_seconds_count") == 0
    assert value(fams, "vllm:request_decode_time_seconds_count") == 0


def test_iteration_tokens_from_steps() -> None:
    metrics = VllmMetrics(CONFIG, lambda: STATS, profile="p")
    metrics.step_finished(StepRecord(started=0.0, duration=0.01, prefill_tokens=100, decode_tokens=28, batch_size=29))
    metrics.step_finished(StepRecord(started=0.0, duration=0.01, prefill_tokens=0, decode_tokens=0, batch_size=0))
    fams = families(metrics.render().decode())
    assert value(fams, "vllm:iteration_tokens_total_count") == 1
    assert value(fams, "vllm:iteration_tokens_total_bucket", le="128.0") == 1
    assert value(fams, "vllm:iteration_tokens_total_bucket", le="64.0") == 0


def test_tgi_exposition_has_no_total_suffix_and_tgi_buckets() -> None:
    metrics = TgiMetrics(CONFIG, lambda: STATS, profile="p", max_input_tokens=32767, max_total_tokens=32768)
    metrics.request_received()
    metrics.request_received()
    metrics.request_failed("overloaded")
    metrics.validated(0.0001, 100, 50)
    metrics.request_finished("r", timing())
    metrics.request_finished("r2", timing(finish_reason="abort"))
    metrics.step_finished(StepRecord(started=0.0, duration=0.02, prefill_tokens=100, decode_tokens=3, batch_size=4))
    metrics.step_finished(StepRecord(started=0.0, duration=0.01, prefill_tokens=0, decode_tokens=4, batch_size=4))
    text = metrics.render().decode()
    lines = text.splitlines()
    assert "# TYPE tgi_request_count counter" in lines and "tgi_request_count 2" in lines
    assert "tgi_request_success 1" in lines
    assert 'tgi_request_failure{err="overloaded"} 1' in lines and 'tgi_request_failure{err="incomplete"} 1' in lines
    assert not any(line.split("{")[0].split(" ")[0].endswith("_total") for line in lines if not line.startswith("#"))
    assert "tgi_queue_size 2" in lines and "tgi_batch_current_size 3" in lines
    assert "tgi_batch_max_total_tokens 16000" in lines
    fams = families(text)
    assert fams["tgi_request_count"].type == "counter"
    duration = fams["tgi_request_duration"]
    les = [s.labels["le"] for s in duration.samples if s.name.endswith("_bucket")]
    assert len(les) == 36 and les[-1] == "+Inf" and math.isclose(float(les[0]), 0.00015)
    assert value(fams, "tgi_request_duration_sum") == pytest.approx(2.5)
    assert value(fams, "tgi_request_queue_duration_sum") == pytest.approx(0.2)
    assert value(fams, "tgi_request_mean_time_per_token_duration_sum") == pytest.approx(0.1)
    assert value(fams, "tgi_batch_inference_count_total", method="prefill") == 1
    assert value(fams, "tgi_batch_forward_duration_count", method="decode") == 1
    input_les = [s.labels["le"] for s in fams["tgi_request_input_length"].samples if s.name.endswith("_bucket")]
    assert len(input_les) == 101 and float(input_les[0]) == pytest.approx(327.67)
    assert fams["gpufleet_sim_info"].samples[0].labels["api"] == "tgi"
    assert "vllm:" not in text
