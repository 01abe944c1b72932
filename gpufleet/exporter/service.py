"""The exporter as a service: the sampler and XID threads, the collector, and the HTTP endpoint."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import start_http_server

from gpufleet.exporter.collector import GpuCollector, Mode, build_registry
from gpufleet.exporter.events import WAIT_MS, XidWatcher
from gpufleet.exporter.nvml import Nvml
from gpufleet.exporter.sampler import DEFAULT_INTERVAL_S, ErrorCounts, Sampler, proc_comm

log = logging.getLogger("gpufleet.exporter")


class Exporter:
    def __init__(
        self,
        nvml: Nvml,
        *,
        interval: float = DEFAULT_INTERVAL_S,
        mode: Mode = "nvml",
        before_sample: Callable[[], None] | None = None,
        process_name: Callable[[int], str] = proc_comm,
        xid_wait_ms: int = WAIT_MS,
    ) -> None:
        self.errors = ErrorCounts()
        self.sampler = Sampler(nvml, interval=interval, errors=self.errors, process_name=process_name,
                               before_sample=before_sample)
        self.watcher = XidWatcher(nvml, errors=self.errors, wait_ms=xid_wait_ms)
        self.collector = GpuCollector(self.sampler, self.watcher, mode=mode)
        self.registry = build_registry(self.collector)
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    def listen(self, host: str, port: int) -> int:
        """Bind the metrics endpoint (every path serves the metrics); the port bound. OSError if it cannot."""
        self._server, self._server_thread = start_http_server(port, host, registry=self.registry)
        return int(self._server.server_address[1])

    def start(self, first_sample_timeout: float = 2.0) -> None:
        """Start sampling and watching; wait a little for the first sample so the first scrape has data."""
        self.sampler.start()
        self.watcher.start()
        deadline = time.monotonic() + first_sample_timeout
        while self.sampler.snapshot is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.watcher.stop()
        self.sampler.stop()
