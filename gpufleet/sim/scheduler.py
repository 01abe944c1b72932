"""A clock-free continuous-batching scheduler modelled on vLLM V1's.

It decides what every engine step computes and keeps the KV cache's books; it never reads a
clock (callers pass the step's start and end times), so the same code runs in real time
(engine.py) and in simulated time (virtual.py), and its invariants can be tested step by step.

The rules, as in vLLM V1 with chunked prefill:

* at most `max_num_seqs` requests run; the KV cache has `num_gpu_blocks` blocks of `block_size`
  tokens and a request holds ceil(tokens / block_size) blocks for the tokens it has computed;
* a step first gives every running request that is decoding one token, then fills what is left
  of the `max_num_batched_tokens` budget with prefill chunks: running requests whose prompt is
  part-way through first, then waiting requests, first come first served;
* a waiting request is admitted when a slot is free and the free blocks (less those promised to
  running prefills) hold its whole prompt; the head of the queue blocks the rest (FCFS);
* a request samples a token at the end of the step that computes its last missing token: a
  prompt fully prefilled emits its first token at the end of that step;
* when a decoding request needs a new block and none is free, the most recently admitted
  running request is preempted in recompute mode: its blocks are freed, it goes back to the
  front of the waiting queue, and when readmitted it prefills its prompt and the tokens it had
  generated again;
* no request is admitted in a step that preempted one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from gpufleet.sim.types import EngineStats, FinishReason, GenerationParams, RequestTiming, SimConfig

WAITING, RUNNING, FINISHED = 0, 1, 2


class SchedRequest:
    """One request's scheduling state; `timing` is what the engine reports of it."""

    __slots__ = (
        "admitted",
        "blocks",
        "final_reason",
        "id",
        "num_computed",
        "num_output",
        "num_prompt",
        "owner",
        "params",
        "prefilling",
        "status",
        "stop_at",
        "timing",
    )

    def __init__(self, request_id: str, params: GenerationParams, arrival: float, stop_at: int,
                 final_reason: FinishReason):
        self.id = request_id
        self.params = params
        self.timing = RequestTiming(arrival=arrival, prompt_tokens=params.prompt_tokens, max_tokens=params.max_tokens)
        self.num_prompt = params.prompt_tokens
        self.num_output = 0
        self.num_computed = 0  # tokens whose KV is in the cache
        self.blocks = 0
        self.stop_at = stop_at  # output tokens after which it finishes
        self.final_reason: FinishReason = final_reason
        self.status = WAITING
        self.prefilling = True  # computing its prompt (and, after a preemption, its earlier output)
        self.admitted = -1  # admission sequence number: preemption picks the highest
        self.owner: object = None  # the engine's handle for it

    @property
    def num_tokens(self) -> int:
        return self.num_prompt + self.num_output

    def __repr__(self) -> str:
        return (f"SchedRequest({self.id!r}, computed={self.num_computed}/{self.num_tokens}, "
                f"out={self.num_output}/{self.stop_at}, blocks={self.blocks})")


class Batch:
    """What one step computes: (request, new tokens) pairs, decodes first, then prefill chunks."""

    __slots__ = ("context_tokens", "items", "num_decode", "preempted", "prefill_tokens", "started")

    def __init__(self, started: float):
        self.started = started
        self.items: list[tuple[SchedRequest, int]] = []
        self.num_decode = 0
        self.prefill_tokens = 0
        self.context_tokens = 0  # KV tokens the step's attention reads, new tokens included
        self.preempted: list[SchedRequest] = []

    @property
    def size(self) -> int:
        return len(self.items)

    @property
    def num_tokens(self) -> int:
        return self.num_decode + self.prefill_tokens


# (request, output index, scheduled time, finish reason or None)
Emission = tuple[SchedRequest, int, float, "FinishReason | None"]


class Scheduler:
    """vLLM V1-style continuous batching over a block-counted KV cache (see the module docstring)."""

    def __init__(self, config: SimConfig):
        if config.num_gpu_blocks * config.block_size < config.max_model_len:
            raise ValueError(
                f"the KV cache ({config.num_gpu_blocks} blocks of {config.block_size}) holds fewer tokens than one "
                f"max_model_len ({config.max_model_len}) request; vLLM refuses to start so"
            )
        self.config = config
        self.block_size = config.block_size
        self.total_blocks = config.num_gpu_blocks
        self.free_blocks = config.num_gpu_blocks
        self.waiting: deque[SchedRequest] = deque()
        self.running: list[SchedRequest] = []
        self.requests: dict[str, SchedRequest] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.preemptions_total = 0
        self.steps_total = 0
        self._admissions = 0
        self._frontend_free = float("-inf")
        # Called every TICK_EVERY requests while a step is planned or applied: the real-time engine
        # releases the tokens that fall due meanwhile (it must not touch the scheduler).
        self.tick: Callable[[], None] | None = None

    TICK_EVERY = 32

    # requests ---------------------------------------------------------------------------------

    def make_request(self, request_id: str, params: GenerationParams, arrival: float,
                     stop_at: int | None = None, final_reason: FinishReason = "length") -> SchedRequest:
        """A request in WAITING state, not yet queued; `stop_at` output tokens (default max_tokens)."""
        if params.prompt_tokens < 1 or params.max_tokens < 1:
            raise ValueError(f"request {request_id!r}: needs at least one prompt token and max_tokens >= 1")
        if params.prompt_tokens + params.max_tokens > self.config.max_model_len:
            raise ValueError(
                f"request {request_id!r}: {params.prompt_tokens} prompt + {params.max_tokens} output tokens exceed "
                f"max_model_len {self.config.max_model_len} (the API layer must reject or cap it)"
            )
        if stop_at is None:
            stop_at, final_reason = params.max_tokens, "length"
        if not 1 <= stop_at <= params.max_tokens:
            raise ValueError(f"request {request_id!r}: stop_at {stop_at} outside 1..{params.max_tokens}")
        return SchedRequest(request_id, params, arrival, stop_at, final_reason)

    def add(self, request: SchedRequest) -> SchedRequest:
        """Queue a request at the back of the waiting queue."""
        if request.id in self.requests:
            raise ValueError(f"request id {request.id!r} is already in the scheduler")
        self.requests[request.id] = request
        self.waiting.append(request)
        return request

    def submit(self, request_id: str, params: GenerationParams, arrival: float = 0.0,
               stop_at: int | None = None, final_reason: FinishReason = "length") -> SchedRequest:
        return self.add(self.make_request(request_id, params, arrival, stop_at, final_reason))

    def abort(self, request_id: str) -> SchedRequest | None:
        """Drop a request wherever it is and free its blocks; None if it is not here (finished)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RUNNING:
            self.running.remove(request)
        elif request.status == WAITING:
            self.waiting.remove(request)
        self.free_blocks += request.blocks
        request.blocks = 0
        request.status = FINISHED
        request.timing.finish_reason = "abort"
        return request

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # one step ---------------------------------------------------------------------------------

    def schedule(self, now: float) -> Batch:
        """Decide the next step's work (an empty batch when there is none)."""
        preempted: list[SchedRequest] = []
        while True:
            batch = self._schedule_once(now)
            preempted += batch.preempted
            if batch.items or not self.has_work():
                break
            if self.running:
                # every running request is a prefill stuck for blocks: make room the V1 way
                preempted.append(self._preempt(self.running.pop()))
            elif not batch.preempted:
                head = self.waiting[0]
                raise AssertionError(f"request {head.id!r} needs more KV blocks than the whole cache holds")
            # else: it preempted and so admitted nothing; with nothing running, admit now
        batch.preempted = preempted
        return batch

    def _schedule_once(self, now: float) -> Batch:
        batch = Batch(now)
        items = batch.items
        budget = self.config.max_num_batched_tokens
        bs = self.block_size
        running = self.running
        tick = self.tick
        # 1. one token for every decoding request, preempting from the back when blocks run out
        i = 0
        while i < len(running) and budget > 0:
            if tick is not None and i % self.TICK_EVERY == 0:
                tick()
            req = running[i]
            if req.prefilling:
                i += 1
                continue
            need = (req.num_computed + bs) // bs - req.blocks  # blocks for num_computed + 1 tokens
            if need > self.free_blocks:
                while need > self.free_blocks:
                    victim = running.pop()
                    batch.preempted.append(self._preempt(victim))
                    if victim is req:
                        break
                if req.status != RUNNING:
                    break
            self.free_blocks -= need
            req.blocks += need
            items.append((req, 1))
            budget -= 1
            batch.context_tokens += req.num_computed + 1
            i += 1
        batch.num_decode = len(items)
        # 2. running requests part-way through their prefill, in admission order
        promised = 0
        for req in running:
            if not req.prefilling:
                continue
            remaining = req.num_tokens - req.num_computed
            chunk = min(remaining, budget, (req.blocks + self.free_blocks) * bs - req.num_computed)
            if chunk > 0:
                need = -(-(req.num_computed + chunk) // bs) - req.blocks
                self.free_blocks -= need
                req.blocks += need
                items.append((req, chunk))
                budget -= chunk
                batch.prefill_tokens += chunk
                batch.context_tokens += req.num_computed + chunk
            promised += -(-req.num_tokens // bs) - req.blocks
        # 3. admit waiting requests first come first served
        if batch.preempted:
            return batch
        waiting = self.waiting
        max_seqs = self.config.max_num_seqs
        while waiting and budget > 0 and len(running) < max_seqs:
            req = waiting[0]
            whole = -(-req.num_tokens // bs)
            if whole > self.free_blocks - promised:
                break
            waiting.popleft()
            chunk = min(req.num_tokens, budget)
            need = -(-chunk // bs)
            self.free_blocks -= need
            req.blocks = need
            req.status = RUNNING
            req.prefilling = True
            req.admitted = self._admissions
            self._admissions += 1
            running.append(req)
            if req.timing.first_scheduled is None:
                req.timing.first_scheduled = now
            items.append((req, chunk))
            budget -= chunk
            batch.prefill_tokens += chunk
            batch.context_tokens += chunk
            promised += whole - need
        return batch

    def _preempt(self, req: SchedRequest) -> SchedRequest:
        self.free_blocks += req.blocks
        req.blocks = 0
        req.num_computed = 0
        req.status = WAITING
        req.prefilling = True
        req.timing.preemptions += 1
        self.preemptions_total += 1
        self.waiting.appendleft(req)
        return req

    def complete(self, batch: Batch, end: float, frontend_token_s: float = 0.0) -> list[Emission]:
        """Apply a step that ended at `end`: advance requests, sample tokens, retire the finished.

        Tokens are handed to a serial frontend: the k-th token of the step is scheduled at
        `start + k * frontend_token_s`, where `start` is the step's end, or later if the
        frontend is still busy with the previous step's tokens.
        """
        emissions: list[Emission] = []
        start = end if end > self._frontend_free else self._frontend_free
        k = 0
        finished = False
        tick = self.tick
        for position, (req, n) in enumerate(batch.items):
            if tick is not None and position % self.TICK_EVERY == 0:
                tick()
            if req.status != RUNNING:  # aborted while the step ran
                continue
            req.num_computed += n
            if req.prefilling:
                self.prompt_tokens_total += n
                if req.num_computed < req.num_prompt + req.num_output:
                    continue
                req.prefilling = False
            index = req.num_output
            req.num_output = index + 1
            at = start + k * frontend_token_s
            k += 1
            timing = req.timing
            timing.token_times.append(at)
            if timing.first_token is None:
                timing.first_token = at
            timing.last_token = at
            timing.generation_tokens = index + 1
            reason: FinishReason | None = None
            if index + 1 >= req.stop_at:
                reason = req.final_reason
                timing.finish_reason = reason
                self.free_blocks += req.blocks
                req.blocks = 0
                req.status = FINISHED
                del self.requests[req.id]
                finished = True
            emissions.append((req, index, at, reason))
        self._frontend_free = start + k * frontend_token_s
        if finished:
            self.running = [r for r in self.running if r.status == RUNNING]
        self.generation_tokens_total += k
        self.steps_total += 1
        return emissions

    # reporting --------------------------------------------------------------------------------

    def stats(self, extra_waiting: int = 0) -> EngineStats:
        return EngineStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting) + extra_waiting,
            kv_blocks_used=self.total_blocks - self.free_blocks,
            kv_blocks_total=self.total_blocks,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            preemptions_total=self.preemptions_total,
            steps_total=self.steps_total,
        )

    def active(self) -> Iterator[SchedRequest]:
        yield from self.running
        yield from self.waiting

    def check_invariants(self) -> None:
        """Raise AssertionError if the books do not balance (tests call it after every step)."""
        bs = self.block_size
        held = sum(r.blocks for r in self.running)
        assert all(r.blocks == 0 for r in self.waiting), "a waiting request holds blocks"
        assert held + self.free_blocks == self.total_blocks, "blocks held + free != total"
        assert 0 <= self.free_blocks <= self.total_blocks, "free blocks out of range"
        assert len(self.running) <= self.config.max_num_seqs, "more running than max_num_seqs"
        for r in self.running:
            assert r.status == RUNNING
            assert r.blocks >= -(-r.num_computed // bs), f"{r} holds too few blocks for its computed tokens"
            assert r.num_computed <= r.num_tokens
        assert [r.admitted for r in self.running] == sorted(r.admitted for r in self.running), "running out of order"
