"""The simulated engine: the scheduler and a profile, driven in real time on asyncio.

`EngineCore` is the whole performance model without a clock: requests spend the profile's
`request_overhead_s` in the API server before they reach the scheduler; each step lasts
`profile.step_time(...)` (plus any injected `extra_step_delay_s`); its tokens leave through a
serial frontend `frontend_token_s` apart. virtual.py drives it in simulated time; `AsyncEngine`
drives it in real time and implements the contract of types.py for the HTTP surfaces:

* the engine loop computes a step, sleeps until the step's scheduled end and hands its tokens to
  the frontend; the next step starts at that scheduled end, so sleep overshoot does not
  accumulate (a loop that fell more than `LATE_S` behind, or was idle, restarts from now);
* the frontend task releases each token when its `scheduled_at` comes: to the consumer's sink
  when one is attached (a streaming response writes it at once, without a task switch), else as
  an event on the handle's deque; no task or timer per token, so 512 streams stay cheap;
* an idle engine waits on an event; `pause()` holds it at the next step boundary (the "hang"
  fault), `extra_step_delay_s` lengthens every step (the "added latency" fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from dataclasses import dataclass

from gpufleet.sim.profile import Profile
from gpufleet.sim.scheduler import FINISHED, Batch, Emission, SchedRequest, Scheduler
from gpufleet.sim.textgen import TextGen, eos_token
from gpufleet.sim.types import (
    ClockFn,
    EngineListener,
    EngineStats,
    FinishReason,
    GenerationParams,
    RequestTiming,
    SimConfig,
    StepRecord,
    TokenEvent,
    TokenSink,
)

ABORT_TOKEN_ID = -1  # the token_id of the event that ends an aborted stream (it carries no token)


@dataclass(frozen=True)
class StepPlan:
    """A scheduled step: its batch and when it starts and ends."""

    batch: Batch
    start: float
    duration: float

    @property
    def end(self) -> float:
        return self.start + self.duration

    def record(self) -> StepRecord:
        b = self.batch
        return StepRecord(started=self.start, duration=self.duration, prefill_tokens=b.prefill_tokens,
                          decode_tokens=b.num_decode, batch_size=b.size)


class EngineCore:
    """Scheduler + profile + API-server delay + frontend, clock-free (callers pass the times)."""

    def __init__(self, config: SimConfig, profile: Profile):
        self.config = config
        self.profile = profile
        self.scheduler = Scheduler(config)
        self.extra_step_delay_s = 0.0
        self._pending: list[tuple[float, int, SchedRequest]] = []  # (ready time, order, request)
        self._order = 0
        self._pending_ids: dict[str, SchedRequest] = {}

    def submit(self, request_id: str, params: GenerationParams, now: float,
               textgen: TextGen | None = None) -> SchedRequest:
        """Accept a request at `now`; it reaches the scheduler `request_overhead_s` later.

        The output length (where the EOS falls) is drawn from the request's own RNG, the one
        its text comes from, so it is reproducible from (seed, request id).
        """
        if request_id in self._pending_ids or request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if params.ignore_eos or self.profile.eos_probability <= 0.0:
            stop_at, reason = params.max_tokens, "length"
        else:
            gen = textgen or TextGen(self.config.seed, request_id)
            stop_at, reason = gen.output_length(params, self.profile.eos_probability)
        req = self.scheduler.make_request(request_id, params, now, stop_at, reason)  # type: ignore[arg-type]
        ready = now + self.profile.request_overhead_s
        heapq.heappush(self._pending, (ready, self._order, req))
        self._order += 1
        self._pending_ids[request_id] = req
        return req

    def next_ready(self) -> float | None:
        """When the earliest request still in the API server reaches the scheduler."""
        while self._pending and self._pending[0][2].status == FINISHED:
            heapq.heappop(self._pending)
        return self._pending[0][0] if self._pending else None

    def begin_step(self, now: float) -> StepPlan | None:
        """Admit the requests that are ready by `now` and plan a step starting then (None: idle)."""
        pending = self._pending
        while pending and pending[0][0] <= now:
            req = heapq.heappop(pending)[2]
            if req.status != FINISHED:
                del self._pending_ids[req.id]
                self.scheduler.add(req)
        if not self.scheduler.has_work():
            return None
        batch = self.scheduler.schedule(now)
        duration = self.profile.step_time(batch.num_decode, batch.prefill_tokens, batch.context_tokens)
        return StepPlan(batch, now, duration + self.extra_step_delay_s)

    def finish_step(self, plan: StepPlan) -> list[Emission]:
        return self.scheduler.complete(plan.batch, plan.end, self.profile.frontend_token_s)


    def abort(self, request_id: str) -> SchedRequest | None:
        req = self._pending_ids.pop(request_id, None)
        if req is not None:
            req.status = FINISHED
            req.timing.finish_reason = "abort"
            return req
        return self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return bool(self._pending_ids) or self.scheduler.has_work()

    def stats(self) -> EngineStats:
        return self.scheduler.stats(extra_waiting=len(self._pending_ids))


class _Handle:
    """A submitted request's token stream: a deque and an event, consumed with `async for`."""

    __slots__ = ("_closed", "_engine", "_events", "_pushed", "_ready", "_reported", "_sink", "_textgen", "id",
                 "timing")

    def __init__(self, request_id: str, engine: AsyncEngine, textgen: TextGen):
        self.id = request_id
        self.timing: RequestTiming = RequestTiming(arrival=0.0, prompt_tokens=0, max_tokens=0)
        self._engine = engine
        self._textgen = textgen
        self._events: deque[TokenEvent] = deque()
        self._ready = asyncio.Event()
        self._closed = False  # no more events will be pushed
        self._pushed = 0  # token events handed to the consumer
        self._reported = False  # the listener was told it finished
        self._sink: TokenSink | None = None

    def attach(self, sink: TokenSink) -> None:
        """Have the frontend hand the tokens to `sink` (see types.TokenSink) until it asks to be detached."""
        if not self._closed:
            self._sink = sink

    def _push(self, event: TokenEvent) -> None:
        self._events.append(event)
        self._ready.set()
        if event.finish_reason is not None:
            self._closed = True
            self._sink = None
        if event.token_id >= 0:
            self._pushed += 1

    def __aiter__(self) -> _Handle:
        return self

    async def __anext__(self) -> TokenEvent:
        while not self._events:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        event = self._events.popleft()
        return event

    def abort(self) -> None:
        self._engine._abort(self)

    @property
    def finished(self) -> bool:
        return self._closed


class AsyncEngine:
    """The simulated engine in real time; see the module docstring and types.py."""

    LATE_S = 0.05  # a step boundary missed by more than this restarts the schedule from now
    FRONTEND_COARSE_S = 0.0012  # sleep on a timer until this close to a token's time, then yield
    FRONTEND_BATCH = 16  # tokens released between two yields to the event loop

    def __init__(self, config: SimConfig, profile: Profile, clock: ClockFn = time.monotonic,
                 listener: EngineListener | None = None):
        self.config = config
        self.profile = profile
        self._clock = clock
        self._listener = listener
        self._core = EngineCore(config, profile)
        self._handles: dict[str, _Handle] = {}
        self._wake = asyncio.Event()
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._outbox: deque[tuple[float, _Handle, int, FinishReason | None]] = deque()
        self._outbox_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._eos = eos_token(config.model)
        self._core.scheduler.tick = self._release_due

    # lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._engine_loop(), name="sim-engine-core"),
            asyncio.create_task(self._frontend_loop(), name="sim-engine-frontend"),
        ]

    async def stop(self) -> None:
        """Stop both loops; every unfinished request ends with an abort event."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for handle in list(self._handles.values()):
            self._abort(handle)
        self._outbox.clear()

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    # requests ---------------------------------------------------------------------------------

    def submit(self, request_id: str, params: GenerationParams) -> _Handle:
        """Queue a request; iterate the handle for its tokens. ValueError for a duplicate id or
        a request beyond max_model_len (the API layer must reject or cap those first)."""
        if request_id in self._handles:
            raise ValueError(f"request id {request_id!r} is already active")
        self.catch_up()
        textgen = TextGen(self.config.seed, request_id)
        handle = _Handle(request_id, self, textgen)
        req = self._core.submit(request_id, params, self._clock(), textgen)
        req.owner = handle
        handle.timing = req.timing
        self._handles[request_id] = handle
        self._wake.set()
        return handle

    def _abort(self, handle: _Handle) -> None:
        if handle._closed:
            return
        self._core.abort(handle.id)
        if handle.timing.finish_reason is None or handle.timing.finish_reason == "abort":
            handle.timing.finish_reason = "abort"
        # no token: the index is the one the next token would have had, as the consumer saw them
        handle._push(TokenEvent(index=handle._pushed, token_id=ABORT_TOKEN_ID, text="",
                                scheduled_at=self._clock(), finish_reason="abort"))
        self._finished(handle)

    def _finished(self, handle: _Handle) -> None:
        if handle._reported:
            return
        handle._reported = True
        self._handles.pop(handle.id, None)
        if self._listener is not None:
            self._listener.request_finished(handle.id, handle.timing)

    # faults -----------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop computing at the next step boundary (requests still queue) until `resume()`."""
        self._unpaused.clear()

    def resume(self) -> None:
        self._unpaused.set()
        self._wake.set()

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    @property
    def extra_step_delay_s(self) -> float:
        return self._core.extra_step_delay_s

    @extra_step_delay_s.setter
    def extra_step_delay_s(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("extra_step_delay_s must be >= 0")
        self._core.extra_step_delay_s = seconds

    # reporting --------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return self._core.stats()

    # the loops --------------------------------------------------------------------------------

    async def _engine_loop(self) -> None:
        core = self._core
        clock = self._clock
        next_start: float | None = None
        while True:
            if not self._unpaused.is_set():
                await self._unpaused.wait()
                next_start = None
                continue
            now = clock()
            start = next_start if next_start is not None and now - next_start <= self.LATE_S else now
            plan = core.begin_step(start)
            if plan is None:
                next_start = None
                await self._idle()
                continue
            # The step's outcome depends only on its plan, so its tokens are queued for the frontend
            # now, while the GPU would be computing: the frontend then releases them on time instead
            # of after a burst of bookkeeping at the step's end. (The scheduler ticks the frontend
            # while it plans and applies a step, so tokens falling due meanwhile are not held up.)
            emissions = core.finish_step(plan)
            if emissions:
                self._publish(emissions)
            delay = plan.end - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._listener is not None:
                self._listener.step_finished(plan.record())
            next_start = plan.end

    async def _idle(self) -> None:
        self._wake.clear()
        ready = self._core.next_ready()
        timer = None
        if ready is not None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(max(0.0, ready - self._clock()), self._wake.set)
        try:
            await self._wake.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _publish(self, emissions: list[Emission]) -> None:
        # token texts are drawn when each token is released, spreading that work over the step
        outbox = self._outbox
        for req, index, at, reason in emissions:
            outbox.append((at, req.owner, index, reason))  # type: ignore[arg-type]
        self._outbox_ready.set()

    async def _frontend_loop(self) -> None:
        """Release each token at its scheduled time.

        asyncio's timers wake up to a millisecond late (epoll's timeout is in whole ms), so the
        loop sleeps until about a millisecond before the next token is due and then yields to the
        event loop (letting the HTTP handlers run) until the moment comes.
        """
        outbox = self._outbox
        clock = self._clock
        coarse = self.FRONTEND_COARSE_S
        while True:
            if not outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            wait = outbox[0][0] - clock()
            if wait > coarse:
                await asyncio.sleep(wait - coarse)
                continue
            if wait <= 0:
                self._release_due(self.FRONTEND_BATCH)
            await asyncio.sleep(0)

    def catch_up(self) -> None:
        """Release the tokens due by now; the HTTP surfaces call it between the parts of a
        request's handling, so a burst of arrivals does not hold up the streams already running."""
        self._release_due()

    def _release_due(self, limit: int = 1 << 30) -> None:
        """Hand out the tokens due by now, `limit` at most, in schedule order.

        A stream with a sink attached gets its token written at once; others get an event and
        their task runs later. It is synchronous, so the scheduler calls it (`tick`) between
        requests while it plans or applies a step of hundreds of them.
        """
        outbox = self._outbox
        if not outbox:
            return
        now = self._clock()
        eos = self._eos
        released = 0
        while outbox and outbox[0][0] <= now and released < limit:
            at, handle, index, reason = outbox.popleft()
            if handle._closed:
                continue
            released += 1
            token_id, text = eos if reason == "stop" else handle._textgen.next_token()
            sink = handle._sink
            if sink is not None:
                if sink(text, at, reason):
                    handle._sink = None
                if reason is None:
                    handle._pushed += 1
                    continue
                # the sink wrote the last token; its event tells the consumer the stream is over
            handle._push(TokenEvent(index, token_id, text, at, reason))
            if reason is not None:
                self._finished(handle)
