"""The timing of a load test as plain data: step plans (closed loop) and arrival schedules (open loop).

Kept apart from `shapes.py`, which wraps them in Locust classes, because importing Locust
monkey-patches the whole process with gevent: the gate, the report and the unit tests read the
plans and schedules without that side effect.

Step labels are what `RequestRecord.step` carries:

- `"concurrency=8"` / `"rate=2.5"`: the request was sent inside that step's measured window;
- `"warmup:concurrency=8"`: it was sent during the step's warm-up, which the gate leaves out
  (a prefix rather than an empty string, so warm-up requests stay attributable to their step);
- `""`: it was sent outside any step (before the plan starts or after it ends).

Requests are labelled by the time they are *sent*, so a request sent at the end of a measured
window is measured even when it finishes during the next step's warm-up.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

WARMUP_PREFIX = "warmup:"
SEED_CONCURRENCY: tuple[int, ...] = (1, 4, 8, 16, 32, 64)  # the seed's 4x4090D table
DEFAULT_RATES: tuple[float, ...] = (1.0, 2.0, 4.0)  # open-loop requests/s when none are given
DEFAULT_WARMUP_S = 30.0
DEFAULT_MEASURE_S = 120.0


def is_measured(step: str) -> bool:
    """Whether a record with this step label belongs to a measured window."""
    return bool(step) and not step.startswith(WARMUP_PREFIX)


def measured_label(step: str) -> str:
    """The step a label belongs to, warm-up or not ("warmup:concurrency=8" -> "concurrency=8")."""
    return step[len(WARMUP_PREFIX):] if step.startswith(WARMUP_PREFIX) else step


def rate_label(rate: float) -> str:
    """The label of an open-loop step: `rate=2.5` (requests per second, shortest exact form)."""
    return f"rate={rate:g}"


@dataclass(frozen=True)
class Step:
    """One load level: `label`, the users (closed loop) it runs, its warm-up and measured seconds."""

    label: str
    users: int
    warmup_s: float
    measure_s: float

    @property
    def duration_s(self) -> float:
        return self.warmup_s + self.measure_s


@dataclass(frozen=True)
class Phase:
    """Where a moment falls in a step plan: which step, and whether it is the step's warm-up."""

    index: int
    label: str
    warmup: bool
    start_s: float  # when this phase (warm-up or measured window) starts, from the plan's start
    end_s: float

    @property
    def step(self) -> str:
        """The label a request sent now carries (see the module docstring)."""
        return WARMUP_PREFIX + self.label if self.warmup else self.label


@dataclass(frozen=True)
class StepPlan:
    """Steps run back to back; each is a warm-up followed by a measured window."""

    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a step plan needs at least one step")
        for step in self.steps:
            if step.users < 0 or step.warmup_s < 0 or step.measure_s <= 0:
                raise ValueError(f"step {step.label!r}: users and warm-up must be >= 0 and the measured time > 0")

    @property
    def total_s(self) -> float:
        return sum(step.duration_s for step in self.steps)

    def phase_at(self, t: float) -> Phase | None:
        """The phase at `t` seconds after the plan started; None before the start or after the end."""
        if t < 0:
            return None
        start = 0.0
        for index, step in enumerate(self.steps):
            measured_from = start + step.warmup_s
            end = measured_from + step.measure_s
            if t < measured_from:
                return Phase(index, step.label, True, start, measured_from)
            if t < end:
                return Phase(index, step.label, False, measured_from, end)
            start = end
        return None

    def step_at(self, t: float) -> str:
        phase = self.phase_at(t)
        return "" if phase is None else phase.step

    def describe(self) -> str:
        """The plan in words, for the report: "closed loop, concurrency 1, 4, 8; 30 s warm-up + 120 s measured each"."""
        levels = ", ".join(str(step.users) for step in self.steps)
        timings = {(step.warmup_s, step.measure_s) for step in self.steps}
        each = (f"; {_seconds(self.steps[0].warmup_s)} warm-up + {_seconds(self.steps[0].measure_s)} measured each"
                if len(timings) == 1 else "")
        return f"closed loop, concurrency {levels}{each}"


def _seconds(value: float) -> str:
    return f"{value:g} s"


def concurrency_plan(levels: Sequence[int] = SEED_CONCURRENCY, warmup_s: float = DEFAULT_WARMUP_S,
                     measure_s: float = DEFAULT_MEASURE_S) -> StepPlan:
    """The seed's step ramp: one step per concurrency level, labelled `concurrency=N`."""
    if not levels:
        raise ValueError("a step plan needs at least one concurrency level")
    if any(level < 1 for level in levels):
        raise ValueError(f"concurrency levels must be >= 1, got {list(levels)}")
    return StepPlan(tuple(Step(f"concurrency={level}", level, warmup_s, measure_s) for level in levels))


# ---- open loop --------------------------------------------------------------------------------


def arrival_offsets(count: int, rate: float, burstiness: float = 1.0, seed: int = 0,
                    rescale: bool = True) -> list[float]:
    """Send times (seconds from the start) of `count` requests at `rate` per second, as vLLM's bench does.

    Gaps are gamma-distributed with shape `burstiness` and mean 1/rate: burstiness 1 is a Poisson
    process (exponential gaps, CV 1), below 1 burstier, above 1 more regular (CV 1/sqrt(b)), and
    `math.inf` a constant gap. The first request waits one gap too. With `rescale` the offsets are
    stretched so the last one is exactly count/rate (vLLM: without it the sum drifts 1-2% between
    seeds, and so would the achieved rate).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"rate must be a positive finite number of requests per second, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (1 is Poisson, inf constant), got {burstiness}")
    rng = random.Random(seed)
    if math.isinf(burstiness):
        gaps = [1.0 / rate] * count
    else:
        scale = 1.0 / (rate * burstiness)
        gaps = [rng.gammavariate(burstiness, scale) for _ in range(count)]
    offsets: list[float] = []
    total = 0.0
    for gap in gaps:
        total += gap
        offsets.append(total)
    if rescale and offsets and offsets[-1] > 0:
        factor = (count / rate) / offsets[-1]
        offsets = [offset * factor for offset in offsets]
    return offsets


@dataclass(frozen=True)
class Arrival:
    """One request of an open-loop schedule: when it is due (from the schedule's start) and its step."""

    offset_s: float
    step: str


@dataclass(frozen=True)
class OpenLoopPlan:
    """Open-loop steps: each rate runs `warmup_s + measure_s`, arrivals drawn as `arrival_offsets`.

    `max_in_flight` caps the requests outstanding at once (None: no cap); an arrival that finds the
    cap reached waits, and its lateness shows as dispatch lag instead of being hidden. Each step's
    schedule has its own seed (`seed + step index`), so adding a step keeps the others' arrivals.
    """

    rates: tuple[float, ...]
    warmup_s: float = DEFAULT_WARMUP_S
    measure_s: float = DEFAULT_MEASURE_S
    burstiness: float = 1.0
    seed: int = 0
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        if not self.rates:
            raise ValueError("an open-loop plan needs at least one rate")
        if self.warmup_s < 0 or self.measure_s <= 0:
            raise ValueError("warm-up must be >= 0 s and the measured time > 0 s")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1 or None, got {self.max_in_flight}")
        for rate in self.rates:
            arrival_offsets(0, rate, self.burstiness)  # validates rate and burstiness

    @property
    def step_s(self) -> float:
        return self.warmup_s + self.measure_s

    @property
    def total_s(self) -> float:
        return self.step_s * len(self.rates)

    def step_at(self, t: float) -> str:
        """The step label at `t` seconds after the schedule's start ("" outside it)."""
        if t < 0 or t >= self.total_s:
            return ""
        index = int(t // self.step_s)
        label = rate_label(self.rates[index])
        return WARMUP_PREFIX + label if t - index * self.step_s < self.warmup_s else label

    def describe(self) -> str:
        """The plan in words, for the report: "open loop, Poisson arrivals at 1, 2 req/s; ..."."""
        if math.isinf(self.burstiness):
            process = "constant-rate arrivals"
        elif self.burstiness == 1:
            process = "Poisson arrivals"
        else:
            process = f"gamma arrivals (burstiness {self.burstiness:g})"
        rates = ", ".join(f"{rate:g}" for rate in self.rates)
        cap = f", at most {self.max_in_flight} in flight" if self.max_in_flight else ""
        return (f"open loop, {process} at {rates} req/s; {_seconds(self.warmup_s)} warm-up + "
                f"{_seconds(self.measure_s)} measured each{cap}")

    @cached_property
    def arrivals(self) -> tuple[Arrival, ...]:
        """Every arrival of every step, in time order."""
        result: list[Arrival] = []
        for index, rate in enumerate(self.rates):
            start = index * self.step_s
            label = rate_label(rate)
            count = round(rate * self.step_s)
            for offset in arrival_offsets(count, rate, self.burstiness, self.seed + index):
                step = WARMUP_PREFIX + label if offset < self.warmup_s else label
                result.append(Arrival(start + offset, step))
        return tuple(result)


def shard(arrivals: Sequence[Arrival], index: int, count: int) -> list[Arrival]:
    """The arrivals one of `count` load generators sends: every count-th, starting at `index`.

    Together the shards are the whole schedule, so N Locust workers keep the global rate and
    its arrival process instead of each sending the full rate.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index {index} of {count} is out of range")
    return list(arrivals[index::count])


def levels_text(levels: Sequence[float]) -> str:
    """Levels as the command line writes them: "1,4,8"."""
    return ",".join(f"{level:g}" for level in levels)


def parse_list(option: str, text: str, kind: type[int] | type[float]) -> tuple[Any, ...]:
    """"1,4,8" as numbers; ValueError naming the option."""
    try:
        values = tuple(kind(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not a comma-separated list of "
                         f"{'whole numbers' if kind is int else 'numbers'}") from None
    if not values:
        raise ValueError(f"{option}: give at least one value")
    return values
