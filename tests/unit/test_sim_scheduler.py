"""The continuous-batching scheduler: vLLM V1's rules, checked step by step on small caches."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufleet.sim.scheduler import Batch, Scheduler
from gpufleet.sim.textgen import TextGen
from gpufleet.sim.types import GenerationParams, SimConfig


def config(**changes: int) -> SimConfig:
    values = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_gpu_blocks=256)
    values.update(changes)
    return SimConfig(model="m", served_model_name="m", gpu_memory_utilization=0.9, tensor_parallel_size=1, **values)


def step(s: Scheduler, t: float) -> tuple[Batch, list]:
    batch = s.schedule(t)
    emissions = s.complete(batch, t + 1.0)
    s.check_invariants()
    return batch, emissions


def run_all(s: Scheduler, limit: int = 10_000) -> list[Batch]:
    batches = []
    t = 0.0
    while s.has_work():
        batch, _ = step(s, t)
        batches.append(batch)
        t += 1.0
        assert len(batches) < limit, "scheduler made no progress"
    return batches


def params(prompt: int, out: int, **kw: object) -> GenerationParams:
    return GenerationParams(prompt_tokens=prompt, max_tokens=out, **kw)  # type: ignore[arg-type]


def test_decodes_first_then_chunked_prefill_within_the_budget():
    s = Scheduler(config(max_num_batched_tokens=64))
    a = s.submit("a", params(10, 50))
    step(s, 0.0)  # a prefilled: first token out at the end of its prefill step
    assert a.num_output == 1 and a.timing.first_token == 1.0
    s.submit("long", params(150, 5))
    batches = [step(s, t)[0] for t in (1.0, 2.0, 3.0)]
    for batch in batches:
        assert batch.items[0] == (a, 1)  # the decode goes first, every step
        assert batch.num_tokens <= 64
    assert [b.prefill_tokens for b in batches] == [63, 63, 24]  # 150 in chunks of what the budget leaves
    long = s.requests["long"]
    assert long.num_output == 1 and long.timing.first_token == 4.0  # first token at the end of the last chunk


def test_slots_are_capped_and_requests_are_served_first_come_first_served():
    s = Scheduler(config(max_num_seqs=3))
    for i in range(8):
        s.submit(f"r{i}", params(8, 6), arrival=float(i))
    t = 0.0
    while s.has_work():
        assert len(s.running) <= 3
        step(s, t)
        t += 1.0
    assert s.free_blocks == s.total_blocks


def test_admission_order_follows_arrival_order():
    s = Scheduler(config(max_num_seqs=3))
    reqs = [s.submit(f"r{i}", params(8, 6 + i % 3), arrival=float(i)) for i in range(9)]
    run_all(s)
    starts = [r.timing.first_scheduled for r in reqs]
    assert starts == sorted(starts)
    assert max(starts) > 0  # not all at once: three slots
    assert all(r.timing.finish_reason == "length" and r.num_output == r.params.max_tokens for r in reqs)


def test_a_waiting_request_needs_free_blocks_for_its_whole_prompt():
    # 10 blocks of 4 tokens: a holds 3 blocks once prefilled, b (29-token prompt = 8 blocks) does not fit
    # next to it until a finishes
    s = Scheduler(config(num_gpu_blocks=10, max_model_len=40))
    a = s.submit("a", params(10, 4))
    b = s.submit("b", params(29, 2))
    step(s, 0.0)
    step(s, 1.0)
    assert b.timing.first_scheduled is None and b in s.waiting
    run_all(s)
    assert b.timing.first_scheduled is not None and b.timing.first_scheduled >= a.timing.last_token - 1.0


def test_preemption_recomputes_the_latest_admitted_request_which_still_finishes():
    # 12 blocks of 4 = 48 tokens; two requests of 8 + 20 tokens each need 14 blocks at the end
    s = Scheduler(config(num_gpu_blocks=12, max_model_len=48, max_num_batched_tokens=32))
    first = s.submit("first", params(8, 20))
    second = s.submit("second", params(8, 20))
    t = 0.0
    preempted_at = None
    while s.has_work():
        batch, _ = step(s, t)
        if batch.preempted and preempted_at is None:
            preempted_at = t
            assert batch.preempted == [second]  # the most recently admitted goes
            assert s.waiting[0] is second and second.blocks == 0 and second.num_computed == 0
            generated = second.num_output
            assert generated > 0
        t += 1.0
    assert preempted_at is not None
    assert second.timing.preemptions >= 1 and first.timing.preemptions == 0
    assert s.preemptions_total == first.timing.preemptions + second.timing.preemptions
    assert first.num_output == 20 and second.num_output == 20
    assert second.timing.finish_reason == "length"
    # the recomputation counts as prompt work again: prompt + the tokens it had generated
    assert s.prompt_tokens_total >= 8 + 8 + 8 + generated
    assert s.free_blocks == 12
    times = second.timing.token_times
    assert times == sorted(times) and len(times) == 20


def test_preempted_request_goes_to_the_front_of_the_queue():
    s = Scheduler(config(num_gpu_blocks=12, max_model_len=48, max_num_batched_tokens=32, max_num_seqs=2))
    s.submit("first", params(8, 20))
    second = s.submit("second", params(8, 20))
    third = s.submit("third", params(8, 4))
    t = 0.0
    while not second.timing.preemptions:
        step(s, t)
        t += 1.0
    assert list(s.waiting) == [second, third]


def test_abort_frees_blocks_wherever_the_request_is():
    s = Scheduler(config(max_num_seqs=1))
    running = s.submit("running", params(30, 10))
    waiting = s.submit("waiting", params(30, 10))
    step(s, 0.0)
    assert running.blocks > 0 and s.free_blocks < s.total_blocks
    assert s.abort("running") is running and running.timing.finish_reason == "abort"
    assert s.free_blocks == s.total_blocks and not s.running
    assert s.abort("waiting") is waiting and not s.waiting
    assert s.abort("unknown") is None
    s.check_invariants()
    assert not s.has_work()


def test_abort_during_a_step_drops_its_tokens():
    s = Scheduler(config())
    s.submit("a", params(8, 10))
    batch = s.schedule(0.0)
    s.abort("a")
    assert s.complete(batch, 1.0) == []
    assert s.free_blocks == s.total_blocks


def test_finish_reasons_stop_and_length():
    s = Scheduler(config())
    stopped = s.submit("stopped", params(8, 50), stop_at=7, final_reason="stop")
    capped = s.submit("capped", params(8, 5))
    run_all(s)
    assert (stopped.num_output, stopped.timing.finish_reason) == (7, "stop")
    assert (capped.num_output, capped.timing.finish_reason) == (5, "length")
    assert stopped.timing.generation_tokens == 7 and len(stopped.timing.token_times) == 7


def test_eos_draw_honours_min_tokens_and_ignore_eos():
    lengths = []
    for i in range(300):
        length, reason = TextGen(0, f"r{i}").output_length(params(8, 40, min_tokens=5), eos_probability=0.3)
        assert length >= 6 if reason == "stop" else length == 40
        lengths.append(length)
    assert min(lengths) == 6  # the EOS can come right after min_tokens
    assert all(
        TextGen(0, f"r{i}").output_length(params(8, 40, ignore_eos=True), 0.9) == (40, "length") for i in range(50)
    )
    # EOS as the max_tokens-th token reports length, as vLLM does
    assert TextGen(1, "x").output_length(params(8, 1), 0.99) == (1, "length")


def test_requests_beyond_max_model_len_are_refused():
    s = Scheduler(config(max_model_len=64))
    with pytest.raises(ValueError, match="max_model_len"):
        s.submit("big", params(60, 10))
    with pytest.raises(ValueError, match="holds fewer tokens"):
        Scheduler(config(num_gpu_blocks=4, max_model_len=64))


def test_duplicate_ids_are_refused():
    s = Scheduler(config())
    s.submit("a", params(8, 4))
    with pytest.raises(ValueError, match="already"):
        s.submit("a", params(8, 4))


def test_frontend_spaces_a_steps_tokens_and_never_reorders():
    s = Scheduler(config(max_num_seqs=4))
    for i in range(4):
        s.submit(f"r{i}", params(8, 3))
    batch = s.schedule(0.0)
    emissions = s.complete(batch, 1.0, frontend_token_s=0.01)
    assert [round(at, 6) for _, _, at, _ in emissions] == [1.0, 1.01, 1.02, 1.03]
    # a frontend still busy when the next step ends starts where it left off
    batch = s.schedule(1.0)
    emissions = s.complete(batch, 1.02, frontend_token_s=0.01)
    assert [round(at, 6) for _, _, at, _ in emissions] == [1.04, 1.05, 1.06, 1.07]


def test_a_large_step_ticks_the_frontend_every_few_requests():
    """Planning or applying a step of hundreds of requests lets the real-time engine release due tokens."""
    s = Scheduler(config(max_num_seqs=256, max_num_batched_tokens=4096, num_gpu_blocks=4096))
    for i in range(256):
        s.submit(f"r{i}", params(8, 10))
    step(s, 0.0)  # all prefilled
    ticks: list[int] = []
    s.tick = lambda: ticks.append(len(ticks))
    batch = s.schedule(1.0)
    planned = len(ticks)
    s.complete(batch, 2.0)
    assert batch.num_decode == 256
    assert planned >= 256 // Scheduler.TICK_EVERY
    assert len(ticks) - planned >= 256 // Scheduler.TICK_EVERY


def test_stats_count_prompt_and_generation_tokens():
    s = Scheduler(config())
    s.submit("a", params(10, 3))
    s.submit("b", params(20, 2))
    run_all(s)
    stats = s.stats()
    assert stats.prompt_tokens_total == 30 and stats.generation_tokens_total == 5
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
    assert stats.steps_total >= 3


@settings(max_examples=60, deadline=None)
@given(
    seqs=st.integers(1, 6),
    budget=st.integers(8, 96),
    block_size=st.sampled_from([1, 4, 16]),
    spare=st.integers(0, 40),
    seed=st.integers(0, 10_000),
)
def test_invariants_hold_under_random_load(seqs: int, budget: int, block_size: int, spare: int, seed: int):
    budget = max(budget, seqs)
    max_model_len = 64
    blocks = -(-max_model_len // block_size) + spare
    s = Scheduler(config(max_num_seqs=seqs, max_num_batched_tokens=budget, block_size=block_size,
                         num_gpu_blocks=blocks, max_model_len=max_model_len))
    rng = random.Random(seed)
    expected = {}
    aborted = set()
    t = 0.0
    n = 0
    for _ in range(400):
        if n < 25 and rng.random() < 0.3:
            prompt = rng.randint(1, 48)
            out = rng.randint(1, max_model_len - prompt)
            stop = rng.randint(1, out)
            reason = "stop" if stop < out else "length"
            expected[f"r{n}"] = s.submit(f"r{n}", params(prompt, out), arrival=t, stop_at=stop, final_reason=reason)
            n += 1
        if s.requests and rng.random() < 0.03:
            victim = rng.choice(sorted(s.requests))
            s.abort(victim)
            aborted.add(victim)
        if s.has_work():
            batch, _ = step(s, t)
            assert len(s.running) <= seqs
            assert batch.num_tokens <= budget
            assert len({id(r) for r, _ in batch.items}) == len(batch.items)
        t += 1.0
    run_all(s)
    assert s.free_blocks == s.total_blocks
    for request_id, req in expected.items():
        if request_id in aborted:
            assert req.timing.finish_reason == "abort"
        else:
            assert req.num_output == req.stop_at == len(req.timing.token_times)
            assert req.timing.finish_reason == req.final_reason
