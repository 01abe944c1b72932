"""The load shapes' options (level lists, the plan they make, how a plan reads in the report) and the
step ramp's drain: after the last step the users stop and finish their requests before the run ends."""

from __future__ import annotations

import tests.unit.locust_unpatched  # noqa: F401  (before anything imports Locust)

# isort: split

import math
from types import SimpleNamespace
from typing import Any

import pytest

from gpufleet.loadtest.schedule import OpenLoopPlan, Step, StepPlan, concurrency_plan
from gpufleet.loadtest.shape_options import apply, parse_list
from gpufleet.loadtest.shapes import OpenLoopDispatcher, OpenLoopShape, StepRampShape

pytestmark = pytest.mark.unit


# ---- level lists --------------------------------------------------------------------------------


def test_a_level_list_becomes_numbers() -> None:
    assert parse_list("--gpufleet-concurrency", "1,4,8", int) == (1, 4, 8)
    assert parse_list("--gpufleet-concurrency", "1, 4,8,", int) == (1, 4, 8)  # spaces and a trailing comma
    assert parse_list("--gpufleet-rates", "0.5,2", float) == (0.5, 2.0)


@pytest.mark.parametrize(("text", "kind", "message"), [
    ("1,x", int, "--opt: '1,x' is not a comma-separated list of whole numbers"),
    ("1.5", int, "--opt: '1.5' is not a comma-separated list of whole numbers"),
    ("fast", float, "--opt: 'fast' is not a comma-separated list of numbers"),
    ("", int, "--opt: give at least one value"),
    (" , ", float, "--opt: give at least one value"),
])
def test_a_bad_level_list_is_refused_naming_the_option(text: str, kind: type, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_list("--opt", text, kind)
    assert str(caught.value) == message


# ---- plans in words -----------------------------------------------------------------------------


def test_a_ramp_reads_as_its_levels_and_timings() -> None:
    assert concurrency_plan((1, 4), 2, 10).describe() == ("closed loop, concurrency 1, 4; "
                                                          "2 s warm-up + 10 s measured each")
    assert concurrency_plan().describe() == ("closed loop, concurrency 1, 4, 8, 16, 32, 64; "
                                             "30 s warm-up + 120 s measured each")
    uneven = StepPlan((Step("a", 1, 2, 10), Step("b", 4, 5, 10)))
    assert uneven.describe() == "closed loop, concurrency 1, 4"  # no "each" for timings that differ


def test_an_open_loop_reads_as_its_arrival_process_and_rates() -> None:
    assert OpenLoopPlan(rates=(1.0, 2.5), burstiness=1).describe() == (
        "open loop, Poisson arrivals at 1, 2.5 req/s; 30 s warm-up + 120 s measured each")
    constant = OpenLoopPlan(rates=(4.0,), burstiness=math.inf, warmup_s=5, measure_s=60, max_in_flight=32)
    assert constant.describe() == ("open loop, constant-rate arrivals at 4 req/s; 5 s warm-up + 60 s measured each, "
                                   "at most 32 in flight")
    assert "gamma arrivals (burstiness 0.5)" in OpenLoopPlan(rates=(1.0,), burstiness=0.5).describe()


# ---- options applied to the running shape -------------------------------------------------------


class Ramp(StepRampShape):
    pass


class OpenLoop(OpenLoopShape):
    pass


class ChatDispatcher(OpenLoopDispatcher):
    api = "openai-chat"


class TgiDispatcher(OpenLoopDispatcher):
    api = "tgi"


class FakeEnvironment:
    """What `apply` reads of a Locust Environment (a plain class: the users' settings are keyed weakly)."""

    def __init__(self, shape: Any, stop_timeout: float | None = None, **options: Any) -> None:
        defaults = dict(gpufleet_concurrency="1,4,8,16,32,64", gpufleet_rates="1", gpufleet_burstiness=1.0,
                        gpufleet_max_in_flight=None, gpufleet_warmup_s=30.0, gpufleet_measure_s=120.0)
        self.parsed_options = SimpleNamespace(**{**defaults, **options})
        self.shape_class = shape
        self.stop_timeout = stop_timeout
        self.user_classes = [ChatDispatcher, TgiDispatcher]


def test_the_ramp_options_set_the_plan_and_a_stop_timeout_for_the_drain() -> None:
    shape = Ramp()
    environment = FakeEnvironment(shape, gpufleet_concurrency="2,4", gpufleet_warmup_s=1.0, gpufleet_measure_s=2.0)
    apply(environment)
    assert shape.plan == concurrency_plan((2, 4), 1, 2)
    # without a stop timeout Locust kills the users mid-request when the ramp scales to 0
    assert environment.stop_timeout == Ramp.drain_s
    kept = FakeEnvironment(Ramp(), stop_timeout=60)
    apply(kept)
    assert kept.stop_timeout == 60  # the user's own --stop-timeout stays


def test_ramp_options_that_cannot_make_a_plan_are_refused_naming_the_options() -> None:
    with pytest.raises(ValueError, match=r"^--gpufleet-concurrency/--gpufleet-warmup-s/--gpufleet-measure-s: "
                                         r"concurrency levels must be >= 1"):
        apply(FakeEnvironment(Ramp(), gpufleet_concurrency="0,4"))
    with pytest.raises(ValueError, match="--gpufleet-concurrency: '4,eight'"):
        apply(FakeEnvironment(Ramp(), gpufleet_concurrency="4,eight"))


def test_the_open_loop_options_set_the_plan_and_the_dispatcher_of_the_api() -> None:
    shape = OpenLoop()
    apply(FakeEnvironment(shape, gpufleet_rates="1,2.5", gpufleet_burstiness=math.inf, gpufleet_max_in_flight=16,
                          gpufleet_warmup_s=2.0, gpufleet_measure_s=10.0))
    assert shape.plan == OpenLoopPlan(rates=(1.0, 2.5), warmup_s=2, measure_s=10, burstiness=math.inf,
                                      max_in_flight=16)
    assert shape.dispatcher is ChatDispatcher  # --gpufleet-api's default, openai-chat
    with pytest.raises(ValueError, match="--gpufleet-rates"):
        apply(FakeEnvironment(OpenLoop(), gpufleet_rates="0"))


# ---- the ramp's drain ---------------------------------------------------------------------------


class DrainRamp(StepRampShape):
    pass


@pytest.fixture
def ramp(monkeypatch) -> Any:
    """A ramp of 2 then 4 users, each step 1 s warm-up + 2 s measured (the plan ends at 6 s), whose clock
    and runner the test sets: `at(t, users)` ticks it at `t` s with `users` still running."""
    shape = DrainRamp()
    shape.set_plan(concurrency_plan((2, 4), 1, 2))
    shape.runner = SimpleNamespace(user_count=0)

    def at(t: float, users: int = 0) -> Any:
        monkeypatch.setattr(shape, "get_run_time", lambda: t)
        shape.runner.user_count = users
        return shape.tick()

    shape.at = at
    return shape


def test_inside_the_plan_each_step_runs_its_users(ramp) -> None:
    assert ramp.at(0.0) == (2, 2.0)
    assert ramp.at(2.9, users=2) == (2, 2.0)
    assert ramp.at(3.0, users=2) == (4, 4.0)
    assert ramp.at(5.99, users=4) == (4, 4.0)


def test_after_the_plan_the_users_stop_and_finish_their_requests(ramp) -> None:
    assert ramp.at(6.0, users=4) == (0, 4.0)  # scale to 0, all at once
    assert ramp.at(30.0, users=3) == (0, 4.0)  # still waiting for requests in flight


def test_the_run_ends_once_no_user_is_left_a_second_after_the_plan(ramp) -> None:
    assert ramp.at(6.0, users=0) == (0, 4.0)  # the runner's count may lag the stop just ordered
    assert ramp.at(6.9, users=0) == (0, 4.0)
    assert ramp.at(7.0, users=0) is None
    assert ramp.at(7.0, users=1) == (0, 4.0)


def test_the_run_ends_drain_s_after_the_plan_whatever_is_left(ramp) -> None:
    end = 6.0 + DrainRamp.drain_s
    assert ramp.at(end - 0.01, users=4) == (0, 4.0)
    assert ramp.at(end, users=4) is None
