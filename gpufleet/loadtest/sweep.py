"""Find the highest load that meets every SLO: over a list of levels, then by bisection.

The headline number of an SLO report is the highest concurrency or request rate at which every
SLO still holds (vLLM's `bench sweep serve_sla` bisects the same way). The search is pure logic:
it is given `run(value) -> bool`, which runs one load test at `value` and says whether every SLO
was met, so it is tested with a fake and driven by whatever runs Locust.

It assumes the SLO verdict is monotone in the load: once a level fails, higher levels are not
tried; the answer is refined between the last level that passed and the first that failed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Generic, TypeVar

from gpufleet.loadtest.schedule import SEED_CONCURRENCY

V = TypeVar("V", int, float)


@dataclass(frozen=True)
class SweepResult(Generic[V]):
    """`best`: the highest value that passed (None: even the lowest failed); `first_fail`: the lowest
    value that failed (None: every level passed, so the ceiling is above the list); `trials`: every
    run in the order it was made, as (value, passed)."""

    best: V | None
    first_fail: V | None
    trials: tuple[tuple[V, bool], ...]


def _check_levels(levels: Sequence[float]) -> None:
    if not levels:
        raise ValueError("the sweep needs at least one level")
    if any(level <= 0 for level in levels):
        raise ValueError(f"levels must be > 0, got {list(levels)}")
    if any(b <= a for a, b in pairwise(levels)):
        raise ValueError(f"levels must be strictly increasing, got {list(levels)}")


def _search(run: Callable[[V], bool], levels: Sequence[V], midpoint: Callable[[V, V], V | None]
            ) -> SweepResult[V]:
    trials: list[tuple[V, bool]] = []

    def attempt(value: V) -> bool:
        passed = bool(run(value))
        trials.append((value, passed))
        return passed

    best: V | None = None
    first_fail: V | None = None
    for level in levels:
        if not attempt(level):
            first_fail = level
            break
        best = level
    if best is None or first_fail is None:
        return SweepResult(best, first_fail, tuple(trials))
    while (mid := midpoint(best, first_fail)) is not None:
        if attempt(mid):
            best = mid
        else:
            first_fail = mid
    return SweepResult(best, first_fail, tuple(trials))


def sweep_concurrency(run: Callable[[int], bool], levels: Sequence[int] = SEED_CONCURRENCY) -> SweepResult[int]:
    """The highest concurrency meeting every SLO: `levels` in order, then integer bisection."""
    _check_levels(levels)
    if any(not isinstance(level, int) for level in levels):
        raise ValueError(f"concurrency levels must be integers, got {list(levels)}")

    def midpoint(low: int, high: int) -> int | None:
        return None if high - low <= 1 else (low + high) // 2

    return _search(run, levels, midpoint)


def sweep_rate(run: Callable[[float], bool], rates: Sequence[float], resolution: float = 0.05
               ) -> SweepResult[float]:
    """The highest request rate meeting every SLO: `rates` in order, then bisection until the gap
    between the passing and the failing rate is at most `resolution` x the failing rate."""
    _check_levels(rates)
    if not 0 < resolution < 1:
        raise ValueError(f"resolution is a fraction of the rate, in (0, 1); got {resolution}")

    def midpoint(low: float, high: float) -> float | None:
        return None if high - low <= resolution * high else (low + high) / 2

    return _search(run, [float(rate) for rate in rates], midpoint)
