"""Load runs in simulated time: the real engine model, no waiting.

`run_closed_loop` and `run_open_loop` drive `EngineCore` (the same scheduler, profile and
frontend the real-time engine uses) with an event loop over simulated seconds, so a minute of
load at 64 concurrent streams takes a fraction of a second. Calibration fits profiles with it,
tests check the model against the seed measurements with it, and capacity questions ("what
TTFT at 48 users?") can be answered with it before any hardware exists.

Closed loop: each of `concurrency` clients sends its next request the moment its previous one
finishes (its last token is out), after a random 0-10 ms of client think time. Clients start
spread evenly over `ramp_s` (by default one estimated request duration), as a load tool's spawn
rate does; clients that start together would stay in lock step forever, which no real load
does. The measured window starts when every client has finished one request (or at
`warmup_s`), and load continues past its end so the last measured requests see the same load
as the first.
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any

from gpufleet.sim.engine import EngineCore
from gpufleet.sim.profile import Profile
from gpufleet.sim.scheduler import SchedRequest
from gpufleet.sim.types import GenerationParams, SimConfig


@dataclass(frozen=True)
class LoadResult:
    """What a load tool reports of a run (seconds; tokens/s), over the measured window."""

    concurrency: int | None  # closed loop
    rate: float | None  # open loop, requests/s
    requests: int  # measured requests (arrived in the window)
    window_s: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_mean_s: float
    itl_p99_s: float
    tpot_mean_s: float
    e2e_mean_s: float
    e2e_p99_s: float
    output_tokens_per_s: float
    preemptions: int  # over the whole run
    max_waiting: int  # longest waiting queue seen at a step
    steps: int
    extra: dict[str, float] = field(default_factory=dict, compare=False)

    def row(self) -> dict[str, float]:
        """The headline numbers in the units people quote (ms, tokens/s)."""
        return {
            "ttft_mean_ms": self.ttft_mean_s * 1e3,
            "ttft_p99_ms": self.ttft_p99_s * 1e3,
            "itl_mean_ms": self.itl_mean_s * 1e3,
            "itl_p99_ms": self.itl_p99_s * 1e3,
            "tpot_ms": self.tpot_mean_s * 1e3,
            "e2e_mean_s": self.e2e_mean_s,
            "output_tokens_per_s": self.output_tokens_per_s,
        }


# A real client takes a moment between reading one answer's last token and sending the next
# request (parsing, bookkeeping, the connection pool). Beyond realism it matters for the model:
# clients in perfect lock step keep whatever phase pattern they start with forever, so tiny
# parameter changes flip TTFTs between patterns; a few ms of random think time averages them.
CLIENT_THINK_S = 0.01


def estimate_request_s(profile: Profile, concurrency: int, prompt_tokens: int, output_tokens: int) -> float:
    """A request's duration in a steady closed loop, from the profile alone: its own prefill and
    decode steps, plus the mixed steps in which the other clients' prompts are prefilled."""
    c = concurrency
    context = int(c * (prompt_tokens + output_tokens / 2))
    decode = profile.step_time(c, 0, context)
    mixed = profile.step_time(c - 1, prompt_tokens, context)
    others = (c - 1) * (mixed - profile.step_time(c - 1, 0, context)) if c > 1 else 0.0
    return profile.request_overhead_s + mixed + max(0, output_tokens - 1) * decode + others


def default_ramp_s(profile: Profile, concurrency: int, prompt_tokens: int, output_tokens: int) -> float:
    """One estimated request duration, to two significant digits.

    Clients in a closed loop with equal request lengths keep the phases they start with, so the
    mean TTFT depends on the start pattern; rounding the ramp keeps that pattern fixed while a
    calibration nudges the profile, which keeps the fit's objective smooth.
    """
    estimate = estimate_request_s(profile, concurrency, prompt_tokens, output_tokens)
    if estimate <= 0:
        return 0.0
    digits = 1 - math.floor(math.log10(estimate))
    return round(estimate, digits)


class _Run:
    """The simulated-time event loop shared by the closed- and open-loop drivers."""

    def __init__(self, config: SimConfig, profile: Profile):
        self.core = EngineCore(config, profile)
        self.t = 0.0
        self.sends: list[tuple[float, int, int]] = []  # (time, order, client)
        self._order = 0
        self.requests: list[tuple[SchedRequest, int]] = []  # every request sent, with its client
        self.max_waiting = 0
        self.steps = 0

    def send_at(self, when: float, client: int) -> None:
        heapq.heappush(self.sends, (when, self._order, client))
        self._order += 1

    def loop(self, make: Callable[[int, float], tuple[str, GenerationParams]],
             on_finish: Callable[[SchedRequest, int, float], None], done: Callable[[], bool]) -> None:
        core, sends = self.core, self.sends
        scheduler = core.scheduler
        while not done():
            while sends and sends[0][0] <= self.t:
                when, _, client = heapq.heappop(sends)
                request_id, params = make(client, when)
                req = core.submit(request_id, params, when)
                req.owner = client
                self.requests.append((req, client))
            plan = core.begin_step(self.t)
            if plan is None:
                upcoming = [x for x in (sends[0][0] if sends else None, core.next_ready()) if x is not None]
                if not upcoming:
                    return
                self.t = max(self.t, min(upcoming))
                continue
            if len(scheduler.waiting) > self.max_waiting:
                self.max_waiting = len(scheduler.waiting)
            emissions = core.finish_step(plan)
            self.steps += 1
            self.t = plan.end
            for req, _, at, reason in emissions:
                if reason is not None:
                    on_finish(req, req.owner, at)  # type: ignore[arg-type]

    def result(self, measured: list[SchedRequest], start: float, end: float, concurrency: int | None,
               rate: float | None) -> LoadResult:
        if end <= start or not measured:
            raise ValueError(f"no measured requests in the window [{start:.3f}, {end:.3f}] s: run longer")
        tokens = 0
        for req, _ in self.requests:
            times = req.timing.token_times
            if times and times[-1] >= start and times[0] < end:
                tokens += bisect_left(times, end) - bisect_left(times, start)
        ttfts, e2es, tpots, gaps = [], [], [], []
        for req in measured:
            timing = req.timing
            times = timing.token_times
            ttfts.append(times[0] - timing.arrival)
            e2es.append(times[-1] - timing.arrival)
            if len(times) > 1:
                tpots.append((times[-1] - times[0]) / (len(times) - 1))
                gaps.extend(b - a for a, b in pairwise(times))
        ttfts.sort()
        e2es.sort()
        gaps.sort()
        return LoadResult(
            concurrency=concurrency,
            rate=rate,
            requests=len(measured),
            window_s=end - start,
            ttft_mean_s=_mean(ttfts),
            ttft_p50_s=percentile(ttfts, 50),
            ttft_p99_s=percentile(ttfts, 99),
            itl_mean_s=_mean(gaps),
            itl_p99_s=percentile(gaps, 99),
            tpot_mean_s=_mean(tpots),
            e2e_mean_s=_mean(e2es),
            e2e_p99_s=percentile(e2es, 99),
            output_tokens_per_s=tokens / (end - start),
            preemptions=self.core.scheduler.preemptions_total,
            max_waiting=self.max_waiting,
            steps=self.steps,
            extra={"window_start_s": start, "window_end_s": end},
        )


def run_closed_loop(
    config: SimConfig,
    profile: Profile,
    concurrency: int,
    prompt_tokens: int,
    output_tokens: int,
    duration_s: float | None = None,
    num_requests: int | None = None,
    warmup_s: float | None = None,
    ignore_eos: bool = True,
    seed: int = 0,
    ramp_s: float | None = None,
    min_tokens: int = 0,
    think_s: float = CLIENT_THINK_S,
) -> LoadResult:
    """`concurrency` clients in a closed loop, measured over a window (see the module docstring).

    Give `duration_s` (the window ends then; requests that arrived before it are followed to
    the end) or `num_requests` (the first that many requests arriving after the warm-up are
    measured; the window ends when the last of them finishes). Neither: 4 per client.
    `warmup_s` None starts the window when every client has finished its first request.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if duration_s is None and num_requests is None:
        num_requests = 4 * concurrency
    run = _Run(replace(config, seed=seed), profile)
    params = GenerationParams(prompt_tokens=prompt_tokens, max_tokens=output_tokens, min_tokens=min_tokens,
                              ignore_eos=ignore_eos)
    ramp = default_ramp_s(profile, concurrency, prompt_tokens, output_tokens) if ramp_s is None else ramp_s
    jitter = random.Random(seed)
    for client in range(concurrency):
        run.send_at(ramp * client / concurrency, client)
    state: dict[str, Any] = {"sent": 0, "window_start": warmup_s, "window_end": None}
    first_seen: set[int] = set()
    measured: list[SchedRequest] = []
    pending_measured: set[str] = set()

    def make(client: int, when: float) -> tuple[str, GenerationParams]:
        request_id = f"c{client}-r{state['sent']}"
        state["sent"] += 1
        start = state["window_start"]
        counted = start is not None and when >= start and (
            (duration_s is not None and when < duration_s)
            or (num_requests is not None and len(measured) + len(pending_measured) < num_requests)
        )
        if counted:
            pending_measured.add(request_id)
        return request_id, params

    def on_finish(req: SchedRequest, client: int, at: float) -> None:
        if client not in first_seen:
            first_seen.add(client)
            if warmup_s is None and len(first_seen) == concurrency:
                state["window_start"] = at
        if req.id in pending_measured:
            pending_measured.discard(req.id)
            measured.append(req)
            if num_requests is not None and len(measured) == num_requests:
                state["window_end"] = at
        run.send_at(at + jitter.uniform(0.0, think_s) if think_s > 0 else at, client)

    def done() -> bool:
        if duration_s is not None:
            return run.t >= duration_s and not pending_measured and state["window_start"] is not None
        return state["window_end"] is not None

    run.loop(make, on_finish, done)
    start = state["window_start"]
    if start is None:
        raise ValueError("the run ended before every client finished a request: run longer")
    end = duration_s if duration_s is not None else state["window_end"]
    measured.sort(key=lambda r: r.timing.arrival)
    return run.result(measured, float(start), float(end), concurrency, None)


def run_open_loop(
    config: SimConfig,
    profile: Profile,
    rate: float,
    prompt_tokens: int,
    output_tokens: int,
    duration_s: float,
    warmup_s: float = 0.0,
    ignore_eos: bool = True,
    seed: int = 0,
    min_tokens: int = 0,
) -> LoadResult:
    """Poisson arrivals at `rate` requests/s for `duration_s`; requests arriving from `warmup_s`
    on are measured and followed to their end; throughput is counted over [warmup_s, duration_s]."""
    if rate <= 0 or duration_s <= warmup_s:
        raise ValueError("rate must be > 0 and duration_s > warmup_s")
    run = _Run(replace(config, seed=seed), profile)
    params = GenerationParams(prompt_tokens=prompt_tokens, max_tokens=output_tokens, min_tokens=min_tokens,
                              ignore_eos=ignore_eos)
    rng = random.Random(seed)
    t, n = 0.0, 0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        run.send_at(t, n)
        n += 1
    measured_ids: set[str] = set()
    measured: list[SchedRequest] = []
    outstanding = {"count": 0}

    def make(client: int, when: float) -> tuple[str, GenerationParams]:
        request_id = f"r{client}"
        if when >= warmup_s:
            measured_ids.add(request_id)
            outstanding["count"] += 1
        return request_id, params

    def on_finish(req: SchedRequest, client: int, at: float) -> None:
        if req.id in measured_ids:
            measured.append(req)
            outstanding["count"] -= 1

    def done() -> bool:
        return not run.sends and outstanding["count"] == 0 and run.t >= warmup_s and bool(measured_ids)

    run.loop(make, on_finish, done)
    measured.sort(key=lambda r: r.timing.arrival)
    result = run.result(measured, warmup_s, duration_s, None, rate)
    return result


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
