"""One request's measurements: what a load-test user records and the gate and the report read.

Durations are measured on one clock (time.perf_counter) within the process that sent the request;
`start_epoch` (time.time) only places the request in wall time, so records from several Locust
worker processes can be merged on the master. A record is plain data and crosses processes as a
dict (`to_dict` / `from_dict`).

Definitions (printed in the report; vLLM's `vllm bench serve` uses the same ones):
- TTFT: send -> arrival of the first chunk that carries generated text (a role-only or empty
  chunk does not count).
- ITL: every gap between two consecutive text-carrying chunks after the first.
- E2E: send -> arrival of the last text-carrying chunk.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request; none for a single-token answer.
- Output tokens: the server's usage count when it sends one, else the text-carrying chunks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RequestRecord:
    start_epoch: float  # wall-clock time the request was sent (time.time())
    api: str  # "openai-chat", "openai-completions" or "tgi"
    step: str = ""  # the load shape's step (e.g. "concurrency=8"), "" outside a stepped run
    intended_epoch: float | None = None  # open-loop: when the schedule wanted it sent
    ttft_s: float | None = None
    itl_s: tuple[float, ...] = ()
    e2e_s: float | None = None
    content_chunks: int = 0  # chunks that carried generated text
    usage_output_tokens: int | None = None  # the server's usage.completion_tokens (or TGI's generated_tokens)
    usage_input_tokens: int | None = None
    expected_input_tokens: int | None = None  # what the prompt was built to have
    expected_output_tokens: int | None = None  # what max/min tokens asked for
    status: int | None = None  # HTTP status; None when no answer came
    error: str | None = None  # why the request failed; None for a success
    worker: str = ""  # which load generator process sent it
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.ttft_s is not None

    @property
    def output_tokens(self) -> int:
        return self.usage_output_tokens if self.usage_output_tokens is not None else self.content_chunks

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens <= 1:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def dispatch_lag_s(self) -> float | None:
        """How late the request left against its schedule (open loop): coordinated omission shows here."""
        return None if self.intended_epoch is None else self.start_epoch - self.intended_epoch

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["itl_s"] = list(self.itl_s)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        return cls(**{**data, "itl_s": tuple(data.get("itl_s", ()))})
