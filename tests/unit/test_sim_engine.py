"""Profiles and the real-time engine: timing, ordering, reproducibility, faults."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest

from gpufleet.errors import ConfigError
from gpufleet.sim.engine import AsyncEngine, EngineCore
from gpufleet.sim.profile import Profile, Table, list_profiles, load_profile
from gpufleet.sim.textgen import EOS_TOKEN_ID, TextGen
from gpufleet.sim.types import GenerationParams, RequestTiming, SimConfig, StepRecord, TokenEvent

SEED_PROFILE = "rtx4090d-tp4-qwen2.5-7b"


def fast_profile(**changes: object) -> Profile:
    """Steps of a few ms, so real-time tests are quick and timing is measurable."""
    values: dict[str, object] = dict(
        name="fast",
        description="test",
        step_overhead_s=0.001,
        decode_s=Table.of({1: 0.003, 16: 0.005}),
        kv_read_s_per_token=1e-8,
        prefill_s_per_token=1e-5,
        mixed_step_s=Table.of({0: 0.0}, "flat"),
        request_overhead_s=0.002,
        frontend_token_s=0.0001,
        eos_probability=0.0,
        startup_s=0.0,
    )
    values.update(changes)
    return Profile(**values)  # type: ignore[arg-type]


def sim_config(**changes: int) -> SimConfig:
    values = dict(max_model_len=2048, max_num_seqs=16, max_num_batched_tokens=512, block_size=16, num_gpu_blocks=1024)
    values.update(changes)
    return SimConfig(model="m", served_model_name="m", gpu_memory_utilization=0.9, tensor_parallel_size=1, **values)


class Sink:
    """A stream consumer's sink: records (text, scheduled, received); asks to detach after `detach_after`."""

    def __init__(self, detach_after: int | None = None) -> None:
        self.tokens: list[tuple[str, float, float]] = []
        self.reasons: list[str | None] = []
        self.detach_after = detach_after

    def __call__(self, text: str, at: float, reason: str | None) -> bool:
        self.tokens.append((text, at, time.monotonic()))
        self.reasons.append(reason)
        return len(self.tokens) == self.detach_after


class Recorder:
    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self.finished: list[tuple[str, RequestTiming]] = []

    def request_finished(self, request_id: str, timing: RequestTiming) -> None:
        self.finished.append((request_id, timing))

    def step_finished(self, step: StepRecord) -> None:
        self.steps.append(step)


async def collect(handle, clock=time.monotonic) -> list[tuple[TokenEvent, float]]:
    return [(event, clock()) async for event in handle]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


# profiles --------------------------------------------------------------------------------------


def test_packaged_profiles_load_and_round_trip(tmp_path: Path):
    names = list_profiles()
    assert {SEED_PROFILE, "rtx4090d-tp2-qwen2.5-7b-awq", "rtx4090d-tp1-qwen2.5-7b-awq", "bench"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.header.strip(), f"{name} lacks its header comment"
        config = profile.sim_config()
        assert config.max_num_seqs >= 1 and config.num_gpu_blocks * config.block_size >= config.max_model_len
        copy = tmp_path / f"{name}.yml"
        copy.write_text(profile.to_yaml())
        again = load_profile(copy)
        assert again.header == profile.header
        for c in (1, 7, 64, 300):
            assert again.step_time(c, 100, 5000) == pytest.approx(profile.step_time(c, 100, 5000), rel=1e-5)


def test_seed_profile_uses_the_planners_kv_cache():
    config = load_profile(SEED_PROFILE).sim_config()
    assert (config.num_gpu_blocks, config.max_num_seqs, config.max_num_batched_tokens, config.block_size) == (
        82062, 256, 4096, 16)


def test_step_time_is_physically_sensible():
    p = load_profile(SEED_PROFILE)
    assert p.step_time(0, 0, 0) == 0.0
    decode = [p.step_time(b, 0, b * 700) for b in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert decode == sorted(decode)  # more sequences, longer step
    assert p.step_time(8, 0, 100_000) > p.step_time(8, 0, 1_000)  # more KV to read, longer step
    assert p.step_time(0, 1024, 1024) > p.step_time(0, 512, 512) > p.step_time(1, 0, 512)
    assert p.step_time(8, 512, 6000) > p.step_time(8, 0, 6000)
    # the step overhead is paid once per step
    assert p.step_time(1, 0, 0) == pytest.approx(p.step_overhead_s + p.decode_s.at(1))


def test_table_interpolates_and_extends():
    t = Table.of({1: 1.0, 3: 3.0, 5: 4.0})
    assert (t.at(0), t.at(1), t.at(2), t.at(4), t.at(7)) == (1.0, 1.0, 2.0, 3.5, 5.0)
    assert Table.of({1: 2.0}).at(50) == 2.0
    assert Table.of({1: 1.0, 3: 3.0}, "flat").at(10) == 3.0


def test_profile_errors_name_the_file_key_and_fix(tmp_path: Path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "name: bad\n"
        "description: broken on purpose\n"
        "step_overhead_s: -1\n"
        "decode_s: {1: 0.01, x: 2}\n"
        "kv_read_s_per_token: 1.0e-8\n"
        "prefill_s_per_token: fast\n"
        "mixed_step_s: {0: 0.0}\n"
        "request_overhead_s: 0.01\n"
        "frontend_tokn_s: 0.0001\n"
        "eos_probability: 1.5\n"
        "startup_s: 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_profile(bad)
    problems = {p.key: p for p in info.value.problems}
    assert set(problems) >= {"step_overhead_s", "decode_s.x", "prefill_s_per_token", "frontend_tokn_s",
                             "frontend_token_s", "eos_probability"}
    assert problems["step_overhead_s"].line == 3 and problems["step_overhead_s"].file.endswith("bad.yml")
    assert "frontend_token_s" in problems["frontend_tokn_s"].fix  # did you mean
    assert all(p.fix for p in info.value.problems)


def test_unknown_profile_name_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"rtx4090d-tp4-qwen2\.5-7b"):
        load_profile("rtx4090d-tp4-qwen2.5-7")


def test_scientific_notation_without_a_dot_is_read_as_a_number(tmp_path: Path):
    text = load_profile("bench").to_yaml().replace("kv_read_s_per_token: 2.2e-08", "kv_read_s_per_token: 2e-8")
    path = tmp_path / "p.yml"
    path.write_text(text)
    assert load_profile(path).kv_read_s_per_token == 2e-8


# texts -----------------------------------------------------------------------------------------


def test_texts_are_reproducible_plain_words():
    def text(seed: int, request_id: str) -> str:
        gen = TextGen(seed, request_id)
        gen.output_length(GenerationParams(8, 100), 0.01)
        return "".join(gen.next_token()[1] for _ in range(60))

    assert text(0, "a") == text(0, "a")
    assert text(0, "a") != text(0, "b") and text(0, "a") != text(1, "a")
    sample = text(3, "x")
    assert sample.startswith(" ") and "▁" not in sample
    words = sample.replace(",", " ").replace(".", " ").split()
    assert len(words) > 40 and all(w.isalpha() for w in words)


# the core in simulated time ------------------------------------------------------------------------


def test_core_admits_requests_after_the_request_overhead():
    core = EngineCore(sim_config(), fast_profile(request_overhead_s=0.05))
    core.submit("a", GenerationParams(16, 4), now=1.0)
    assert core.begin_step(1.01) is None and core.next_ready() == pytest.approx(1.05)
    plan = core.begin_step(1.05)
    assert plan is not None and plan.batch.prefill_tokens == 16
    assert core.stats().num_running == 1


# the real-time engine ----------------------------------------------------------------------------


def test_tokens_arrive_in_order_on_schedule():
    async def main():
        recorder = Recorder()
        engine = AsyncEngine(sim_config(), fast_profile(), listener=recorder)
        await engine.start()
        handles = [engine.submit(f"r{i}", GenerationParams(64 + i, 40, ignore_eos=True)) for i in range(6)]
        results = await asyncio.gather(*(collect(h) for h in handles))
        stats = engine.stats()
        await engine.stop()
        return recorder, handles, results, stats

    recorder, handles, results, stats = run(main())
    lateness = []
    for handle, events in zip(handles, results, strict=True):
        assert [e.index for e, _ in events] == list(range(40))
        times = [e.scheduled_at for e, _ in events]
        assert times == sorted(times)
        assert [e.finish_reason for e, _ in events[:-1]] == [None] * 39 and events[-1][0].finish_reason == "length"
        assert handle.timing.token_times == times and handle.timing.generation_tokens == 40
        for event, received in events:
            assert received >= event.scheduled_at - 0.001  # never early
            lateness.append(received - event.scheduled_at)
    # a few ms on an idle machine; the bounds leave room for a busy CI host
    assert statistics.median(lateness) < 0.005
    assert max(lateness) < 0.1
    assert {rid for rid, _ in recorder.finished} == {f"r{i}" for i in range(6)}
    assert stats.kv_blocks_used == 0 and stats.generation_tokens_total == 240 and stats.num_running == 0
    # no drift: each busy step starts exactly where the previous one was scheduled to end
    steps = recorder.steps
    chained = sum(1 for a, b in pairwise(steps) if b.started == a.started + a.duration)
    assert chained >= 0.8 * (len(steps) - 1)
    profile = fast_profile()
    for s in steps:
        assert s.duration >= profile.step_overhead_s
        assert s.batch_size <= 16 and s.prefill_tokens + s.decode_tokens <= 512


def test_step_tokens_are_spread_by_the_frontend_cost():
    async def main():
        engine = AsyncEngine(sim_config(), fast_profile(frontend_token_s=0.001))
        await engine.start()
        handles = [engine.submit(f"r{i}", GenerationParams(16, 3, ignore_eos=True)) for i in range(4)]
        results = await asyncio.gather(*(collect(h) for h in handles))
        await engine.stop()
        return results

    results = run(main())
    firsts = sorted(events[0][0].scheduled_at for events in results)
    assert [round(b - a, 6) for a, b in pairwise(firsts)] == [0.001] * 3


async def stream_through_sink(max_tokens: int, sink: Sink, abort_after_sink_tokens: int | None = None):
    """Submit one request, attach `sink` after its first event; (events, timing) once the stream ends."""
    engine = AsyncEngine(sim_config(), fast_profile())
    await engine.start()
    handle = engine.submit("r", GenerationParams(32, max_tokens, ignore_eos=True))
    events = []
    async for event in handle:
        events.append(event)
        if len(events) == 1:
            handle.attach(sink)
            if abort_after_sink_tokens is not None:
                while len(sink.tokens) < abort_after_sink_tokens:
                    await asyncio.sleep(0.001)
                handle.abort()
    await engine.stop()
    return events, handle.timing


def test_an_attached_sink_gets_every_token_on_schedule_and_the_end_as_an_event():
    """The streaming fast path: the frontend writes through the sink; the consumer wakes only at the end."""
    sink = Sink()
    events, timing = run(stream_through_sink(30, sink))
    via_sink = sink.tokens
    assert len(events) == 2 and events[-1].finish_reason == "length" and events[-1].index == 29
    assert len(via_sink) == 29 and sink.reasons == [None] * 28 + ["length"]
    assert [at for _, at, _ in via_sink] == timing.token_times[1:30]
    assert all(written >= at - 0.001 for _, at, written in via_sink)  # never early
    texts = [events[0].text] + [text for text, _, _ in via_sink]
    reference = TextGen(0, "r")
    assert texts == [reference.next_token()[1] for _ in range(30)]


def test_a_sink_that_asks_to_be_detached_gets_events_again():
    sink = Sink(detach_after=3)
    events, _ = run(stream_through_sink(12, sink))
    assert len(sink.tokens) == 3  # detached after the third (the client fell behind)
    assert [e.index for e in events] == [0, *range(4, 12)]


def test_an_abort_after_sink_tokens_carries_the_next_index():
    sink = Sink()
    events, _ = run(stream_through_sink(1000, sink, abort_after_sink_tokens=5))
    assert events[-1].finish_reason == "abort" and events[-1].index == 1 + len(sink.tokens)


def test_submitting_releases_tokens_already_due():
    """A burst of arrivals must not hold up running streams: submit() catches the frontend up."""

    async def main():
        engine = AsyncEngine(sim_config(), fast_profile())
        await engine.start()
        handle = engine.submit("r", GenerationParams(32, 1000, ignore_eos=True))
        sink = Sink()
        async for _ in handle:
            handle.attach(sink)
            break
        while len(sink.tokens) < 3:
            await asyncio.sleep(0.001)
        time.sleep(0.05)  # the loop is held: tokens fall due but the frontend cannot run
        before = len(sink.tokens)
        engine.submit("other", GenerationParams(16, 2, ignore_eos=True))
        after = len(sink.tokens)
        await engine.stop()
        return before, after

    before, after = run(main())
    assert after > before


def test_same_seed_same_texts_and_lengths():
    async def generate(seed: int) -> list[tuple[str, int, str]]:
        engine = AsyncEngine(replace(sim_config(), seed=seed), fast_profile(eos_probability=0.05))
        await engine.start()
        handles = [engine.submit(f"req-{i}", GenerationParams(32, 60)) for i in range(5)]
        results = await asyncio.gather(*(collect(h) for h in handles))
        await engine.stop()
        return [("".join(e.text for e, _ in events), len(events), events[-1][0].finish_reason) for events in results]

    first, second, other = run(generate(7)), run(generate(7)), run(generate(8))
    assert first == second
    assert first != other
    assert any(reason == "stop" for _, _, reason in first + other)


def test_a_stop_ends_with_the_eos_token():
    async def main():
        engine = AsyncEngine(sim_config(), fast_profile(eos_probability=0.3))
        await engine.start()
        handles = [engine.submit(f"r{i}", GenerationParams(16, 200, min_tokens=3)) for i in range(8)]
        results = await asyncio.gather(*(collect(h) for h in handles))
        await engine.stop()
        return results

    for events in run(main()):
        last = events[-1][0]
        assert last.finish_reason == "stop" and last.token_id == EOS_TOKEN_ID and last.text == ""
        assert len(events) >= 4  # min_tokens honoured


def test_pause_holds_the_engine_and_resume_releases_it():
    async def main():
        engine = AsyncEngine(sim_config(), fast_profile())
        await engine.start()
        engine.pause()
        handle = engine.submit("r", GenerationParams(16, 5, ignore_eos=True))
        await asyncio.sleep(0.15)
        during = handle.timing.generation_tokens
        paused_stats = engine.stats()
        resumed_at = time.monotonic()
        engine.resume()
        events = await collect(handle)
        await engine.stop()
        return during, paused_stats, resumed_at, events

    during, paused_stats, resumed_at, events = run(main())
    assert during == 0 and paused_stats.num_waiting == 1
    assert len(events) == 5 and events[0][0].scheduled_at >= resumed_at


def test_abort_ends_the_stream_and_frees_the_cache():
    async def main():
        recorder = Recorder()
        engine = AsyncEngine(sim_config(), fast_profile(), listener=recorder)
        await engine.start()
        handle = engine.submit("r", GenerationParams(64, 1000, ignore_eos=True))
        events = []
        async for event in handle:
            events.append(event)
            if len(events) == 5:
                handle.abort()
        await asyncio.sleep(0.02)
        stats = engine.stats()
        # the id can be reused once the request is gone
        again = engine.submit("r", GenerationParams(16, 2, ignore_eos=True))
        assert len(await collect(again)) == 2
        await engine.stop()
        return events, stats, recorder, handle

    events, stats, recorder, handle = run(main())
    assert events[-1].finish_reason == "abort" and events[-1].token_id == -1
    assert [e.index for e in events[:5]] == list(range(5))
    assert stats.kv_blocks_used == 0 and stats.num_running == 0
    assert handle.timing.finish_reason == "abort"
    assert recorder.finished[0] == ("r", handle.timing)


def test_extra_step_delay_lengthens_every_step():
    async def main():
        recorder = Recorder()
        engine = AsyncEngine(sim_config(), fast_profile(), listener=recorder)
        engine.extra_step_delay_s = 0.02
        await engine.start()
        handle = engine.submit("r", GenerationParams(16, 5, ignore_eos=True))
        started = time.monotonic()
        await collect(handle)
        elapsed = time.monotonic() - started
        await engine.stop()
        return recorder.steps, elapsed

    steps, elapsed = run(main())
    assert all(s.duration >= 0.02 for s in steps)
    assert elapsed >= 5 * 0.02


def test_stop_aborts_what_is_still_running_and_duplicates_are_refused():
    async def main():
        engine = AsyncEngine(sim_config(), fast_profile())
        await engine.start()
        handle = engine.submit("r", GenerationParams(16, 1000, ignore_eos=True))
        with pytest.raises(ValueError, match="already"):
            engine.submit("r", GenerationParams(16, 10))
        with pytest.raises(ValueError, match="max_model_len"):
            engine.submit("big", GenerationParams(2000, 100))
        await asyncio.sleep(0.02)
        await engine.stop()
        return await collect(handle)

    events = run(main())
    assert events[-1][0].finish_reason == "abort"
    assert events[-1][0].index == len(events) - 1


def test_idle_engine_does_not_spin():
    async def main():
        engine = AsyncEngine(sim_config(), fast_profile())
        await engine.start()
        cpu = time.process_time()
        await asyncio.sleep(0.2)
        used = time.process_time() - cpu
        await engine.stop()
        return used, engine.stats().steps_total

    used, steps = run(main())
    assert steps == 0 and used < 0.05
