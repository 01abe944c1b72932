"""The SLO gate: pass, fail with margins, every invalid reason (exit 2, which beats a fail), the headline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gpufleet.errors import ConfigError
from gpufleet.loadtest.gate import (
    EXIT_FAIL,
    EXIT_INVALID,
    EXIT_PASS,
    Check,
    CpuSample,
    GateRules,
    evaluate,
    slo_from_fleet,
)
from gpufleet.loadtest.record import RequestRecord
from tests.unit.loadtest_synth import EXAMPLE_SLO, SEED_STEPS, T0, SynthStep, example_source, seed_run, step_records

REPO = Path(__file__).resolve().parents[2]
STABLE_STEPS = SEED_STEPS[:5]  # 1..32: every step within the example slo
BASE = SEED_STEPS[3]  # concurrency 16: within every objective, throughput objective included


@pytest.fixture(scope="module")
def seed_records() -> list[RequestRecord]:
    return seed_run()


def one_step(step: SynthStep, *, seed: int = 1, **kwargs) -> list[RequestRecord]:
    return step_records(step, random.Random(seed), T0, **kwargs)


def window(records: list[RequestRecord], step: str) -> tuple[float, float]:
    chosen = [r for r in records if r.step == step]
    return min(r.start_epoch for r in chosen), max(r.start_epoch + (r.e2e_s or 0) for r in chosen)


# --- pass and fail -------------------------------------------------------------------------------------------


def test_a_run_within_every_slo_passes_with_exit_0():
    verdict = evaluate(seed_run(STABLE_STEPS), example_source())
    assert (verdict.status, verdict.exit_code) == ("pass", EXIT_PASS)
    assert [s.status for s in verdict.steps] == ["pass"] * 5
    assert verdict.reasons == []
    assert all(c.passed and c.margin_pct > 0 for s in verdict.steps for c in s.checks)


def test_an_unstable_step_fails_with_exit_1_and_negative_margins(seed_records):
    verdict = evaluate(seed_records, example_source())
    assert (verdict.status, verdict.exit_code) == ("fail", EXIT_FAIL)
    top = verdict.steps[-1]
    assert (top.stats.step, top.status) == ("concurrency=64", "fail")
    ttft = next(c for c in top.checks if c.slo == "ttft_p99_ms")
    assert ttft.value == top.stats.ttft.p(99)
    assert ttft.margin_pct == pytest.approx((500 - ttft.value) / 500 * 100)
    assert ttft.margin_pct < 0
    assert {c.slo for c in top.checks if not c.passed} == {"ttft_p99_ms", "itl_p99_ms", "tpot_p99_ms",
                                                            "max_error_rate"}
    assert any(r.startswith("concurrency=64: p99 TTFT ") and "> 500.0 ms (margin -" in r for r in verdict.reasons)
    assert any("error rate" in r and "> 1%" in r for r in verdict.reasons)


def test_the_throughput_objective_is_checked_once_against_the_best_stable_step():
    passing = evaluate(seed_run(STABLE_STEPS), example_source())
    (check,) = passing.run_checks
    assert check.value == max(s.stats.output_throughput for s in passing.steps)
    assert check.passed  # concurrency 1 is far below 500 tokens/s and is still stable
    demanding = evaluate(seed_run(STABLE_STEPS), example_source(EXAMPLE_SLO.model_copy(
        update={"min_output_tokens_per_s": 5000})))
    assert demanding.exit_code == EXIT_FAIL
    assert all(s.stable for s in demanding.steps)
    assert demanding.reasons == [f"run: {demanding.run_checks[0].describe()}"]


def test_optional_objectives_are_checked_only_when_set():
    slo = EXAMPLE_SLO.model_copy(update={"tpot_p99_ms": None, "e2e_p99_ms": 100.0})
    verdict = evaluate(one_step(SEED_STEPS[0]), example_source(slo))
    slos = [c.slo for c in verdict.steps[0].checks]
    assert slos == ["ttft_p99_ms", "itl_p99_ms", "e2e_p99_ms", "max_error_rate"]
    assert verdict.exit_code == EXIT_FAIL  # E2E is about 360 ms at concurrency 1
    assert verdict.source.goodput() == {"ttft": 500.0, "e2el": 100.0}


@pytest.mark.parametrize(("check", "margin", "passed", "text"), [
    (Check("ttft_p99_ms", "p99 TTFT", "ms", 400.0, 500.0, "max"), 20.0, True, "p99 TTFT 400.0 ≤ 500.0 ms"),
    (Check("ttft_p99_ms", "p99 TTFT", "ms", 600.0, 500.0, "max"), -20.0, False, "p99 TTFT 600.0 ms > 500.0 ms"),
    (Check("min_output_tokens_per_s", "tokens/s", "tokens/s", 750.0, 500.0, "min"), 50.0, True, "≥"),
    (Check("min_output_tokens_per_s", "tokens/s", "tokens/s", 250.0, 500.0, "min"), -50.0, False, "< 500.0"),
    (Check("max_error_rate", "error rate", "%", 0.0, 0.0, "max", scale=100), None, True, "error rate 0.0% ≤ 0.0%"),
    (Check("max_error_rate", "error rate", "%", 0.02, 0.0, "max", scale=100), None, False, "2% > 0.0%"),
    (Check("itl_p99_ms", "p99 ITL", "ms", None, 80.0, "max"), None, False, "nothing measured"),
])
def test_check_margin_is_room_left_as_a_share_of_the_limit(check, margin, passed, text):
    assert check.passed is passed
    assert check.margin_pct == (pytest.approx(margin) if margin is not None else None)
    assert text.replace("400.0 ≤", "400.0 ms ≤") in check.describe()


# --- invalid runs: exit 2 ------------------------------------------------------------------------------------


def test_too_few_completed_requests_make_a_step_invalid():
    verdict = evaluate(one_step(SEED_STEPS[0], min_requests=12), example_source())
    assert verdict.exit_code == EXIT_INVALID
    assert verdict.exit_code == EXIT_INVALID
    assert verdict.steps[0].invalid == ("only 12 requests completed; a step needs at least 20",)


def test_a_p99_needs_a_hundred_samples_by_default():
    records = one_step(BASE, min_requests=60)  # 16 users x 4 requests
    verdict = evaluate(records, example_source())
    assert verdict.exit_code == EXIT_INVALID
    # TTFT and TPOT (gated in the example slo) are per request: 64 samples; ITL pools 47 gaps a request
    assert verdict.steps[0].invalid == tuple(
        f"p99 {name} rests on 64 samples; a p99 needs at least 100 (1 above it), or it is the largest of a few "
        "samples and under the true p99" for name in ("TTFT", "TPOT")
    )
    assert GateRules().min_tail_samples() == 100
    assert GateRules(tail_samples=2).min_tail_samples() == 200
    assert evaluate(records, example_source(), rules=GateRules(tail_samples=0)).exit_code == EXIT_PASS
    assert evaluate(one_step(BASE, min_requests=100), example_source()).exit_code == EXIT_PASS


def test_connection_failures_dominating_make_the_run_invalid():
    good = one_step(BASE)
    refused = [RequestRecord(start_epoch=T0 + i * 0.01, api="openai-chat", step="concurrency=16", status=None,
                             error="connection refused") for i in range(len(good) + 10)]
    verdict = evaluate(good + refused, example_source())
    assert verdict.exit_code == EXIT_INVALID
    (reason,) = verdict.steps[0].invalid
    assert reason.startswith(f"{len(refused)} of {len(good) + len(refused)} requests got no answer from the target")
    assert "connection refused" in reason


def test_zero_successful_requests_make_the_run_invalid_even_with_http_answers():
    errors = [RequestRecord(start_epoch=T0 + i, api="openai-chat", step="concurrency=1", status=503,
                            error="HTTP 503: overloaded") for i in range(30)]
    verdict = evaluate(errors, example_source())
    assert verdict.exit_code == EXIT_INVALID
    assert verdict.steps[0].invalid == ("none of 30 requests succeeded: HTTP 503: overloaded (30)",)


def test_no_records_at_all_is_invalid():
    verdict = evaluate([], example_source())
    assert verdict.exit_code == EXIT_INVALID
    assert verdict.reasons == ["no measured requests were recorded"]


def test_dispatch_lag_above_the_bound_makes_an_open_loop_step_invalid():
    base = one_step(BASE, label="rate=2")
    late = [RequestRecord(**{**r.to_dict(), "intended_epoch": r.start_epoch - 0.050}) for r in base]
    on_time = [RequestRecord(**{**r.to_dict(), "intended_epoch": r.start_epoch - 0.001}) for r in base]
    verdict = evaluate(late, example_source())
    assert verdict.exit_code == EXIT_INVALID
    assert verdict.steps[0].invalid[0].startswith("p99 dispatch lag 50.0 ms > 10 ms")
    assert evaluate(on_time, example_source()).exit_code == EXIT_PASS
    assert evaluate(late, example_source(), rules=GateRules(max_dispatch_lag_ms=100)).exit_code == EXIT_PASS


def test_a_saturated_load_generator_makes_its_step_invalid():
    records = one_step(BASE)
    start, end = window(records, "concurrency=16")
    ticks = [start + (end - start) * i / 9 for i in range(10)]
    hot = [CpuSample(t, 97.0 if i % 2 else 40.0, worker="w1") for i, t in enumerate(ticks)]
    verdict = evaluate(records, example_source(), client_cpu=hot)
    assert verdict.exit_code == EXIT_INVALID
    assert verdict.steps[0].invalid == ("load generator w1 ran above 90% CPU in 5 of 10 samples: its timestamps "
                                        "were taken late",)
    spike = [CpuSample(t, 99.0 if i == 3 else 30.0, worker="w1") for i, t in enumerate(ticks)]
    assert evaluate(records, example_source(), client_cpu=spike).exit_code == EXIT_PASS  # one sample: no
    outside = [CpuSample(end + 1 + i, 99.0) for i in range(10)]
    assert evaluate(records, example_source(), client_cpu=outside).exit_code == EXIT_PASS  # not in the window
    other = [CpuSample(t, 30.0, worker="w2") for t in ticks]  # a calm worker does not dilute a hot one
    assert evaluate(records, example_source(), client_cpu=hot + other).exit_code == EXIT_INVALID


def test_invalid_beats_fail(seed_records):
    start, end = window(seed_records, "concurrency=64")  # the step that fails its objectives
    hot = [CpuSample(start + (end - start) * i / 4, 99.0) for i in range(5)]
    verdict = evaluate(seed_records, example_source(), client_cpu=hot)
    assert verdict.steps[-1].status == "invalid"
    assert (verdict.status, verdict.exit_code) == ("invalid", EXIT_INVALID)
    assert verdict.reasons == [f"concurrency=64: invalid: {verdict.steps[-1].invalid[0]}"]
    assert verdict.headline.value == 32  # the headline still reads off the stable steps


def test_an_invalid_step_elsewhere_still_beats_a_failing_step(seed_records):
    short = [r for r in seed_records if r.step != "concurrency=1"] + one_step(SEED_STEPS[0], min_requests=5)
    verdict = evaluate(short, example_source())
    assert verdict.steps[0].status == "invalid" and verdict.steps[-1].status == "fail"
    assert verdict.exit_code == EXIT_INVALID


# --- the headline --------------------------------------------------------------------------------------------


def test_headline_is_the_highest_concurrency_with_every_lower_step_stable(seed_records):
    verdict = evaluate(seed_records, example_source())
    assert (verdict.headline.key, verdict.headline.value, verdict.headline.step) == ("concurrency", 32,
                                                                                     "concurrency=32")
    assert verdict.headline.output_throughput == verdict.steps[4].stats.output_throughput
    assert verdict.headline.text.startswith("highest concurrency meeting every SLO: 32 (")


def test_headline_stops_at_the_first_unstable_step():
    steps = (SynthStep(1, 120, 5.0), SynthStep(4, 900, 5.0), SynthStep(8, 180, 14.0))  # 4 fails, 8 passes
    verdict = evaluate(seed_run(steps), example_source())
    assert [s.status for s in verdict.steps] == ["pass", "fail", "pass"]
    assert verdict.headline.value == 1


def test_headline_when_no_step_holds():
    verdict = evaluate(seed_run((SynthStep(1, 900, 5.0), SynthStep(4, 950, 5.0))), example_source())
    assert verdict.headline.value is None
    assert verdict.headline.text.startswith("no concurrency met every SLO: the lowest, 1, was fail (p99 TTFT")


def test_an_unstepped_run_has_no_headline_value():
    verdict = evaluate(one_step(BASE, label=""), example_source())
    assert verdict.exit_code == EXIT_PASS
    assert (verdict.headline.key, verdict.headline.value) == (None, None)
    assert verdict.headline.text == "not a stepped run: every step met its objectives"
    assert verdict.steps[0].stats.label == "all"


def test_warmup_requests_are_left_out_of_the_verdict():
    warm = one_step(SynthStep(16, 5000, 5.0), label="warmup:concurrency=16")  # slow, but warm-up
    verdict = evaluate(warm + one_step(BASE), example_source())
    assert verdict.exit_code == EXIT_PASS
    assert f"{len(warm)} warm-up requests were left out" in verdict.notes


# --- the verdict as data -------------------------------------------------------------------------------------


def test_verdict_is_json_serialisable_and_says_whose_slo(seed_records):
    verdict = evaluate(seed_records, example_source(), client_cpu=[CpuSample(T0, 10.0)])
    data = json.loads(json.dumps(verdict.to_dict(), allow_nan=False))
    assert (data["status"], data["exit_code"]) == ("fail", 1)
    assert data["slo_source"]["host"] == "gpu-01"
    assert data["slo_source"]["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert data["slo_source"]["slo"]["ttft_p99_ms"] == 500
    assert data["headline"]["value"] == 32
    assert [s["stable"] for s in data["steps"]] == [True] * 5 + [False]
    overall = {c["slo"]: c for c in data["overall_checks"]}
    assert overall["ttft_p99_ms"]["step"] == "concurrency=64"  # the worst step per objective
    assert overall["min_output_tokens_per_s"]["passed"] is True
    summary = verdict.summary()
    assert summary.startswith("SLO gate: FAIL (exit 1): slo of host gpu-01 serving Qwen/Qwen2.5-7B-Instruct")


def test_slo_from_the_example_inventory():
    source = slo_from_fleet(REPO / "inventories" / "example")
    assert (source.host, source.model) == ("gpu-01", "Qwen/Qwen2.5-7B-Instruct")
    assert source.origin.endswith("group_vars/all.yml:7")
    assert source.slo.ttft_p99_ms == 500
    assert slo_from_fleet(REPO / "inventories" / "example", host="gw-01").model is None


def test_slo_from_fleet_refuses_to_choose_between_different_objectives(make_inventory):
    root = make_inventory({"host_vars/gpu-02.yml": "slo:\n  ttft_p99_ms: 300\n"})
    with pytest.raises(ConfigError, match="the hosts disagree on slo: gpu-01"):
        slo_from_fleet(root)
    chosen = slo_from_fleet(root, host="gpu-02")
    assert chosen.slo.ttft_p99_ms == 300
    assert "ttft_p99_ms at " in chosen.origin and chosen.origin.endswith("host_vars/gpu-02.yml:2)")
    with pytest.raises(ConfigError, match="no host serves 'other/model'"):
        slo_from_fleet(root, model="other/model")
    with pytest.raises(ConfigError, match="no host 'gpu-09'"):
        slo_from_fleet(root, host="gpu-09")
    assert slo_from_fleet(root, host="gpu-01", model="Qwen/Qwen2.5-7B-Instruct").slo.ttft_p99_ms == 500
