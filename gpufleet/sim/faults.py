"""Fault injection and the loopback-only admin endpoints: how tests and chaos drills break the simulator.

Faults are set on the command line (`gpufleet sim serve --error-rate 0.1 ...`) and changed at run
time with `POST /admin/faults`. They model what a real engine does when it fails, so the gateway,
the monitoring rules and the runbooks can be exercised without a GPU:

* slow start: the port refuses connections for `--startup-delay` seconds (vLLM binds only after
  loading weights), handled by server.py;
* crash: after N finished requests or T seconds of serving, the process exits non-zero and every
  open connection drops, like a dead engine core taking the API server down;
* added latency: per token (the engine's `extra_step_delay_s`, so every running request slows,
  as a throttled GPU would) or per request (before the engine sees it, like a slow frontend);
* error rate: a seeded fraction of generation requests answered 500 in vLLM's error shape;
* hang: the engine is paused (no step runs); requests queue. /health keeps answering 200 until the
  hang has lasted `--hang-health-timeout` seconds (default 300, vLLM V1's
  VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS after which a stuck worker kills the engine core), then 503,
  and new generation requests get vLLM's 500 engine-dead error.

`GET /admin/token-log` returns each recent request's token schedule next to the time the server
actually wrote each token, so a benchmark can check the HTTP layer keeps up with the model.

The admin endpoints answer only loopback peers that did not come through a proxy: a request with a
non-loopback peer address, or carrying X-Forwarded-For / X-Real-IP / Forwarded (an Nginx in front
would add them), gets 403.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import random
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # aiohttp is imported by the server, not by the CLI that only reads the defaults here
    from aiohttp import web

log = logging.getLogger("gpufleet.sim")

# vLLM V1's VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS default: a worker stuck this long fails the engine core
DEFAULT_HANG_HEALTH_TIMEOUT_S = 300.0
CRASH_EXIT_CODE = 1


class PausableEngine(Protocol):
    extra_step_delay_s: float

    def pause(self) -> None: ...

    def resume(self) -> None: ...


@dataclass
class FaultSettings:
    """The faults in force; every field can be set by a flag and by POST /admin/faults."""

    startup_delay_s: float | None = None  # None: the profile's startup_s
    crash_after_requests: int | None = None
    crash_after_seconds: float | None = None
    added_latency_ms: float = 0.0  # per token, every running request
    added_request_latency_ms: float = 0.0  # per request, before it reaches the engine
    error_rate: float = 0.0
    hang_after_requests: int | None = None
    hang_health_timeout_s: float | None = DEFAULT_HANG_HEALTH_TIMEOUT_S  # None (or inf): a hang never kills

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be between 0 and 1, got {self.error_rate}")
        for name in ("startup_delay_s", "crash_after_seconds", "added_latency_ms", "added_request_latency_ms",
                     "hang_health_timeout_s"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or value < 0 or math.isnan(value)):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("crash_after_requests", "hang_after_requests"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


_SETTABLE = {f.name for f in fields(FaultSettings)} - {"startup_delay_s"}


class FaultController:
    """Applies the fault settings to one server: counts requests, triggers crash and hang, rolls errors."""

    def __init__(
        self,
        settings: FaultSettings,
        engine: PausableEngine,
        *,
        on_crash: Callable[[str], None],
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.engine = engine
        self.on_crash = on_crash
        self.clock = clock
        self.rng = random.Random(seed)
        self.received = 0
        self.finished = 0
        self.errors_injected = 0
        self.hung_since: float | None = None
        self.hang_triggered = False  # hang_after_requests fires once; "hang": false then resumes for good
        self.crashed = False
        self._crash_timer: asyncio.TimerHandle | None = None
        self._serving_since: float | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def serving_started(self) -> None:
        """The port is bound: start the crash clock and apply the per-token latency."""
        self._serving_since = self.clock()
        self._apply()

    def close(self) -> None:
        if self._crash_timer is not None:
            self._crash_timer.cancel()
            self._crash_timer = None

    def _apply(self) -> None:
        self.engine.extra_step_delay_s = self.settings.added_latency_ms / 1000.0
        if self._crash_timer is not None:
            self._crash_timer.cancel()
            self._crash_timer = None
        after = self.settings.crash_after_seconds
        if after is not None and self._serving_since is not None:
            delay = max(0.0, self._serving_since + after - self.clock())
            self._crash_timer = asyncio.get_running_loop().call_later(
                delay, self.crash, f"crash_after_seconds={after:g} reached"
            )
        self._check_triggers()  # a trigger lowered below the count so far fires now

    # ---- per request --------------------------------------------------------------------------

    def inject_error(self) -> bool:
        """Count a generation request; True when it must be answered with an injected 500."""
        self.received += 1
        rate = self.settings.error_rate
        if rate > 0.0 and self.rng.random() < rate:
            self.errors_injected += 1
            return True
        return False

    @property
    def request_delay_s(self) -> float:
        return self.settings.added_request_latency_ms / 1000.0

    def request_done(self) -> None:
        """The HTTP surface finished answering a generation request (any outcome): check the triggers."""
        self.finished += 1
        self._check_triggers()

    def _check_triggers(self) -> None:
        s = self.settings
        if s.crash_after_requests is not None and self.finished >= s.crash_after_requests and not self.crashed:
            # let the N-th response's last bytes reach its client first
            asyncio.get_running_loop().call_later(
                0.05, self.crash, f"crash_after_requests={s.crash_after_requests} reached"
            )
        if s.hang_after_requests is not None and self.finished >= s.hang_after_requests and not self.hang_triggered:
            self.hang_triggered = True
            self.hang()

    # ---- actions ------------------------------------------------------------------------------

    def crash(self, reason: str) -> None:
        if self.crashed:
            return
        self.crashed = True
        log.error("simulated engine crash (%s): exiting with status %d", reason, CRASH_EXIT_CODE)
        self.on_crash(reason)

    def hang(self) -> None:
        if self.hung_since is None:
            log.warning("simulated engine hang: no engine step runs until resumed")
            self.hung_since = self.clock()
            self.engine.pause()

    def unhang(self) -> None:
        if self.hung_since is not None:
            log.warning("simulated engine hang cleared")
            self.hung_since = None
            self.engine.resume()

    @property
    def engine_dead(self) -> bool:
        """A hang lasting past hang_health_timeout_s counts as a dead engine (health 503)."""
        timeout = self.settings.hang_health_timeout_s
        if self.hung_since is None or timeout is None:
            return False
        return self.clock() - self.hung_since >= timeout

    # ---- admin --------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        settings = {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in asdict(self.settings).items()}
        return {
            "settings": settings,
            "state": {
                "requests_received": self.received,
                "requests_finished": self.finished,
                "errors_injected": self.errors_injected,
                "hung": self.hung_since is not None,
                "hung_for_s": None if self.hung_since is None else self.clock() - self.hung_since,
                "engine_dead": self.engine_dead,
                "crashed": self.crashed,
            },
        }

    def update(self, body: dict[str, Any]) -> None:
        """Apply a POST /admin/faults body: settings to change, plus the actions hang/crash."""
        unknown = set(body) - _SETTABLE - {"hang", "crash"}
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(_SETTABLE | {'hang', 'crash'}))}")
        changed = {k: v for k, v in body.items() if k in _SETTABLE}
        trial = FaultSettings(**{**asdict(self.settings), **changed})
        trial.validate()
        if "hang" in body and not isinstance(body["hang"], bool):
            raise ValueError("hang must be true or false")
        if "crash" in body and body["crash"] is not True:
            raise ValueError("crash must be true (there is no un-crashing)")
        self.settings = trial
        self._apply()
        if body.get("hang") is True:
            self.hang()
        elif body.get("hang") is False:
            self.unhang()
        if body.get("crash") is True:
            asyncio.get_running_loop().call_later(0.05, self.crash, "POST /admin/faults")


class TokenRecord:
    """One request's token schedule and write times (engine clock = time.monotonic)."""

    __slots__ = ("finish_reason", "id", "prompt_tokens", "route", "scheduled", "written")

    def __init__(self, request_id: str, route: str, prompt_tokens: int) -> None:
        self.id = request_id
        self.route = route
        self.prompt_tokens = prompt_tokens
        self.scheduled = array("d")
        self.written = array("d")
        self.finish_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "route": self.route,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "scheduled": self.scheduled.tolist(),
            "written": self.written.tolist(),
        }


class TokenLog:
    """The most recent requests' token timings, bounded by a total token count (oldest requests dropped)."""

    def __init__(self, max_tokens: int = 200_000) -> None:
        self.max_tokens = max_tokens
        self.records: deque[TokenRecord] = deque()
        self.tokens = 0  # tokens held by finished records

    def open(self, request_id: str, route: str, prompt_tokens: int) -> TokenRecord | None:
        if self.max_tokens <= 0:
            return None
        record = TokenRecord(request_id, route, prompt_tokens)
        self.records.append(record)
        return record

    def close(self, record: TokenRecord | None, finish_reason: str | None) -> None:
        if record is None:
            return
        record.finish_reason = finish_reason
        self.tokens += len(record.scheduled)
        while self.tokens > self.max_tokens and len(self.records) > 1:
            old = self.records.popleft()
            self.tokens -= len(old.scheduled)

    def clear(self) -> None:
        self.records.clear()
        self.tokens = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "clock": "time.monotonic",
            "now": time.monotonic(),
            "requests": [r.as_dict() for r in self.records],
        }


# ---- the admin routes ---------------------------------------------------------------------------

_PROXY_HEADERS = ("X-Forwarded-For", "X-Real-IP", "Forwarded")


def is_local_request(request: web.Request) -> bool:
    """True for a direct connection from a loopback address (not relayed by a proxy)."""
    if any(h in request.headers for h in _PROXY_HEADERS):
        return False
    peer = request.remote
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def add_admin_routes(app: web.Application, faults: FaultController, token_log: TokenLog) -> None:
    from aiohttp import web

    from gpufleet.sim.vllm_api import json_response

    def forbidden() -> web.Response:
        return json_response({"error": "the admin endpoints answer loopback clients only"}, status=403)

    async def get_faults(request: web.Request) -> web.Response:
        if not is_local_request(request):
            return forbidden()
        return json_response(faults.describe())

    async def post_faults(request: web.Request) -> web.Response:
        if not is_local_request(request):
            return forbidden()
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            faults.update(body)
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            return json_response({"error": str(exc)}, status=400)
        return json_response(faults.describe())

    async def get_token_log(request: web.Request) -> web.Response:
        if not is_local_request(request):
            return forbidden()
        body = json_response(token_log.snapshot())
        if request.query.get("clear") in ("1", "true"):
            token_log.clear()
        return body

    async def delete_token_log(request: web.Request) -> web.Response:
        if not is_local_request(request):
            return forbidden()
        token_log.clear()
        return web.Response(status=204)

    app.router.add_get("/admin/faults", get_faults)
    app.router.add_post("/admin/faults", post_faults)
    app.router.add_get("/admin/token-log", get_token_log)
    app.router.add_delete("/admin/token-log", delete_token_log)
