"""Every RequestRecord of a run, gathered where the gate and the report run: the master, or the one process.

Locust's own statistics are rounded into buckets and, in distributed mode, reset on the workers
after every report; the SLO gate computes exact percentiles from raw records instead, so those
must all reach the master. A worker batches its records as dicts and sends them with
`runner.send_message(MESSAGE, [...])` at most once a second (`flush_due`) and whenever a test
stops or the process quits (`flush`), so nothing finished is left behind; the master registers
the message and appends what arrives. A local (single-process) runner appends directly.

This module does not import Locust: users.py wires it to the runner and Locust's events, and the
unit tests drive it with a fake runner.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from gpufleet.loadtest.record import RequestRecord

T = TypeVar("T")
C = TypeVar("C", bound="Collector[Any]")
MESSAGE = "gpufleet_records"
FLUSH_INTERVAL_S = 1.0
MASTER, WORKER, LOCAL = "master", "worker", "local"

log = logging.getLogger(__name__)

# environment -> message -> its collector (the records', the CPU samples')
_COLLECTORS: weakref.WeakKeyDictionary[Any, dict[str, Collector[Any]]] = weakref.WeakKeyDictionary()


class Collector(Generic[T]):
    """One process's side of a flow of items to the master, by role: keep (master, local) or batch and
    send (worker). Items travel as `encode(item)` in messages named `message` and are rebuilt with
    `decode`; RecordCollector carries the requests' records, the CPU sampler (cpu.py) its samples."""

    def __init__(self, role: str, send: Callable[[str, Any], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, interval_s: float = FLUSH_INTERVAL_S, *,
                 message: str, encode: Callable[[T], Any], decode: Callable[[Any], T]) -> None:
        if role not in (MASTER, WORKER, LOCAL):
            raise ValueError(f"unknown role {role!r}")
        if role == WORKER and send is None:
            raise ValueError("a worker needs `send` (runner.send_message)")
        self.role = role
        self.send = send
        self.clock = clock
        self.interval_s = interval_s
        self.message = message
        self.encode = encode
        self.decode = decode
        self.records: list[T] = []  # master and local: the whole run's items
        self.batch: list[Any] = []  # worker: not yet sent
        self.sent = 0  # worker: records sent so far
        self.last_flush = clock()

    def add(self, record: T) -> None:
        """A finished request's record (or another item): kept here, or queued for the master (`flush_due`)."""
        if self.role == WORKER:
            self.batch.append(self.encode(record))
        else:
            self.records.append(record)

    def flush_due(self) -> bool:
        """Send the batch if the interval has passed since the last send (call it about once a second)."""
        if self.clock() - self.last_flush < self.interval_s:
            return False
        return self.flush()

    def flush(self) -> bool:
        """Send whatever is batched now (a worker's test stop and quit); True if anything went."""
        self.last_flush = self.clock()
        if self.role != WORKER or not self.batch:
            return False
        batch, self.batch = self.batch, []
        assert self.send is not None
        try:
            self.send(self.message, batch)
        except Exception:
            self.batch = batch + self.batch  # keep them for the next try rather than lose them
            log.exception("could not send %d %s items to the master; will retry", len(batch), self.message)
            return False
        self.sent += len(batch)
        return True

    def receive(self, data: Any) -> int:
        """The master's handler of a worker's batch: append its records; how many arrived."""
        if not isinstance(data, list):
            log.error("ignored a %s message that is not a list", self.message)
            return 0
        records = [self.decode(item) for item in data]
        self.records.extend(records)
        return len(records)

    def on_message(self, environment: Any = None, msg: Any = None, **_: Any) -> None:
        """`runner.register_message(collector.message, collector.on_message)`: Locust's listener signature."""
        self.receive(getattr(msg, "data", None))

    def clear(self) -> None:
        """A new test starts (Locust clears its statistics then too)."""
        self.records.clear()

    def attach_to(self, runner: Any) -> None:
        """On a master, take the workers' messages."""
        if self.role == MASTER:
            runner.register_message(self.message, self.on_message)


class RecordCollector(Collector[RequestRecord]):
    """The requests' records (see the module docstring)."""

    def __init__(self, role: str, send: Callable[[str, Any], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, interval_s: float = FLUSH_INTERVAL_S) -> None:
        super().__init__(role, send, clock, interval_s, message=MESSAGE, encode=RequestRecord.to_dict,
                         decode=RequestRecord.from_dict)


def attach(environment: Any, collector: C) -> C:
    """Make `collector` the environment's for its message; a master also registers the message."""
    _COLLECTORS.setdefault(environment, {})[collector.message] = collector
    collector.attach_to(environment.runner)
    return collector


def collector_of(environment: Any, message: str = MESSAGE) -> Collector[Any] | None:
    return _COLLECTORS.get(environment, {}).get(message)


def collected(environment: Any, message: str) -> list[Any]:
    """Every item of `message` the run has gathered so far (the master's, or a single process's)."""
    collector = collector_of(environment, message)
    return list(collector.records) if collector is not None else []


def collected_records(environment: Any) -> list[RequestRecord]:
    """Every record the run has gathered so far: on the master (all workers') or in a local run.

    Empty on a worker (its records travel to the master) and before users.install wired the
    environment. Records arrive in completion order per worker, not globally sorted; percentiles
    come from these raw values, never from Locust's rounded buckets.
    """
    return collected(environment, MESSAGE)
