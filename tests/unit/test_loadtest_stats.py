"""Exact statistics from raw records: numpy's percentiles, vLLM's TPOT/ITL weighting, goodput, windows."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from gpufleet.loadtest.record import RequestRecord
from gpufleet.loadtest.stats import (
    Distribution,
    max_concurrent,
    mean,
    measured,
    median,
    parse_step,
    percentile,
    run_stats,
    std,
    step_stats,
    summary_json,
)

T0 = 1_000.0


def ok(start: float, ttft: float, gaps: tuple[float, ...], *, step: str = "concurrency=1", tokens: int | None = None,
       input_tokens: int | None = 100, intended: float | None = None) -> RequestRecord:
    """A successful streamed request: `gaps` between its text chunks after the first."""
    return RequestRecord(
        start_epoch=start, api="openai-chat", step=step, intended_epoch=intended, ttft_s=ttft, itl_s=gaps,
        e2e_s=ttft + sum(gaps), content_chunks=len(gaps) + 1, usage_output_tokens=tokens,
        usage_input_tokens=input_tokens, status=200,
    )


def failed(start: float, *, step: str = "concurrency=1", status: int | None = 500, error: str = "HTTP 500: boom",
           intended: float | None = None) -> RequestRecord:
    return RequestRecord(start_epoch=start, api="openai-chat", step=step, intended_epoch=intended, status=status,
                         error=error)


# --- percentiles ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([1, 2, 3, 4], 50, 2.5),  # index 1.5: halfway between 2 and 3
    ([1, 2, 3, 4], 90, 3.7),  # index 2.7: 3 + 0.7 x (4 - 3)
    ([1, 2, 3, 4], 0, 1.0),
    ([1, 2, 3, 4], 100, 4.0),
    ([10, 20, 30, 40, 50], 25, 20.0),  # index 1 exactly
    ([5], 99, 5.0),
    ([3, 1, 2], 50, 2.0),  # unsorted input
    (list(range(1, 101)), 99, 99.01),  # index 98.01: 99 + 0.01
    (list(range(1, 21)), 99, 19.81),  # 20 samples: index 18.81, just under the maximum
])
def test_percentile_matches_hand_computed_linear_interpolation(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected, abs=1e-12)


def test_percentile_is_numpys_default_definition_bit_for_bit():
    rng = random.Random(3)
    for _ in range(3000):
        values = [rng.lognormvariate(0, 1.5) * rng.choice([1e-3, 1.0, 1e3]) for _ in range(rng.randint(1, 60))]
        q = rng.choice([0, 1, 50, 90, 95, 99, 99.9, 100, rng.uniform(0, 100)])
        assert percentile(values, q) == float(np.percentile(values, q)), (values, q)


def test_percentile_refuses_no_values_and_levels_outside_0_100():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_mean_median_std_agree_with_numpy():
    rng = random.Random(5)
    values = [rng.gauss(100, 15) for _ in range(257)]
    assert mean(values) == pytest.approx(float(np.mean(values)), rel=1e-12)
    assert median(values) == float(np.median(values))
    assert std(values) == pytest.approx(float(np.std(values)), rel=1e-12)  # population std, as vLLM's np.std


def test_distribution_summarises_and_is_empty_without_samples():
    dist = Distribution.of([4.0, 1.0, 3.0, 2.0])
    assert (dist.n, dist.mean, dist.median, dist.min, dist.max) == (4, 2.5, 2.5, 1.0, 4.0)
    assert dist.p(90) == pytest.approx(3.7)
    empty = Distribution.of([])
    assert (empty.n, empty.mean, empty.p(99)) == (0, None, None)


# --- TPOT and ITL weighting ----------------------------------------------------------------------------------


def test_tpot_is_per_request_and_itl_pools_every_gap_as_vllm():
    # A: 11 tokens, 10 gaps of 10 ms; B: 3 tokens, 2 gaps of 100 ms.
    records = [ok(T0, 0.1, (0.01,) * 10, tokens=11), ok(T0, 0.1, (0.1,) * 2, tokens=3)]
    stats = step_stats("concurrency=2", records)
    assert stats.tpot.n == 2
    assert stats.tpot.mean == pytest.approx(55.0)  # (10 + 100) / 2: request-weighted
    assert stats.itl.n == 12
    assert stats.itl.mean == pytest.approx(25.0)  # (10 x 10 + 2 x 100) / 12: gap-weighted
    assert stats.itl.median == pytest.approx(10.0)


def test_tpot_uses_usage_tokens_and_skips_single_token_answers():
    # 5 chunks carried 9 tokens (usage): TPOT = (E2E - TTFT) / 8, not / 4.
    multi = ok(T0, 0.05, (0.02,) * 4, tokens=9)
    single = ok(T0, 0.05, (), tokens=1)
    stats = step_stats("", [multi, single])
    assert stats.tpot.n == 1
    assert stats.tpot.mean == pytest.approx(80 / 8)
    assert stats.ttft.n == 2  # the one-token answer still has a TTFT
    assert stats.total_output_tokens == 10


def test_failed_requests_are_left_out_of_latencies_but_counted_as_errors():
    records = [ok(T0, 0.1, (0.01,)), failed(T0 + 1), failed(T0 + 2, status=None, error="connection refused")]
    stats = step_stats("concurrency=1", records)
    assert (stats.sent, stats.completed, stats.failed) == (3, 1, 2)
    assert stats.ttft.n == 1
    assert stats.error_rate == pytest.approx(2 / 3)
    assert stats.errors == {"HTTP 500: boom": 1, "connection refused": 1}
    assert stats.no_answer == 1


# --- throughput windows --------------------------------------------------------------------------------------


def test_throughput_divides_by_first_send_to_last_completion():
    records = [
        ok(T0, 0.5, (0.1,) * 9, tokens=10, input_tokens=100),  # ends at T0 + 1.4
        ok(T0 + 1.0, 0.5, (0.1,) * 19, tokens=20, input_tokens=None),  # ends at T0 + 3.4
        failed(T0 + 2.0),  # inside the window, but brings no tokens
    ]
    stats = step_stats("concurrency=2", records)
    assert stats.window_start == T0
    assert stats.window_end == pytest.approx(T0 + 3.4)
    assert stats.duration_s == pytest.approx(3.4)
    assert stats.output_throughput == pytest.approx(30 / 3.4)
    assert stats.request_throughput == pytest.approx(2 / 3.4)
    assert stats.total_input_tokens == 100  # usage when given; no usage and no expected count adds 0
    assert stats.total_token_throughput == pytest.approx(130 / 3.4)


def test_a_request_that_never_answered_ends_at_its_send():
    stats = step_stats("concurrency=1", [ok(T0, 0.2, (0.1,)), failed(T0 + 10.0, status=None, error="timeout")])
    assert stats.window_end == T0 + 10.0
    assert step_stats("x", [failed(T0)]).output_throughput == 0.0  # zero-length window: no division by zero


def test_max_concurrent_sweeps_half_open_intervals():
    back_to_back = [ok(T0, 0.5, (0.5,)), ok(T0 + 1.0, 0.5, (0.5,))]  # [0, 1) and [1, 2): never two at once
    assert max_concurrent(back_to_back) == 1
    overlapping = [ok(T0, 0.5, (0.5,)), ok(T0 + 0.2, 0.5, (0.5,)), ok(T0 + 0.4, 0.1, ())]
    assert max_concurrent(overlapping) == 3


# --- goodput -------------------------------------------------------------------------------------------------


def test_goodput_counts_requests_meeting_every_per_request_objective():
    records = [
        ok(T0, 0.200, (0.05,) * 4, tokens=5),  # TTFT exactly at the limit, TPOT 50 ms at the limit: good
        ok(T0, 0.201, (0.01,) * 4, tokens=5),  # TTFT 1 ms over: not good
        ok(T0, 0.100, (0.06,) * 4, tokens=5),  # TPOT 60 ms over: not good
        ok(T0, 0.100, (), tokens=1),  # one token: TPOT counts as 0, good
        failed(T0 + 0.5),  # failed: never good
    ]
    stats = step_stats("concurrency=4", records, goodput={"ttft": 200, "tpot": 50})
    assert stats.good == 2
    assert stats.request_goodput == pytest.approx(2 / stats.duration_s)
    assert step_stats("concurrency=4", records).request_goodput is None  # no objectives: no goodput
    assert step_stats("c", records, goodput={"e2el": 250}).good == 2  # E2E 0.241 s and 0.1 s


def test_goodput_refuses_unknown_metrics():
    with pytest.raises(ValueError, match="unknown goodput metric"):
        step_stats("", [ok(T0, 0.1, ())], goodput={"itl": 50})


# --- dispatch lag, steps, measured records -------------------------------------------------------------------


def test_dispatch_lag_is_measured_only_for_scheduled_requests():
    records = [ok(T0 + 0.003, 0.1, (), intended=T0), failed(T0 + 1.010, intended=T0 + 1.0)]
    stats = step_stats("rate=2", records)
    assert stats.dispatch_lag is not None
    assert stats.dispatch_lag.n == 2
    assert stats.dispatch_lag.max == pytest.approx(10.0)
    assert step_stats("concurrency=1", [ok(T0, 0.1, ())]).dispatch_lag is None


def test_parse_step_reads_the_load_variable():
    assert parse_step("concurrency=8") == ("concurrency", 8.0)
    assert parse_step("rate=2.5") == ("rate", 2.5)
    assert parse_step("") == ("", None)
    assert parse_step("spike") == ("spike", None)


def test_run_stats_orders_numeric_steps_by_value_and_others_by_time():
    records = [ok(T0, 0.1, (), step="concurrency=16"), ok(T0 + 5, 0.1, (), step="concurrency=4")]
    assert [s.label for s in run_stats(records)] == ["4", "16"]
    named = [ok(T0 + 5, 0.1, (), step="ramp"), ok(T0, 0.1, (), step="spike")]
    assert [s.step for s in run_stats(named)] == ["spike", "ramp"]


def test_measured_leaves_out_warmup_and_requests_outside_steps():
    records = [ok(T0, 0.1, (), step="warmup:concurrency=1"), ok(T0 + 1, 0.1, (), step="concurrency=1"),
               ok(T0 + 9, 0.1, (), step="")]
    kept = measured(records)
    assert ([r.step for r in kept.records], kept.warmup, kept.outside) == (["concurrency=1"], 1, 1)
    assert [s.step for s in run_stats(records)] == ["concurrency=1"]
    unstepped = [ok(T0, 0.1, (), step=""), ok(T0 + 1, 0.1, (), step="")]
    assert len(measured(unstepped).records) == 2  # a run without steps keeps every record


# --- vLLM's result JSON --------------------------------------------------------------------------------------

VLLM_FIELDS = {
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "request_goodput", "output_throughput", "total_token_throughput", "max_concurrency", "max_concurrent_requests",
    "request_rate",
    *(f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el")
      for stat in ("mean", "median", "std", "p50", "p90", "p95", "p99")),
}


def test_summary_json_uses_vllm_bench_serve_field_names():
    stats = step_stats("concurrency=8", [ok(T0, 0.1, (0.02,) * 4, tokens=5), ok(T0 + 0.1, 0.2, (0.03,) * 4)],
                       goodput={"ttft": 150})
    data = summary_json(stats, {"date": "20250615-150640", "backend": "openai-chat", "model_id": "m"})
    assert set(data) >= VLLM_FIELDS
    assert list(data)[:3] == ["date", "backend", "model_id"]  # metadata first, as vLLM's top level
    assert data["max_concurrency"] == 8
    assert data["request_rate"] == "inf"  # closed loop, as vLLM writes it
    assert data["completed"] == 2
    assert data["mean_ttft_ms"] == pytest.approx(150.0)
    assert data["p99_itl_ms"] == pytest.approx(float(np.percentile([20] * 4 + [30] * 4, 99)))
    assert data["request_goodput"] == pytest.approx(1 / stats.duration_s)
    json.dumps(data, allow_nan=False)


def test_summary_json_of_an_open_loop_step_without_successes():
    data = summary_json(step_stats("rate=2.5", [failed(T0, intended=T0)]))
    assert data["request_rate"] == 2.5
    assert data["max_concurrency"] is None
    assert data["mean_ttft_ms"] is None and data["p99_ttft_ms"] is None  # nothing measured reads as null, not 0
    assert data["p99_dispatch_lag_ms"] == 0.0
    json.dumps(data, allow_nan=False)
