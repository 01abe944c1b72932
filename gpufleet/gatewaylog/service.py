"""The exporter as a service: a thread that follows the access log, and the HTTP /metrics endpoint.

The first poll runs in `start()`, before the thread, so the position in the log (its end) is fixed
when `start()` returns: a request logged after that is counted, whatever the thread's timing. A
failure while following is logged and retried at the next poll; it never ends the thread, since a
dead follower would serve frozen counters that look like an idle gateway.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import start_http_server

from gpufleet.gatewaylog.collector import GatewayCollector, build_registry
from gpufleet.gatewaylog.follower import LogFollower
from gpufleet.gatewaylog.parser import MalformedLine, parse_line
from gpufleet.gatewaylog.stats import GatewayStats

log = logging.getLogger("gpufleet.gatewaylog")

DEFAULT_POLL_INTERVAL_S = 0.25


class GatewayLogExporter:
    """Follows `log_path` into `stats` and serves them with `model_name` as the model label."""

    def __init__(
        self,
        log_path: str | os.PathLike[str],
        model_name: str,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        follower: LogFollower | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.follower = follower or LogFollower(log_path)
        self.poll_interval = poll_interval
        self.wall_clock = wall_clock
        self.stats = GatewayStats()
        self.collector = GatewayCollector(self.stats, model_name)
        self.registry = build_registry(self.collector)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._malformed_logged = 0

    def poll_once(self) -> int:
        """Read and count what the log has gained; the number of lines read."""
        lines = self.follower.poll()
        read_at = self.wall_clock()
        for line in lines:
            try:
                record = parse_line(line)
            except MalformedLine as exc:
                self.stats.malformed(read_at)
                if self._malformed_logged < 10:  # enough to see what is wrong, not a log flood
                    self._malformed_logged += 1
                    log.warning("malformed access log line (%s): %.200r", exc, line)
                continue
            self.stats.record(record, read_at)
        f = self.follower
        self.stats.follower_state(up=f.up, renames=f.rotations, truncations=f.truncations, discarded=f.discarded)
        return len(lines)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # keep following: the next poll may succeed
                log.exception("following the access log failed; retrying")
            if not self.follower.behind:
                self._stop.wait(self.poll_interval)

    def start(self) -> None:
        """Take the log's current end as the start, then follow it in a thread."""
        self.poll_once()
        self._thread = threading.Thread(target=self._run, name="gateway-log-follower", daemon=True)
        self._thread.start()

    def listen(self, host: str, port: int) -> int:
        """Serve the metrics on host:port (every path); the port bound. OSError if it cannot be bound."""
        self._server, _ = start_http_server(port, host, registry=self.registry)
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.follower.close()
