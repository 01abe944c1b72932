"""Load shapes: step plans and labels, the step ramp's ticks, open-loop schedules and their statistics,
the dispatcher (intended times, max-in-flight cap, lag), and the SLO sweep search."""

from __future__ import annotations

import tests.unit.locust_unpatched  # noqa: F401  (before anything imports Locust)

# isort: split

import math
import statistics
import time
from types import SimpleNamespace
from typing import Any, ClassVar

import gevent
import pytest
from locust import FastHttpUser, User, task
from locust.env import Environment
from locust.util.load_locustfile import is_shape_class

from gpufleet.loadtest.prompts import Prompt, prompt_source
from gpufleet.loadtest.schedule import (
    Arrival,
    OpenLoopPlan,
    arrival_offsets,
    concurrency_plan,
    is_measured,
    measured_label,
    shard,
)
from gpufleet.loadtest.shapes import (
    DONE_MESSAGE,
    SEED_CONCURRENCY,
    OpenLoopDispatcher,
    OpenLoopShape,
    StepRampShape,
    current_step,
    dispatch,
    install,
    step_source,
)
from gpufleet.loadtest.sweep import sweep_concurrency, sweep_rate


def cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


def gaps(offsets: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *offsets[:-1]], offsets, strict=True)]


# ---- the step plan ----------------------------------------------------------------------------


def test_seed_plan_steps_and_labels() -> None:
    plan = concurrency_plan(warmup_s=30, measure_s=120)
    assert [step.users for step in plan.steps] == list(SEED_CONCURRENCY) == [1, 4, 8, 16, 32, 64]
    assert plan.total_s == 6 * 150
    assert plan.step_at(0) == "warmup:concurrency=1"
    assert plan.step_at(29.999) == "warmup:concurrency=1"
    assert plan.step_at(30) == "concurrency=1"
    assert plan.step_at(149.999) == "concurrency=1"
    assert plan.step_at(150) == "warmup:concurrency=4"
    assert plan.step_at(180) == "concurrency=4"
    assert plan.step_at(5 * 150 + 30) == "concurrency=64"
    assert plan.step_at(900) == "" and plan.step_at(-0.1) == ""
    phase = plan.phase_at(200)
    assert phase is not None and (phase.index, phase.warmup, phase.start_s, phase.end_s) == (1, False, 180, 300)


def test_labels_separate_warmup_from_measurement() -> None:
    assert is_measured("concurrency=8") and is_measured("rate=2")
    assert not is_measured("warmup:concurrency=8") and not is_measured("")
    assert measured_label("warmup:concurrency=8") == measured_label("concurrency=8") == "concurrency=8"


def test_plan_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="concurrency levels must be >= 1"):
        concurrency_plan((1, 0))
    with pytest.raises(ValueError, match="measured time > 0"):
        concurrency_plan((1,), warmup_s=1, measure_s=0)
    with pytest.raises(ValueError, match="at least one"):
        concurrency_plan(())


# ---- the step ramp shape ----------------------------------------------------------------------


class TinyRamp(StepRampShape):
    concurrencies = (1, 2)
    warmup_s = 2.0
    measure_s = 3.0


def at(shape: Any, t: float) -> Any:
    """Move a shape's clock so that `t` seconds have run."""
    shape.start_time = time.perf_counter() - t
    shape.start_epoch = time.time() - t
    return shape


def test_the_base_shapes_are_abstract_and_subclasses_are_found() -> None:
    # a locustfile that imports the bases gets no shape from them, only from its own subclass
    assert not is_shape_class(StepRampShape) and not is_shape_class(OpenLoopShape)
    assert is_shape_class(TinyRamp)


def test_step_ramp_ticks_each_step_at_once_then_ends() -> None:
    shape = TinyRamp()
    assert at(shape, 0.0).tick() == (1, 1.0)
    assert at(shape, 4.9).tick() == (1, 1.0)
    users, spawn_rate = at(shape, 5.0).tick()
    assert users == 2 and spawn_rate >= 2  # the whole step spawns within a second
    assert at(shape, 9.9).tick() == (2, 2.0)
    assert at(shape, 10.0).tick() == (0, 2.0)  # the users stop, each finishing its request
    assert at(shape, 10.0 + TinyRamp.drain_s).tick() is None  # ends by itself


def test_step_ramp_labels_requests_by_send_time() -> None:
    shape = TinyRamp()
    env = SimpleNamespace(shape_class=shape)
    now = time.time()
    shape.start_epoch = now - 1.0
    assert current_step(env) == "warmup:concurrency=1"
    assert current_step(env, now + 1.0) == "concurrency=1"
    assert current_step(env, now + 4.0) == "warmup:concurrency=2"
    assert current_step(env, now + 6.5) == "concurrency=2"
    assert current_step(env, now + 9.0) == ""
    assert current_step(SimpleNamespace(shape_class=None)) == ""
    assert step_source(env)() == "warmup:concurrency=1"  # for users that take a step callable


def test_step_ramp_user_classes_and_plan_override() -> None:
    class Someone(User):
        @task
        def nothing(self) -> None:
            pass

    class Only(TinyRamp):
        user_classes: ClassVar[list[type[User]]] = [Someone]

    assert at(Only(), 0).tick() == (1, 1.0, [Someone])
    shape = TinyRamp()
    shape.set_plan(concurrency_plan((3,), warmup_s=0, measure_s=1))
    assert at(shape, 0.5).tick() == (3, 3.0)
    assert at(shape, 1.0).tick() == (0, 3.0)  # the new plan's end


def test_a_worker_follows_the_masters_clock() -> None:
    from gpufleet.loadtest.shapes import _on_clock

    shape = TinyRamp()
    master_start = time.time() - 8.0
    _on_clock(SimpleNamespace(shape_class=shape), SimpleNamespace(data={"start_epoch": master_start, "workers": 3}))
    assert shape.workers == 3
    assert current_step(SimpleNamespace(shape_class=shape)) == "concurrency=2"


# ---- open-loop schedules ----------------------------------------------------------------------


def test_constant_rate_has_equal_gaps() -> None:
    offsets = arrival_offsets(100, rate=4.0, burstiness=math.inf)
    assert offsets[0] == pytest.approx(0.25) and offsets[-1] == pytest.approx(25.0)
    assert cv(gaps(offsets)) == pytest.approx(0.0, abs=1e-9)


def test_poisson_gaps_average_one_over_rate_with_cv_one() -> None:
    offsets = arrival_offsets(20000, rate=5.0, burstiness=1.0, seed=11)
    assert statistics.fmean(gaps(offsets)) == pytest.approx(1 / 5.0, rel=1e-9)  # rescaled: exact
    assert cv(gaps(offsets)) == pytest.approx(1.0, abs=0.03)
    assert offsets == sorted(offsets)


def test_gamma_burstiness_sets_the_cv() -> None:
    regular = arrival_offsets(20000, rate=2.0, burstiness=4.0, seed=3)
    bursty = arrival_offsets(20000, rate=2.0, burstiness=0.25, seed=3)
    assert cv(gaps(regular)) == pytest.approx(1 / math.sqrt(4.0), abs=0.03)
    assert cv(gaps(bursty)) == pytest.approx(1 / math.sqrt(0.25), abs=0.15)
    assert statistics.fmean(gaps(bursty)) == pytest.approx(0.5)


def test_rescale_pins_the_total_to_n_over_rate() -> None:
    raw = arrival_offsets(500, rate=10.0, seed=1, rescale=False)
    scaled = arrival_offsets(500, rate=10.0, seed=1)
    assert scaled[-1] == pytest.approx(50.0, rel=1e-12)
    assert raw[-1] != pytest.approx(50.0, rel=1e-4)  # the drift vLLM's rescale removes
    factor = scaled[-1] / raw[-1]
    assert all(s == pytest.approx(r * factor) for s, r in zip(scaled, raw, strict=True))


def test_schedules_are_seeded() -> None:
    assert arrival_offsets(50, 3.0, seed=1) == arrival_offsets(50, 3.0, seed=1)
    assert arrival_offsets(50, 3.0, seed=1) != arrival_offsets(50, 3.0, seed=2)
    assert arrival_offsets(0, 3.0) == []


@pytest.mark.parametrize(("args", "message"), [((5, 0.0), "rate"), ((5, math.inf), "rate"), ((-1, 1.0), "count"),
                                               ((5, 1.0, 0.0), "burstiness")])
def test_bad_schedules_are_refused(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        arrival_offsets(*args)


def test_open_loop_plan_steps_and_warmup_labels() -> None:
    plan = OpenLoopPlan(rates=(2.0, 5.0), warmup_s=10, measure_s=30, burstiness=1.0, seed=4)
    arrivals = plan.arrivals
    first = [a for a in arrivals if a.step.endswith("rate=2")]
    second = [a for a in arrivals if a.step.endswith("rate=5")]
    assert len(first) == 80 and len(second) == 200  # rate x (warm-up + measured)
    assert [a.offset_s for a in arrivals] == sorted(a.offset_s for a in arrivals)
    assert all(0 < a.offset_s <= 40 for a in first) and all(40 < a.offset_s <= 80 for a in second)
    for arrival in arrivals:
        assert arrival.step == plan.step_at(arrival.offset_s) or math.isclose(arrival.offset_s % 40, 0, abs_tol=1e-6)
        in_step = arrival.offset_s - (0 if arrival in first else 40)
        assert arrival.step.startswith("warmup:") == (in_step < 10)
    assert plan.total_s == 80 and plan.step_at(80) == "" and plan.step_at(45) == "warmup:rate=5"
    with pytest.raises(ValueError, match="max_in_flight"):
        OpenLoopPlan(rates=(1.0,), max_in_flight=0)
    with pytest.raises(ValueError, match="rate"):
        OpenLoopPlan(rates=(1.0, -2.0))


def test_shards_partition_the_schedule() -> None:
    arrivals = OpenLoopPlan(rates=(7.0,), warmup_s=0, measure_s=10, seed=1).arrivals
    shards = [shard(arrivals, i, 3) for i in range(3)]
    assert sorted((a for s in shards for a in s), key=lambda a: a.offset_s) == list(arrivals)
    assert [len(s) for s in shards] == [24, 23, 23]
    with pytest.raises(ValueError):
        shard(arrivals, 3, 3)


# ---- the dispatcher ---------------------------------------------------------------------------


class RecordingSender:
    """A Sender that holds each request `hold_s` (a server's answer time) and records what it saw."""

    def __init__(self, hold_s: float = 0.0, fail_on: str | None = None) -> None:
        self.hold_s = hold_s
        self.fail_on = fail_on
        self.sent: list[tuple[float, float, str, Prompt]] = []  # (actual, intended, step, prompt)
        self.in_flight = 0
        self.max_in_flight = 0

    def send(self, prompt: Prompt, intended_epoch: float, step: str) -> None:
        self.sent.append((time.time(), intended_epoch, step, prompt))
        if step == self.fail_on:
            raise RuntimeError("sender bug")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        gevent.sleep(self.hold_s)
        self.in_flight -= 1


def constant(n: int, gap: float, step: str = "rate=x") -> list[Arrival]:
    return [Arrival((i + 1) * gap, step) for i in range(n)]


def test_dispatch_sends_on_schedule_without_waiting_for_answers() -> None:
    sender = RecordingSender(hold_s=0.2)
    start = time.time() + 0.05
    result = dispatch(constant(20, 0.01), start, prompt_source("synthetic-text", 32, 4, seed=1), sender)
    assert result.sent == len(sender.sent) == 20
    intended = [s[1] for s in sender.sent]
    assert intended == pytest.approx([start + (i + 1) * 0.01 for i in range(20)])
    lags = [actual - want for actual, want, _, _ in sender.sent]
    assert max(lags) < 0.03 and min(lags) > -0.002
    assert sender.max_in_flight == 20  # open loop: none waited for an earlier answer
    assert len({s[3].text for s in sender.sent}) == 20


def test_max_in_flight_caps_and_the_lag_shows_it() -> None:
    sender = RecordingSender(hold_s=0.1)
    start = time.time() + 0.05
    result = dispatch(constant(10, 0.01), start, prompt_source("synthetic-text", 32, 4), sender, max_in_flight=2)
    assert result.sent == 10 and sender.max_in_flight == 2
    # intended times stay on the schedule; the requests that waited for a slot left late
    assert [s[1] for s in sender.sent] == pytest.approx([start + (i + 1) * 0.01 for i in range(10)])
    lags = [actual - want for actual, want, _, _ in sender.sent]
    assert lags[-1] > 0.3  # 8 requests queued behind 2 slots of 0.1 s each: >= 0.4 s - 0.09 s of schedule
    assert result.max_lag_s == pytest.approx(max(lags), abs=0.01)


def test_a_failing_sender_does_not_stop_the_schedule() -> None:
    arrivals = [Arrival(0.01, "a"), Arrival(0.02, "boom"), Arrival(0.03, "b")]
    sender = RecordingSender(fail_on="boom")
    result = dispatch(arrivals, time.time(), prompt_source("synthetic-text", 32, 4), sender)
    assert result.sent == 3 and [s[2] for s in sender.sent] == ["a", "boom", "b"]


def test_prompts_are_built_before_the_wait() -> None:
    built: list[float] = []

    def slow_prompt() -> Prompt:
        built.append(time.time())
        return Prompt(None, "x", 1, 1, None)

    sender = RecordingSender()
    start = time.time()
    dispatch([Arrival(0.1, "s"), Arrival(0.2, "s")], start, slow_prompt, sender)
    assert built[0] < start + 0.05 and built[1] < start + 0.15  # ready ahead of each send time


class WithATask(User):
    abstract = True

    @task
    def closed_loop(self) -> None:
        raise AssertionError("a dispatcher must not run its other base's tasks")


class Dispatcher(OpenLoopDispatcher, WithATask):
    prompts = prompt_source("synthetic-chat", 64, 8, seed=1)

    def send(self, prompt: Prompt, intended_epoch: float, step: str) -> None:
        pass


def test_dispatcher_runs_only_the_schedule_and_finds_its_parts() -> None:
    assert Dispatcher.tasks == [OpenLoopDispatcher._run_schedule]
    env = Environment(user_classes=[Dispatcher])
    user = Dispatcher(env)
    assert user.sender() is user
    assert user.dispatch_prompt().expected_input_tokens == 64

    def plain(prompt_fn: Any = None) -> Prompt:  # a plain function on the class stays unbound
        return Prompt(None, "x", 1, 1, None, "plain")

    class Bare(OpenLoopDispatcher):
        prompts = plain

    bare = Bare(env)
    assert bare.dispatch_prompt().label == "plain"
    with pytest.raises(TypeError, match="no send"):
        bare.sender()
    with pytest.raises(TypeError, match="no OpenLoopShape"):
        bare._schedule()


def test_a_fast_http_dispatcher_gets_a_pool_as_large_as_the_cap() -> None:
    class FastDispatcher(OpenLoopDispatcher, FastHttpUser):
        host = "http://127.0.0.1:9"
        plan = OpenLoopPlan(rates=(1.0,), warmup_s=0, measure_s=5, max_in_flight=300)

        def send(self, prompt: Prompt, intended_epoch: float, step: str) -> None:
            pass

    class Uncapped(FastDispatcher):
        plan = OpenLoopPlan(rates=(20.0,), warmup_s=0, measure_s=5)

    env = Environment(user_classes=[FastDispatcher])
    assert FastDispatcher(env).concurrency == 300  # FastHttpUser's default of 10 would cap it silently
    assert Uncapped(env).concurrency == 100  # at most every arrival of the plan at once


class TinyOpenLoop(OpenLoopShape):
    plan = OpenLoopPlan(rates=(2.0,), warmup_s=1.0, measure_s=2.0)
    dispatcher = Dispatcher
    lead_s = 0.5
    drain_s = 5.0


def test_open_loop_shape_runs_until_the_dispatchers_are_done() -> None:
    shape = TinyOpenLoop()
    env = Environment(user_classes=[Dispatcher], shape_class=shape)
    runner = env.create_local_runner()
    try:
        install(env)
        install(env)  # idempotent
        assert at(shape, 0.0).tick() == (1, 1.0, [Dispatcher])
        assert at(shape, 3.6).tick() == (1, 1.0, [Dispatcher])  # the schedule has ended, answers pending
        runner.send_message(DONE_MESSAGE, {"sent": 6, "max_lag_s": 0.002})  # what the dispatcher reports
        assert shape.done == 1 and shape.sent == 6
        assert at(shape, 3.6).tick() is None
        shape.reset_time()
        assert shape.done == 0
        assert at(shape, 3.6 + 5.0).tick() is None  # drain_s: gives up on answers that never come
        assert at(shape, 3.0).tick() is not None
    finally:
        runner.quit()


def test_open_loop_shape_labels_by_its_schedule() -> None:
    shape = TinyOpenLoop()
    env = SimpleNamespace(shape_class=shape)
    base = shape.schedule_epoch
    assert current_step(env, base - 0.1) == ""
    assert current_step(env, base + 0.5) == "warmup:rate=2"
    assert current_step(env, base + 1.5) == "rate=2"
    assert current_step(env, base + 3.0) == ""


# ---- the SLO sweep ----------------------------------------------------------------------------


def test_concurrency_sweep_bisects_between_last_pass_and_first_fail() -> None:
    runs: list[int] = []

    def run(concurrency: int) -> bool:
        runs.append(concurrency)
        return concurrency <= 23

    result = sweep_concurrency(run)
    assert result.best == 23 and result.first_fail == 24
    assert runs[:5] == [1, 4, 8, 16, 32] and 64 not in runs  # stops escalating at the first failure
    assert len(runs) == len(set(runs)) <= 5 + 4
    assert [value for value, _ in result.trials] == runs
    assert all(passed == (value <= 23) for value, passed in result.trials)


def test_concurrency_sweep_edges() -> None:
    everything = sweep_concurrency(lambda c: True)
    assert (everything.best, everything.first_fail) == (64, None) and len(everything.trials) == 6
    nothing = sweep_concurrency(lambda c: False)
    assert (nothing.best, nothing.first_fail, nothing.trials) == (None, 1, ((1, False),))
    adjacent = sweep_concurrency(lambda c: c < 5, levels=(4, 5, 6))
    assert (adjacent.best, adjacent.first_fail) == (4, 5) and len(adjacent.trials) == 2


def test_rate_sweep_reaches_the_resolution() -> None:
    result = sweep_rate(lambda rate: rate <= 3.3, rates=(0.5, 1, 2, 4, 8), resolution=0.02)
    assert result.best is not None and result.first_fail is not None
    assert result.best <= 3.3 < result.first_fail
    assert result.first_fail - result.best <= 0.02 * result.first_fail
    assert [value for value, _ in result.trials][:4] == [0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sweep_concurrency(lambda c: True, levels=()), "at least one"),
        (lambda: sweep_concurrency(lambda c: True, levels=(4, 2)), "strictly increasing"),
        (lambda: sweep_concurrency(lambda c: True, levels=(0, 2)), "> 0"),
        (lambda: sweep_concurrency(lambda c: True, levels=(1, 2.5)), "integers"),
        (lambda: sweep_rate(lambda r: True, rates=(1, 2), resolution=0), "resolution"),
    ],
)
def test_sweep_refuses_bad_levels(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
