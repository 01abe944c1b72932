"""How exactly the users time tokens: their records against the simulator's token log.

`gpufleet sim serve` logs, for every streamed token, the time it finished writing it to the socket
(`GET /admin/token-log`, time.monotonic()). On Linux CPython, `time.perf_counter()` (the users'
clock) and `time.monotonic()` are the same CLOCK_MONOTONIC, so for a load generator on the same
host the two are directly comparable: the measured arrival of a chunk minus the written time of
its first token is the harness's own delay (socket, scheduling, the load generator's CPU).

Errors per record (needs `extra["response_id"]`, `extra["sent_perf_counter"]`, `extra["text_events"]`):
- TTFT: measured TTFT - (first text token written - send time);
- ITL: each measured gap - the gap between the written times of the first tokens of the two chunks
  (a chunk that holds several tokens is compared by its first token, so coalescing shows as error).
The first token's write also carries chat's role chunk, and vLLM's EOS token (empty text) is not
a text token: a record whose stream ended with "stop" drops the log's last token.

On a virtual machine the hypervisor sometimes runs something else on a vCPU that has work
(steal time); whatever arrives meanwhile is stamped late by any client. `StealWatch` records
when that happened, and `compare` can leave those moments out (and counts what it left out).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gpufleet.loadtest.gate import GateRules
from gpufleet.loadtest.record import RequestRecord

Window = tuple[float, float]  # (start, end) on CLOCK_MONOTONIC
# A calibration's TTFT p99 needs the gate's 100 samples; ITL, counted by the thousand, keeps 50
# beyond its p99 (5,000), so that no one stray sample is the p99.
MIN_TTFT_SAMPLES = GateRules().min_tail_samples()
MIN_ITL_SAMPLES = GateRules(tail_samples=50).min_tail_samples()


@dataclass
class TimingErrors:
    """Measured minus server-written, in ms, over the records that could be matched."""

    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)  # each chunk's arrival - its first token's write
    matched: int = 0
    unmatched: int = 0  # ok records without a token-log entry (dropped from the log, or not the simulator)
    inconsistent: int = 0  # ok records whose text events do not match the logged tokens
    coalesced_chunks: int = 0  # chunks that held more than one token
    excluded: int = 0  # TTFT and ITL samples left out: they fell in an excluded window

    def pooled(self, other: TimingErrors) -> TimingErrors:
        """These errors and `other`'s as one sample: runs on a noisy host each keep only their
        undisturbed moments, and together they reach the count a p99 needs."""
        return TimingErrors(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def enough_for_p99(self) -> bool:
        """Samples enough for a TTFT and an ITL p99 (MIN_TTFT_SAMPLES, MIN_ITL_SAMPLES)."""
        return len(self.ttft_ms) >= MIN_TTFT_SAMPLES and len(self.itl_ms) >= MIN_ITL_SAMPLES

    def summary(self) -> dict[str, Any]:
        def stats(values: list[float]) -> dict[str, float]:
            absolute = [abs(v) for v in values]
            mean = sum(values) / len(values) if values else math.nan
            return {"n": len(values), "p50_abs": percentile(absolute, 50), "p99_abs": percentile(absolute, 99),
                    "max_abs": max(absolute, default=math.nan), "mean": mean}

        return {"ttft_ms": stats(self.ttft_ms), "itl_ms": stats(self.itl_ms), "lag_ms": stats(self.lag_ms),
                "matched": self.matched, "unmatched": self.unmatched, "inconsistent": self.inconsistent,
                "coalesced_chunks": self.coalesced_chunks, "excluded": self.excluded}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def text_token_times(entry: Mapping[str, Any]) -> list[float]:
    """The written times of a logged request's text-carrying tokens (the EOS of a "stop" dropped)."""
    written = list(entry.get("written", ()))
    if entry.get("finish_reason") == "stop" and written:
        written.pop()
    return written


def chunk_arrivals(record: RequestRecord) -> list[float]:
    """When each text-carrying chunk arrived, on the load generator's perf_counter clock."""
    sent = float(record.extra["sent_perf_counter"])
    if record.ttft_s is None:
        return []
    arrivals = [sent + record.ttft_s]
    for gap in record.itl_s:
        arrivals.append(arrivals[-1] + gap)
    return arrivals


class _Windows:
    """Whether a moment lies in any of some (start, end) windows."""

    def __init__(self, windows: Iterable[Window]) -> None:
        merged: list[list[float]] = []
        for start, end in sorted(windows):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [w[0] for w in merged]
        self.ends = [w[1] for w in merged]

    def __contains__(self, moment: float) -> bool:
        i = bisect.bisect_right(self.starts, moment) - 1
        return i >= 0 and moment <= self.ends[i]


def compare(records: Iterable[RequestRecord], token_log: Mapping[str, Mapping[str, Any]],
            exclude: Sequence[Window] = ()) -> TimingErrors:
    """Each successful record's TTFT and ITL errors against `token_log` (entries by request id).

    A sample is left out (and counted in `excluded`) when a token it compares was written or
    arrived inside one of the `exclude` windows.
    """
    errors = TimingErrors()
    windows = _Windows(exclude)
    for record in records:
        if not record.ok:
            continue
        entry = token_log.get(str(record.extra.get("response_id")))
        if entry is None:
            errors.unmatched += 1
            continue
        _compare_one(record, entry, errors, windows)
    return errors


def _compare_one(record: RequestRecord, entry: Mapping[str, Any], errors: TimingErrors, windows: _Windows) -> None:
    written = text_token_times(entry)
    events = record.extra.get("chunk_events") or [1] * record.content_chunks
    if record.extra.get("text_events") != len(written) or sum(events) != len(written):
        errors.inconsistent += 1
        return
    errors.matched += 1
    firsts: list[float] = []
    at = 0
    for count in events:
        firsts.append(written[at])
        at += count
        errors.coalesced_chunks += count > 1
    arrivals = chunk_arrivals(record)
    disturbed = [first in windows or arrived in windows for first, arrived in zip(firsts, arrivals, strict=True)]
    sent = float(record.extra["sent_perf_counter"])
    assert record.ttft_s is not None
    if disturbed[0]:
        errors.excluded += 1
    else:
        errors.ttft_ms.append((record.ttft_s - (firsts[0] - sent)) * 1e3)
    for i, gap in enumerate(record.itl_s, start=1):
        if disturbed[i] or disturbed[i - 1]:
            errors.excluded += 1
        else:
            errors.itl_ms.append((gap - (firsts[i] - firsts[i - 1])) * 1e3)
    errors.lag_ms.extend((arrived - first) * 1e3
                         for arrived, first, bad in zip(arrivals, firsts, disturbed, strict=True) if not bad)


# ---- steal time --------------------------------------------------------------------------------


def steal_ticks(cpus: Iterable[int], stat: Path = Path("/proc/stat")) -> dict[int, int]:
    """Each CPU's steal time so far (the hypervisor ran something else while it had work), in ticks."""
    wanted = set(cpus)
    found: dict[int, int] = {}
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in wanted:
            found[int(name[3:])] = int(fields[7])
    return found


class StealWatch:
    """Samples the steal time of some CPUs every `interval_s` in a thread; the windows that had any.

    /proc/stat counts steal in 10 ms ticks, and a steal shorter than that shows only once the
    CPU's total crosses the next tick: a window is the interval in which the count moved and the
    interval before it, widened by `margin_s` on both sides (a token delayed near an edge).
    """

    def __init__(self, cpus: Iterable[int], interval_s: float = 0.1, margin_s: float = 0.02,
                 stat: Path = Path("/proc/stat"), clock: Callable[[], float] = time.monotonic) -> None:
        self.cpus = sorted(set(cpus))
        self.interval_s = interval_s
        self.margin_s = margin_s
        self.stat = stat
        self.clock = clock
        self.windows: list[Window] = []
        self.samples = 0  # intervals sampled
        self.stolen_ticks = 0
        self._last: tuple[dict[int, int], float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StealWatch:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Read the counters now; the interval since the last reading is a window if steal moved in it."""
        now, now_at = steal_ticks(self.cpus, self.stat), self.clock()
        if self._last is not None:
            last, last_at = self._last
            stolen = sum(now[cpu] - last.get(cpu, now[cpu]) for cpu in now)
            self.samples += 1
            if stolen > 0:
                self.stolen_ticks += stolen
                self.windows.append((last_at - self.interval_s - self.margin_s, now_at + self.margin_s))
        self._last = (now, now_at)

    @property
    def disturbed_share(self) -> float:
        """The share of the sampled intervals that had steal."""
        return len(self.windows) / self.samples if self.samples else 0.0
