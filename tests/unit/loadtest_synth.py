"""Synthetic load-test records shaped like the seed's 4x4090D table, for the gate and report tests.

Closed loop: at each concurrency, that many users send requests back to back; TTFT grows with the
concurrency (120 ms at 1 to 380 ms at 32, as the seed's table), each user's decode slows as the batch
grows, and at 64 the service is unstable (TTFT and ITL past the example inventory's slo, 5% HTTP
500s). Seeded, so every call with the same arguments returns the same records.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from gpufleet.loadtest.gate import SloSource
from gpufleet.loadtest.record import RequestRecord
from gpufleet.schema.sections import Slo

T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z


@dataclass(frozen=True)
class SynthStep:
    concurrency: int
    ttft_ms: float  # median TTFT
    itl_ms: float  # median gap between tokens
    error_rate: float = 0.0


# The seed's rows (TTFT from its table; ITL so that concurrency x tokens / request time follows its
# output tokens/s: 185, 340, 520, 680, 760, then unstable).
SEED_STEPS: tuple[SynthStep, ...] = (
    SynthStep(1, 120, 5.0),
    SynthStep(4, 145, 10.5),
    SynthStep(8, 180, 14.0),
    SynthStep(16, 240, 21.0),
    SynthStep(32, 380, 37.0),
    SynthStep(64, 650, 95.0, error_rate=0.05),
)

EXAMPLE_SLO = Slo(
    ttft_p99_ms=500, itl_p99_ms=80, tpot_p99_ms=50, max_error_rate=0.01, min_output_tokens_per_s=500,
    availability_target=0.999,
)


def example_source(slo: Slo = EXAMPLE_SLO) -> SloSource:
    """The example inventory's objectives, as `slo_from_fleet("inventories/example")` returns them."""
    return SloSource(slo=slo, host="gpu-01", model="Qwen/Qwen2.5-7B-Instruct",
                     origin="inventories/example/group_vars/all.yml:7", inventory="inventories/example")


def step_records(
    step: SynthStep,
    rng: random.Random,
    start: float,
    *,
    min_requests: int = 120,
    output_tokens: int = 48,
    label: str | None = None,
) -> list[RequestRecord]:
    """One closed-loop step: `step.concurrency` users, each sending until `min_requests` are sent in all."""
    per_user = math.ceil(min_requests / step.concurrency)
    records = []
    for user in range(step.concurrency):
        t = start + user * 0.001
        for _ in range(per_user):
            name = f"concurrency={step.concurrency}" if label is None else label
            record = _request(step, rng, t, output_tokens, name, user)
            records.append(record)
            t += (record.e2e_s or 0.05) + 0.002
    return sorted(records, key=lambda r: (r.start_epoch, r.worker))


def _request(step: SynthStep, rng: random.Random, t: float, tokens: int, label: str, user: int) -> RequestRecord:
    if rng.random() < step.error_rate:
        return RequestRecord(start_epoch=t, api="openai-chat", step=label, status=500, error="HTTP 500: engine error",
                             worker=f"u{user}")
    ttft = step.ttft_ms / 1000 * rng.lognormvariate(0, 0.08)
    gaps = tuple(step.itl_ms / 1000 * rng.lognormvariate(0, 0.15) for _ in range(tokens - 1))
    return RequestRecord(
        start_epoch=t, api="openai-chat", step=label, ttft_s=ttft, itl_s=gaps, e2e_s=ttft + sum(gaps),
        content_chunks=tokens, usage_output_tokens=tokens, usage_input_tokens=512, expected_input_tokens=512,
        expected_output_tokens=tokens, status=200, worker=f"u{user}",
    )


def seed_run(steps: Sequence[SynthStep] = SEED_STEPS, seed: int = 7, **kwargs: int) -> list[RequestRecord]:
    """Every step one after the other (a second apart), as a stepped Locust run records them."""
    rng = random.Random(seed)
    records: list[RequestRecord] = []
    start = T0
    for step in steps:
        batch = step_records(step, rng, start, **kwargs)
        records += batch
        start = max(r.start_epoch + (r.e2e_s or 0) for r in batch) + 1.0
    return records
