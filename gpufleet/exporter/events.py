"""The XID watcher: a thread that waits on NVML's event set and counts XID critical errors by GPU and code.

dcgm-exporter's XID metric is the *last* XID as a gauge, so a repeated XID is invisible and the
value never clears; this counts every event instead: `gpufleet_gpu_xid_errors_total{xid}` and
`gpufleet_gpu_xid_last_seen_timestamp_seconds{xid}`. The counts live here, outside the sampler,
so they stay visible while sampling fails.

The thread initialises its own NVML reference (nvmlInit is reference-counted), creates an event
set, registers every GPU for `nvmlEventTypeXidCriticalError` (GPUs that refuse, e.g. NotSupported
on consumer or virtual GPUs or NoPermission without root, are skipped and logged once), and loops
on `nvmlEventSetWait` with a timeout (NVMLError_Timeout is "no event"; the timeout bounds how long
`stop()` waits). Any other error frees the set and builds it again after 1, 2, 4, ... up to 30 s.
A GPU's identity is cached when it is registered: a GPU that just raised an XID may not answer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from pynvml import NVMLError

from gpufleet.exporter.nvml import Nvml, classify, error_name, is_timeout
from gpufleet.exporter.sampler import ErrorCounts, GpuIdentity

log = logging.getLogger("gpufleet.exporter")

WAIT_MS = 1000
BACKOFF_INITIAL_S = 1.0
BACKOFF_CAP_S = 30.0
UNKNOWN_GPU = GpuIdentity(-1)  # an event from a device not registered here: labels left empty


@dataclass(frozen=True)
class XidCount:
    identity: GpuIdentity
    xid: int
    count: int
    last_seen: float  # Unix time the exporter received the latest one


class XidWatcher:
    def __init__(
        self,
        nvml: Nvml,
        *,
        errors: ErrorCounts | None = None,
        wait_ms: int = WAIT_MS,
        wall_clock: Callable[[], float] = time.time,
        backoff_initial: float = BACKOFF_INITIAL_S,
        backoff_cap: float = BACKOFF_CAP_S,
    ) -> None:
        self.nvml = nvml
        self.errors = errors or ErrorCounts()
        self.wait_ms = wait_ms
        self.wall_clock = wall_clock
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.up = False
        self._event_set: Any = None
        self._initialised = False
        self._devices: dict[Hashable, GpuIdentity] = {}
        self._backoff = 0.0
        self._last_error = ""
        self._skipped: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        self._counts: dict[tuple[GpuIdentity, int], tuple[int, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def counts(self) -> list[XidCount]:
        with self._lock:
            items = list(self._counts.items())
        return [XidCount(ident, xid, n, last) for (ident, xid), (n, last) in items]

    # ---- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gpufleet-xid-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current wait (at most `wait_ms`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.wait_ms / 1000.0 + 2.0 if timeout is None else timeout)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    delay = self.run_once()
                except Exception:  # a bug must not end the watcher
                    log.exception("XID watcher failed")
                    self.errors.add("internal", "exception")
                    self._close()
                    delay = self.backoff_cap
                if delay:
                    self._stop.wait(delay)
        finally:
            self._close()

    # ---- one step -----------------------------------------------------------------------------

    def run_once(self) -> float:
        """Open the event set if needed, then wait once; return seconds to pause before the next step."""
        if self._event_set is None:
            try:
                registered = self._open()
            except NVMLError as exc:
                return self._failed(exc)
            if not registered:
                log.warning("no GPU delivers XID events; checking again in %.0f s", self.backoff_cap)
                return self.backoff_cap
        try:
            event = self.nvml.event_wait(self._event_set, self.wait_ms)
        except NVMLError as exc:
            if not is_timeout(exc):
                return self._failed(exc)
            event = None
        if self._backoff:  # the set works: the next failure starts the backoff afresh
            log.info("XID watcher is back after %s, watching %d GPU(s)", self._last_error, len(self._devices))
            self._backoff, self._last_error = 0.0, ""
        if event is not None:
            self._record(event.device, event.xid)
        return 0.0

    def _open(self) -> int:
        self.nvml.init()
        self._initialised = True
        self._event_set = self.nvml.event_set_create()
        self._devices = {}
        for index in range(self.nvml.device_count()):
            try:
                handle = self.nvml.handle(index)
                identity = GpuIdentity(index, self.nvml.uuid(handle), self.nvml.name(handle))
                self.nvml.register_xid_events(handle, self._event_set)
            except NVMLError as exc:
                if classify(exc) == "library":
                    raise
                if (index, error_name(exc)) not in self._skipped:
                    self._skipped.add((index, error_name(exc)))
                    log.info("GPU %d: XID events unavailable (%s); not watched", index, error_name(exc))
                continue
            self._devices[self.nvml.device_key(handle)] = identity
        if not self._devices:
            self._close()
            return 0
        self.up = True
        return len(self._devices)

    def _failed(self, exc: NVMLError) -> float:
        name = error_name(exc)
        self.errors.add("event", name)
        self._close()
        self._backoff = min(self.backoff_cap, self._backoff * 2) if self._backoff else self.backoff_initial
        if name != self._last_error:
            log.warning("XID watcher: %s (%s); building the event set again in %.0f s", name, exc, self._backoff)
        self._last_error = name
        return self._backoff

    def _close(self) -> None:
        self.up = False
        event_set, self._event_set = self._event_set, None
        if event_set is not None:
            with contextlib.suppress(NVMLError):
                self.nvml.event_set_free(event_set)
        if self._initialised:
            self._initialised = False
            with contextlib.suppress(NVMLError):
                self.nvml.shutdown()

    def _record(self, device: Hashable, xid: int) -> None:
        identity = self._devices.get(device, UNKNOWN_GPU)
        now = self.wall_clock()
        with self._lock:
            count, _ = self._counts.get((identity, xid), (0, 0.0))
            self._counts[(identity, xid)] = (count + 1, now)
        log.warning("XID %d on GPU %s (%s)", xid, identity.index if identity.index >= 0 else "?",
                    identity.uuid or "unknown")
