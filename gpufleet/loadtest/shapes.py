"""Locust load shapes: the seed's concurrency step ramp (closed loop) and open-loop arrivals.

- `StepRampShape`: concurrency steps (the seed's 1, 4, 8, 16, 32, 64 by default), each a warm-up
  then a measured window; all of a step's new users start at once; the run ends by itself.
  Users label each request with `current_step(environment)` at send time.
- `OpenLoopShape` + `OpenLoopDispatcher`: requests sent at precomputed intended times (constant,
  Poisson or gamma-bursty gaps, as `vllm bench serve`), each on its own greenlet, optionally
  capped at `max_in_flight`. Locust users are closed loops (a user waits for its answer before
  its next request), which hides a stalled server (coordinated omission); the dispatcher instead
  keeps the schedule and hands every request its intended time, so `RequestRecord.dispatch_lag_s`
  shows how late it actually left.
- `Sender`: what the dispatcher needs from a user class: `send(prompt, intended_epoch, step)`.

Both shapes keep their clock in wall time (`start_epoch`) and, on a Locust master, announce it
to the workers (a custom message), so every process labels requests against the same plan.
The plans themselves are plain data in `schedule.py`; the SLO search is `sweep.py`. Importing
this module imports Locust, which monkey-patches the process with gevent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import gevent
from gevent.pool import Pool
from locust import LoadTestShape, User, events
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

from gpufleet.loadtest.prompts import Prompt
from gpufleet.loadtest.schedule import (
    DEFAULT_MEASURE_S,
    DEFAULT_WARMUP_S,
    SEED_CONCURRENCY,
    WARMUP_PREFIX,
    Arrival,
    OpenLoopPlan,
    Phase,
    StepPlan,
    concurrency_plan,
    is_measured,
    shard,
)
from gpufleet.loadtest.sweep import SweepResult, sweep_concurrency, sweep_rate

__all__ = [
    "SEED_CONCURRENCY",
    "WARMUP_PREFIX",
    "DispatchResult",
    "OpenLoopDispatcher",
    "OpenLoopPlan",
    "OpenLoopShape",
    "Sender",
    "StepPlan",
    "StepRampShape",
    "SweepResult",
    "current_step",
    "dispatch",
    "install",
    "is_measured",
    "step_source",
    "sweep_concurrency",
    "sweep_rate",
]

log = logging.getLogger(__name__)

CLOCK_MESSAGE = "gpufleet_shape_clock"  # master -> workers: {"start_epoch", "workers"}
DONE_MESSAGE = "gpufleet_dispatch_done"  # dispatcher (worker or local) -> master: {"sent", "max_lag_s"}


@runtime_checkable
class Sender(Protocol):
    """Sends one request and records it; implemented by the load-test users (users.py).

    `intended_epoch` is when the schedule wanted the request sent (time.time()); the sender takes
    its own `start_epoch` right before the request goes out and stores both, with `step`, in the
    RequestRecord. It must not raise for a failed request (it records the failure).
    """

    def send(self, prompt: Prompt, intended_epoch: float, step: str) -> None: ...


# ---- shared clock ----------------------------------------------------------------------------


class _ClockedShape(LoadTestShape):
    """A shape whose plan runs on a wall clock every Locust process agrees on."""

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self.start_epoch = time.time()
        self.workers = 1  # load generators sharing the plan (a master's connected workers)
        self._announced: tuple[float, int] | None = None

    def reset_time(self) -> None:
        """Locust calls this when the run starts: the plan's clock starts here."""
        super().reset_time()
        self.start_epoch = time.time()
        self._announced = None

    def _announce(self) -> None:
        """On a master, tell the workers when the plan started and how many share it."""
        if isinstance(self.runner, MasterRunner):
            self.workers = max(1, self.runner.worker_count)
            clock = (self.start_epoch, self.workers)
            if clock != self._announced:
                self.runner.send_message(CLOCK_MESSAGE, {"start_epoch": self.start_epoch, "workers": self.workers})
                self._announced = clock

    def set_clock(self, start_epoch: float, workers: int) -> None:
        """A worker's copy follows the master's clock (see `install`)."""
        self.start_epoch = start_epoch
        self.workers = workers

    def step_at_epoch(self, epoch: float) -> str:
        raise NotImplementedError


def current_step(environment: Any, epoch: float | None = None) -> str:
    """The step label for a request sent now (or at `epoch`): what a user puts in `RequestRecord.step`.

    "" when the run has no clocked shape, or the moment lies outside its plan.
    """
    shape = getattr(environment, "shape_class", None)
    if not isinstance(shape, _ClockedShape):
        return ""
    return shape.step_at_epoch(time.time() if epoch is None else epoch)


def step_source(environment: Any) -> Callable[[], str]:
    """A zero-argument `current_step` for one environment, for users that take a step callable."""

    def step() -> str:
        return current_step(environment)

    return step


def install(environment: Any) -> None:
    """Register this module's messages on the environment's runner (idempotent).

    Done automatically on Locust's `init` event; call it yourself when you build an Environment
    and its runner in code. Workers learn the shape's clock; the master (or a local runner)
    learns when dispatchers have sent their whole schedule.
    """
    runner = getattr(environment, "runner", None)
    if runner is None:
        return
    if isinstance(runner, WorkerRunner):
        if CLOCK_MESSAGE not in runner.custom_messages:
            runner.register_message(CLOCK_MESSAGE, _on_clock)
    elif DONE_MESSAGE not in runner.custom_messages:
        runner.register_message(DONE_MESSAGE, _on_dispatch_done)


def _on_clock(environment: Any, msg: Any, **_: Any) -> None:
    shape = environment.shape_class
    if isinstance(shape, _ClockedShape):
        shape.set_clock(float(msg.data["start_epoch"]), int(msg.data["workers"]))


def _on_dispatch_done(environment: Any, msg: Any, **_: Any) -> None:
    shape = environment.shape_class
    if isinstance(shape, OpenLoopShape):
        shape.dispatcher_done(int(msg.data.get("sent", 0)), float(msg.data.get("max_lag_s", 0.0)))


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    install(environment)


# ---- closed loop: the step ramp --------------------------------------------------------------


class StepRampShape(_ClockedShape):
    """The seed's step ramp: `concurrencies` users in turn, each step `warmup_s` then `measure_s`.

    Subclass it in a locustfile (the base is abstract, so importing it adds no shape):

        class SeedRamp(StepRampShape):
            concurrencies = (1, 4, 8, 16, 32, 64)
            warmup_s, measure_s = 30, 120

    or replace the plan at `init` time with `set_plan(concurrency_plan(...))`. Each step's new
    users are spawned at once (spawn rate = the step's user count); Locust ticks a shape once a
    second, so a step can start up to a second late: inside its warm-up, not its measured window.
    `user_classes`, when set, limits which user classes are spawned.
    """

    abstract = True
    concurrencies: ClassVar[Sequence[int]] = SEED_CONCURRENCY
    warmup_s: ClassVar[float] = DEFAULT_WARMUP_S
    measure_s: ClassVar[float] = DEFAULT_MEASURE_S
    drain_s: ClassVar[float] = 900.0  # the most the last step's requests may take to finish (users.request_timeout_s)
    user_classes: ClassVar[list[type[User]] | None] = None

    def __init__(self) -> None:
        super().__init__()
        self.plan = concurrency_plan(self.concurrencies, self.warmup_s, self.measure_s)

    def set_plan(self, plan: StepPlan) -> None:
        self.plan = plan

    def phase_at_epoch(self, epoch: float) -> Phase | None:
        return self.plan.phase_at(epoch - self.start_epoch)

    def step_at_epoch(self, epoch: float) -> str:
        return self.plan.step_at(epoch - self.start_epoch)

    def tick(self) -> tuple[int, float] | tuple[int, float, list[type[User]] | None] | None:
        self._announce()
        run_time = self.get_run_time()
        phase = self.plan.phase_at(run_time)
        if phase is None:
            return self._drain(run_time)
        users = self.plan.steps[phase.index].users
        spawn_rate = float(max(users, 1))  # the whole step at once
        if self.user_classes is None:
            return users, spawn_rate
        return users, spawn_rate, list(self.user_classes)

    def _drain(self, run_time: float) -> tuple[int, float] | None:
        """After the last step: stop the users and let each finish the request it is in, then end.

        Ending at once would kill the last step's requests still in flight, and those are its
        slowest: its percentiles would lose their tail. Scaling to 0 users stops them gracefully
        when Locust's stop timeout is set (`apply_stop_timeout`); the run ends once none is left,
        or `drain_s` after the plan.
        """
        if run_time < 0 or run_time >= self.plan.total_s + self.drain_s:
            return None
        if run_time >= self.plan.total_s + 1 and self.runner is not None and self.runner.user_count == 0:
            return None
        return 0, float(max(step.users for step in self.plan.steps))


# ---- open loop: the dispatcher ---------------------------------------------------------------


@dataclass(frozen=True)
class DispatchResult:
    """What a dispatcher did: requests sent and the worst lateness at hand-off (s)."""

    sent: int
    max_lag_s: float


def dispatch(arrivals: Sequence[Arrival], start_epoch: float, next_prompt: Callable[[], Prompt], sender: Sender,
             max_in_flight: int | None = None, clock: Callable[[], float] = time.time) -> DispatchResult:
    """Send every arrival at `start_epoch + offset`, each on its own greenlet; return when all have answered.

    The next prompt is built before sleeping until its time, so building it never delays a send.
    With `max_in_flight`, an arrival that finds the cap reached waits for a slot: it leaves late,
    but keeps its intended time, so the lag is recorded rather than hidden.
    """
    pool = Pool(size=max_in_flight)
    max_lag = 0.0
    sent = 0
    try:
        for arrival in arrivals:
            prompt = next_prompt()
            intended = start_epoch + arrival.offset_s
            delay = intended - clock()
            if delay > 0:
                gevent.sleep(delay)
            pool.wait_available()
            max_lag = max(max_lag, clock() - intended)
            pool.spawn(_send_one, sender, prompt, intended, arrival.step)
            sent += 1
        pool.join()
    finally:
        pool.kill(block=False)  # a stopped run abandons what is still in flight
    return DispatchResult(sent, max_lag)


def _send_one(sender: Sender, prompt: Prompt, intended: float, step: str) -> None:
    try:
        sender.send(prompt, intended, step)
    except Exception:  # a sender bug must not stop the schedule
        log.exception("open-loop send failed (step %s)", step)


class OpenLoopShape(_ClockedShape):
    """Runs an `OpenLoopPlan` with one `dispatcher` user per load generator (1 locally, 1 per worker).

    The schedule starts `lead_s` after the shape so the dispatchers are spawned in time; the run
    ends when every dispatcher has sent its schedule and seen its answers, or `drain_s` after the
    last arrival was due, whichever is first. Subclass it and set `plan` and `dispatcher`:

        class Poisson(OpenLoopShape):
            plan = OpenLoopPlan(rates=(1, 2, 4), warmup_s=30, measure_s=120, burstiness=1.0, seed=7,
                                max_in_flight=256)
            dispatcher = ChatDispatcher
    """

    abstract = True
    plan: ClassVar[OpenLoopPlan] = OpenLoopPlan(rates=(1.0,))
    dispatcher: ClassVar[type[User] | None] = None
    lead_s: ClassVar[float] = 2.0
    drain_s: ClassVar[float] = 120.0

    def __init__(self) -> None:
        super().__init__()
        self.done = 0
        self.sent = 0
        self.max_lag_s = 0.0

    def reset_time(self) -> None:
        super().reset_time()
        self.done, self.sent, self.max_lag_s = 0, 0, 0.0

    @property
    def schedule_epoch(self) -> float:
        """Wall time at which the schedule's offsets start."""
        return self.start_epoch + self.lead_s

    def step_at_epoch(self, epoch: float) -> str:
        """The step of the schedule at `epoch` (the dispatcher labels its requests from the schedule)."""
        return self.plan.step_at(epoch - self.schedule_epoch)

    def dispatcher_done(self, sent: int, max_lag_s: float) -> None:
        self.done += 1
        self.sent += sent
        self.max_lag_s = max(self.max_lag_s, max_lag_s)

    def tick(self) -> tuple[int, float] | tuple[int, float, list[type[User]] | None] | None:
        self._announce()
        run_time = self.get_run_time()
        schedule_end = self.lead_s + self.plan.total_s
        if run_time >= schedule_end and (self.done >= self.workers or run_time >= schedule_end + self.drain_s):
            if self.done < self.workers:
                log.warning("open loop: %d of %d dispatchers still had requests in flight after drain_s=%gs",
                            self.workers - self.done, self.workers, self.drain_s)
            return None
        users = self.workers
        if self.dispatcher is None:
            return users, float(users)
        return users, float(users), [self.dispatcher]


class OpenLoopDispatcher(User):
    """A user that sends an `OpenLoopShape`'s schedule (its shard of it, on a worker) through a `Sender`.

    Its only task is the dispatch, even when mixed with a user class that has tasks of its own
    (e.g. `class ChatDispatcher(OpenLoopDispatcher, ChatUser)`, whose `send` is the Sender).
    Set `prompts` (or a mixed-in user's `prompt_source`) to a prompt source
    (`prompts.prompt_source(...)`) or override `dispatch_prompt`; override `sender()` when the
    Sender is not the user itself. Without an OpenLoopShape it runs the class's own `plan` from
    its own start. A FastHttpUser-based dispatcher gets `concurrency` (its connection pool) raised
    to what the plan can have in flight, so the pool never becomes a silent cap.
    """

    abstract = True
    prompts: ClassVar[Callable[[], Prompt] | None] = None
    plan: ClassVar[OpenLoopPlan | None] = None
    max_connections: ClassVar[int] = 4096  # the pool size when the plan has no max_in_flight

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.tasks = [OpenLoopDispatcher._run_schedule]  # only the dispatch, whatever the other bases bring

    def __init__(self, environment: Any) -> None:
        if hasattr(type(self), "concurrency"):  # FastHttpUser sizes its pool from this in __init__
            self.concurrency = max(int(type(self).concurrency), self._wanted_connections(environment))
        super().__init__(environment)

    def _wanted_connections(self, environment: Any) -> int:
        shape = getattr(environment, "shape_class", None)
        plan = shape.plan if isinstance(shape, OpenLoopShape) else type(self).plan
        if plan is None:
            return 0
        return plan.max_in_flight or min(len(plan.arrivals), self.max_connections)

    def dispatch_prompt(self) -> Prompt:
        # read off the class: a plain function must not be bound to self
        source = type(self).prompts or getattr(type(self), "prompt_source", None)
        if source is None:
            raise TypeError(f"{type(self).__name__}: set `prompts` to a prompt source or override dispatch_prompt()")
        return source()

    def sender(self) -> Sender:
        if isinstance(self, Sender):
            return self
        raise TypeError(f"{type(self).__name__} has no send(prompt, intended_epoch, step): override sender()")

    def _schedule(self) -> tuple[OpenLoopPlan, float, int, int]:
        """The plan, its start epoch, and this process's shard (index, count)."""
        shape = self.environment.shape_class
        runner = self.environment.runner
        if isinstance(shape, OpenLoopShape):
            count = shape.workers if isinstance(runner, WorkerRunner) else 1
            index = max(0, runner.worker_index) % count if isinstance(runner, WorkerRunner) else 0
            return shape.plan, shape.schedule_epoch, index, count
        if self.plan is None:
            raise TypeError(f"{type(self).__name__}: no OpenLoopShape is running and no `plan` is set")
        return self.plan, time.time(), 0, 1

    def _run_schedule(self) -> None:
        plan, start_epoch, index, count = self._schedule()
        result = dispatch(shard(plan.arrivals, index, count), start_epoch, self.dispatch_prompt, self.sender(),
                          plan.max_in_flight)
        if result.max_lag_s > 0.01:
            log.warning("open loop: a request left %.3f s after its intended time (see dispatch_lag_s)",
                        result.max_lag_s)
        self.environment.runner.send_message(DONE_MESSAGE, {"sent": result.sent, "max_lag_s": result.max_lag_s})
        raise StopUser()
