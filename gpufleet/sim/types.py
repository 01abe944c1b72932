"""The contract between the simulated engine and the HTTP surfaces that serve it.

`AsyncEngine` (engine.py) implements it; vllm_api.py, tgi_api.py and metrics.py only use what is
declared here, so the model and the surfaces can change independently.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SimConfig:
    """The engine's configuration: the same settings vLLM takes on its command line."""

    model: str  # --model (a Hugging Face id; nothing is downloaded)
    served_model_name: str  # first --served-model-name; the metrics' model_name label
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_gpu_blocks: int  # KV cache blocks per instance, from the capacity planner
    gpu_memory_utilization: float
    tensor_parallel_size: int
    seed: int = 0


@dataclass(frozen=True)
class GenerationParams:
    prompt_tokens: int  # prompt length in tokens (the surfaces tokenize)
    max_tokens: int  # output tokens at most (already capped to max_model_len - prompt_tokens)
    min_tokens: int = 0  # no stop before this many
    ignore_eos: bool = False  # generate exactly max_tokens


@dataclass(frozen=True)
class TokenEvent:
    """One output token as the engine emits it."""

    index: int  # 0-based position in the output
    token_id: int
    text: str
    scheduled_at: float  # engine clock time the model says this token is emitted
    finish_reason: FinishReason | None  # set on the last token (or on an abort with no token)


@dataclass
class RequestTiming:
    """What the engine records of one request (engine clock seconds); metrics are derived from it."""

    arrival: float
    prompt_tokens: int
    max_tokens: int
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    generation_tokens: int = 0
    preemptions: int = 0
    finish_reason: FinishReason | None = None
    token_times: list[float] = field(default_factory=list)  # scheduled time of each output token


class RequestHandle(Protocol):
    """A submitted request: iterate it for tokens (or attach a sink); abort it when the client goes away."""

    id: str
    timing: RequestTiming

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...

    def abort(self) -> None: ...

    def attach(self, sink: TokenSink) -> None: ...


# A streaming consumer's synchronous writer, called by the engine's frontend with each token
# (text, scheduled time, finish reason or None) at its time, instead of queuing an event and
# waking the consumer's task. The last token is also queued as an event afterwards, so that the
# consumer learns the stream is over. It returns True to be detached: the tokens after that come
# as events again. An abort never goes to the sink (its event carries no token).
TokenSink = Callable[[str, float, "FinishReason | None"], bool]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for gauges and counters."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prompt_tokens_total: int  # prefill tokens computed (recomputation after preemption counts again)
    generation_tokens_total: int
    preemptions_total: int
    steps_total: int

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class StepRecord:
    """One scheduler iteration, for vllm:iteration_tokens_total and the GPU exporter's simulated load."""

    started: float
    duration: float
    prefill_tokens: int
    decode_tokens: int
    batch_size: int


class EngineListener(Protocol):
    def request_finished(self, request_id: str, timing: RequestTiming) -> None: ...

    def step_finished(self, step: StepRecord) -> None: ...


ClockFn = Callable[[], float]
