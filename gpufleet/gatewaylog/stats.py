"""What the access log has said so far: request counts and latency histograms, and the follower's state.

The follower thread writes, scrapes read: every change and every `snapshot` takes one lock, and a
snapshot is a copy, so a scrape never sees a request counted in one metric and not yet in another
(the request counter and the duration histogram's count always agree).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.gatewaylog.metrics import REQUEST_BUCKETS, UPSTREAM_HEADER_BUCKETS
from gpufleet.gatewaylog.parser import AccessRecord


@dataclass
class Histogram:
    """A Prometheus histogram's state: counts per bucket (not cumulative; the last is +Inf) and the sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # a value equal to a bound is in it (le)
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """[(le, count of values <= le)], ending with (inf, count), as exposition wants them."""
        running, out = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total)


@dataclass
class Snapshot:
    """A consistent copy of everything the collector renders."""

    requests: dict[tuple[str, str], int]  # (status, client) -> requests
    request_duration: Histogram
    upstream_header: Histogram
    retries: int
    lines: int
    malformed: int
    rotations: dict[str, int]  # kind ("rename", "truncate") -> times
    up: bool
    last_line_at: float | None  # Unix time


class GatewayStats:
    """The counters behind the metrics, fed one access record (or malformed line) at a time."""

    def __init__(
        self,
        request_buckets: Sequence[float] = REQUEST_BUCKETS,
        header_buckets: Sequence[float] = UPSTREAM_HEADER_BUCKETS,
    ) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        self._duration = Histogram(tuple(request_buckets))
        self._header = Histogram(tuple(header_buckets))
        self._retries = 0
        self._lines = 0
        self._malformed = 0
        self._rotations = {"rename": 0, "truncate": 0}
        self._discarded = 0
        self._up = False
        self._last_line_at: float | None = None

    def record(self, record: AccessRecord, read_at: float) -> None:
        """One well-formed line: the request it logs."""
        with self._lock:
            self._lines += 1
            self._last_line_at = read_at
            key = (record.status, record.client)
            self._requests[key] = self._requests.get(key, 0) + 1
            self._duration.observe(record.request_time)
            if record.upstream_header_time is not None:
                self._header.observe(record.upstream_header_time)
            if record.retried:
                self._retries += 1

    def malformed(self, read_at: float) -> None:
        """One line that is not an access record: counted, and nothing else."""
        with self._lock:
            self._lines += 1
            self._malformed += 1
            self._last_line_at = read_at

    def follower_state(self, *, up: bool, renames: int, truncations: int, discarded: int) -> None:
        """The follower's own counters (it counts; this copies them under the lock).

        Lines the follower dropped unfinished or overlong count as lines read and as malformed.
        """
        with self._lock:
            new_drops = discarded - self._discarded
            if new_drops > 0:
                self._lines += new_drops
                self._malformed += new_drops
                self._discarded = discarded
            self._up = up
            self._rotations = {"rename": renames, "truncate": truncations}

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                requests=dict(self._requests),
                request_duration=self._duration.copy(),
                upstream_header=self._header.copy(),
                retries=self._retries,
                lines=self._lines,
                malformed=self._malformed,
                rotations=dict(self._rotations),
                up=self._up,
                last_line_at=self._last_line_at,
            )
