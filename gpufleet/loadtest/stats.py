"""Exact statistics of a load-test run, computed from the raw per-request records.

Locust's own statistics round response times to two significant digits and workers reset them after
every report, so the SLO gate and the report never read them: they read `RequestRecord`s and compute
everything here, with vLLM's definitions (`vllm bench serve`), so the numbers can be set beside a
vLLM benchmark of the same server:

- Percentiles: linear interpolation between the two nearest ranks (numpy's default, as vLLM
  reports them).
- TTFT, TPOT and E2E: one value per successful request (request-weighted); ITL pools every gap
  of every successful request (gap-weighted), which is why p99 ITL and p99 TPOT differ.
- Throughputs (requests/s, tokens/s, goodput): divided by the step's measured window, from its
  first send to its last completion; input and output tokens of successful requests only.
- Goodput: requests per second that met every per-request objective: TTFT, TPOT (0 for a
  one-token answer) and E2E, as `vllm bench serve --goodput ttft:… tpot:… e2el:…`.
- Error rate: failed requests (an error, a status other than 200, or no generated text) over
  requests sent.

`percentile()` reproduces numpy's arithmetic bit for bit without depending on numpy.
Durations are reported in milliseconds, throughputs per second.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpufleet.loadtest.record import RequestRecord

PERCENTILES: tuple[float, ...] = (50, 90, 95, 99)
WARMUP_PREFIX = "warmup:"  # schedule.py's label of a step's warm-up requests ("warmup:concurrency=8")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")  # vLLM's --goodput keys, values in ms
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")  # vLLM's names, in its order

_STEP = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


# ---------------------------------------------------------------------------------------------
# Plain statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, bit for bit as `numpy.percentile`.

    numpy places the percentile at the virtual index (n-1)·q/100 and interpolates between its
    floor and the next rank with a lerp that is computed from the upper end when the fraction is at
    least 0.5 (numpy's `_lerp`); doing the same arithmetic here keeps reports equal to vLLM's.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    n = len(ordered)
    index = (n - 1) * (q / 100)
    if index >= n - 1:
        return float(ordered[-1])
    lower = math.floor(index)
    a, b = float(ordered[lower]), float(ordered[lower + 1])
    t = index - lower
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (exactly rounded sum, so it does not depend on the order of the records)."""
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def median(values: Sequence[float]) -> float:
    """The 50th percentile, as numpy.median."""
    return percentile(values, 50)


def std(values: Sequence[float]) -> float:
    """The population standard deviation (ddof=0), as numpy.std and so vLLM's `std_*_ms`."""
    centre = mean(values)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in values) / len(values))


@dataclass(frozen=True)
class Distribution:
    """Summary of one metric's samples: count, mean, median, std, min, max and the percentiles.

    Every field but `n` is None when there are no samples: vLLM writes 0 then, which reads as a
    perfect latency; an absent value cannot be mistaken for one.
    """

    n: int
    mean: float | None = None
    median: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    percentiles: dict[float, float] = field(default_factory=dict)

    @classmethod
    def of(cls, values: Sequence[float], levels: Sequence[float] = PERCENTILES) -> Distribution:
        if not values:
            return cls(n=0)
        return cls(
            n=len(values), mean=mean(values), median=median(values), std=std(values),
            min=float(min(values)), max=float(max(values)),
            percentiles={float(q): percentile(values, q) for q in levels},
        )

    def p(self, q: float) -> float | None:
        """The q-th percentile, None without samples; computed levels only (PERCENTILES by default)."""
        if self.n == 0:
            return None
        return self.percentiles[float(q)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "mean": self.mean, "median": self.median, "std": self.std, "min": self.min,
            "max": self.max, **{f"p{percentile_word(q)}": v for q, v in self.percentiles.items()},
        }


def percentile_word(q: float) -> str:
    """How vLLM names a percentile level in its JSON keys: 99 -> "99", 99.9 -> "99.9"."""
    return str(int(q)) if float(q).is_integer() else str(q)


# ---------------------------------------------------------------------------------------------
# Per-request values


def parse_step(step: str) -> tuple[str, float | None]:
    """("concurrency", 8.0) from "concurrency=8"; (step, None) when it carries no number."""
    match = _STEP.match(step)
    if match is None:
        return step, None
    return match.group(1), float(match.group(2))


def request_end(record: RequestRecord) -> float:
    """When the request completed (wall clock): send + E2E.

    A request that failed before its last token has no E2E: its first token, or else its send,
    stands in, so a request that never answered does not stretch the measured window.
    """
    for duration in (record.e2e_s, record.ttft_s):
        if duration is not None:
            return record.start_epoch + duration
    return record.start_epoch


def input_tokens(record: RequestRecord) -> int:
    """The server's prompt token count when it sent one, else what the prompt was built to have."""
    if record.usage_input_tokens is not None:
        return record.usage_input_tokens
    return record.expected_input_tokens or 0


def error_kind(record: RequestRecord) -> str:
    """A failed request's reason, for counting: its error text, or the HTTP status it got."""
    if record.error:
        return record.error
    if record.status is None:
        return "no answer"
    if record.status != 200:
        return f"HTTP {record.status}"
    return "no generated text"


def check_goodput(goodput: Mapping[str, float] | None) -> dict[str, float] | None:
    """Validate a vLLM-style goodput spec ({"ttft": ms, "tpot": ms, "e2el": ms}, any subset)."""
    if goodput is None:
        return None
    unknown = sorted(set(goodput) - set(GOODPUT_METRICS))
    if unknown:
        raise ValueError(f"unknown goodput metric(s) {', '.join(unknown)}: use {', '.join(GOODPUT_METRICS)}")
    return {k: float(v) for k, v in goodput.items()}


def is_good(record: RequestRecord, goodput: Mapping[str, float]) -> bool:
    """Whether a request met every per-request objective, compared as vLLM does (slo_ms/1000 >= value_s)."""
    if not record.ok:
        return False
    values: dict[str, float | None] = {
        "ttft": record.ttft_s,
        "tpot": record.tpot_s if record.output_tokens > 1 else 0.0,
        "e2el": record.e2e_s,
    }
    for metric, limit_ms in goodput.items():
        value = values[metric]
        if value is None or limit_ms / 1000 < value:
            return False
    return True


def max_concurrent(records: Iterable[RequestRecord]) -> int:
    """The most requests in flight at once: a sweep over half-open [send, end) intervals (vLLM's)."""
    events: list[tuple[float, int]] = []
    for record in records:
        end = request_end(record)
        if end > record.start_epoch:
            events += [(record.start_epoch, 1), (end, -1)]
    events.sort()  # at equal times the -1 sorts first: an interval ending frees its slot
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


# ---------------------------------------------------------------------------------------------
# Per step


@dataclass(frozen=True)
class StepStats:
    """Everything the gate checks and the report prints about one step of a run."""

    step: str  # the record's step label ("concurrency=8"; "" outside a stepped run)
    key: str  # the step's variable ("concurrency"), or the label when it has no number
    value: float | None  # the step's number (8.0), None when the label has none
    sent: int
    completed: int
    failed: int
    errors: dict[str, int]  # failed requests by reason
    no_answer: int  # failed requests that got no HTTP answer at all (refused, reset, timed out)
    window_start: float | None  # first send in the step (epoch seconds)
    window_end: float | None  # last completion in the step (epoch seconds)
    total_input_tokens: int  # of completed requests
    total_output_tokens: int  # of completed requests
    good: int | None  # completed requests that met every goodput objective; None without objectives
    max_concurrent_requests: int
    ttft: Distribution  # ms, per request
    tpot: Distribution  # ms, per request
    itl: Distribution  # ms, every gap pooled
    e2el: Distribution  # ms, per request
    dispatch_lag: Distribution | None  # ms, every sent request with an intended time; None in closed loop

    @property
    def label(self) -> str:
        """The step as a table shows it: its number ("8"), else its label, "all" for an unstepped run."""
        if self.value is not None:
            return format_number(self.value)
        return self.step or "all"

    @property
    def duration_s(self) -> float:
        if self.window_start is None or self.window_end is None:
            return 0.0
        return self.window_end - self.window_start

    @property
    def error_rate(self) -> float:
        return self.failed / self.sent if self.sent else 0.0

    def _per_s(self, amount: float) -> float:
        return amount / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def request_throughput(self) -> float:
        return self._per_s(self.completed)

    @property
    def output_throughput(self) -> float:
        return self._per_s(self.total_output_tokens)

    @property
    def total_token_throughput(self) -> float:
        return self._per_s(self.total_input_tokens + self.total_output_tokens)

    @property
    def request_goodput(self) -> float | None:
        return None if self.good is None else self._per_s(self.good)

    def metric(self, name: str) -> Distribution:
        """A latency distribution by vLLM's name: ttft, tpot, itl or e2el."""
        if name not in LATENCY_METRICS:
            raise KeyError(name)
        return getattr(self, name)


def format_number(value: float) -> str:
    """8.0 -> "8", 2.5 -> "2.5": step values as the user wrote them."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def step_stats(
    step: str,
    records: Sequence[RequestRecord],
    goodput: Mapping[str, float] | None = None,
    levels: Sequence[float] = PERCENTILES,
) -> StepStats:
    """Statistics of one step's records; `goodput` in vLLM's form ({"ttft": ms, ...}) or None."""
    spec = check_goodput(goodput)
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    key, value = parse_step(step)
    lags = [r.dispatch_lag_s * 1000 for r in records if r.dispatch_lag_s is not None]
    return StepStats(
        step=step, key=key, value=value,
        sent=len(records), completed=len(ok), failed=len(failed),
        errors=dict(sorted(Counter(error_kind(r) for r in failed).items())),
        no_answer=sum(1 for r in failed if r.status is None),
        window_start=min((r.start_epoch for r in records), default=None),
        window_end=max((request_end(r) for r in records), default=None),
        total_input_tokens=sum(input_tokens(r) for r in ok),
        total_output_tokens=sum(r.output_tokens for r in ok),
        good=None if spec is None else sum(1 for r in ok if is_good(r, spec)),
        max_concurrent_requests=max_concurrent(records),
        ttft=Distribution.of([r.ttft_s * 1000 for r in ok if r.ttft_s is not None], levels),
        tpot=Distribution.of([r.tpot_s * 1000 for r in ok if r.tpot_s is not None], levels),
        itl=Distribution.of([gap * 1000 for r in ok for gap in r.itl_s], levels),
        e2el=Distribution.of([r.e2e_s * 1000 for r in ok if r.e2e_s is not None], levels),
        dispatch_lag=Distribution.of(lags, levels) if lags else None,
    )


@dataclass(frozen=True)
class Measured:
    """The records a run's statistics use, and how many were left out and why."""

    records: list[RequestRecord]
    warmup: int  # sent during a step's warm-up ("warmup:<step>")
    outside: int  # sent outside every step ("") in a stepped run


def measured(records: Iterable[RequestRecord]) -> Measured:
    """Leave out warm-up requests, and in a stepped run those sent outside every step.

    Warm-up carries cold caches and ramping users, so its latencies are not the step's; a request
    labelled "" in a run that has steps went out before the first or after the last. In a run
    without steps every record is labelled "" and all of them count.
    """
    records = list(records)
    warmup = [r for r in records if r.step.startswith(WARMUP_PREFIX)]
    rest = [r for r in records if not r.step.startswith(WARMUP_PREFIX)]
    stepped = any(r.step for r in rest)
    kept = [r for r in rest if r.step or not stepped]
    return Measured(records=kept, warmup=len(warmup), outside=len(rest) - len(kept))


def group_by_step(records: Iterable[RequestRecord]) -> dict[str, list[RequestRecord]]:
    """Records by their step, steps in the order they first appear."""
    groups: dict[str, list[RequestRecord]] = {}
    for record in records:
        groups.setdefault(record.step, []).append(record)
    return groups


def run_stats(
    records: Iterable[RequestRecord],
    goodput: Mapping[str, float] | None = None,
    levels: Sequence[float] = PERCENTILES,
) -> list[StepStats]:
    """Statistics of every measured step (see `measured`), in ascending step value when every step has a
    number, else in run order. Ascending value is what the seed's table and the headline read.
    """
    kept = measured(records).records
    steps = [step_stats(step, group, goodput, levels) for step, group in group_by_step(kept).items()]
    if steps and all(s.value is not None for s in steps) and len({s.key for s in steps}) == 1:
        return sorted(steps, key=lambda s: (s.value, s.step))
    return sorted(steps, key=lambda s: (s.window_start if s.window_start is not None else math.inf, s.step))


# ---------------------------------------------------------------------------------------------
# vLLM's result JSON


def summary_json(stats: StepStats, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One step as `vllm bench serve --save-result` writes a run, so vLLM's sweep and plot tools read it.

    `metadata` (date, backend, model_id, ...) goes first, as vLLM's top-level fields do. The step's
    own `max_concurrency` / `request_rate` come from a "concurrency=N" / "rate=R" step label; a
    closed-loop run's request rate is "inf", as vLLM writes it. Fields vLLM does not have (`step`,
    `error_rate`, `errors`, dispatch lag) are added under their own names.
    """
    result: dict[str, Any] = dict(metadata or {})
    result.update({
        "step": stats.step,
        "max_concurrency": int(stats.value) if stats.key == "concurrency" and stats.value is not None else None,
        "request_rate": stats.value if stats.key == "rate" and stats.value is not None else "inf",
        "duration": stats.duration_s,
        "completed": stats.completed,
        "failed": stats.failed,
        "error_rate": stats.error_rate,
        "errors": dict(stats.errors),
        "total_input_tokens": stats.total_input_tokens,
        "total_output_tokens": stats.total_output_tokens,
        "request_throughput": stats.request_throughput,
        "request_goodput": stats.request_goodput,
        "output_throughput": stats.output_throughput,
        "total_token_throughput": stats.total_token_throughput,
        "max_concurrent_requests": stats.max_concurrent_requests,
    })
    for name in LATENCY_METRICS:
        result.update(_metric_fields(name, stats.metric(name)))
    if stats.dispatch_lag is not None:
        result.update(_metric_fields("dispatch_lag", stats.dispatch_lag))
    return result


def _metric_fields(name: str, dist: Distribution) -> dict[str, Any]:
    fields: dict[str, Any] = {
        f"mean_{name}_ms": dist.mean, f"median_{name}_ms": dist.median, f"std_{name}_ms": dist.std,
    }
    for q, value in dist.percentiles.items():
        fields[f"p{percentile_word(q)}_{name}_ms"] = value
    if dist.n == 0:
        fields.update({f"p{percentile_word(q)}_{name}_ms": None for q in PERCENTILES})
    return fields
