"""The load shapes in real headless Locust runs against the simulator on 127.0.0.1.

A minimal user of this file's own (non-streaming chat requests, one record per request) keeps
these tests independent of the streaming users: they check what the shapes promise. The step
ramp (1 then 2 users, 2 s warm-up and 3 s measured each) ends by itself and labels every request
by the step it was sent in; the open loop keeps its Poisson schedule, records each request's
intended time, and ends once its answers are in. Also: prompts aligned through the simulator's
`/tokenize` arrive with exactly the intended prompt_tokens.

Locust runs in a child process (it monkey-patches the process it is imported in).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from gpufleet.loadtest.prompts import TokenizeAligner, prompt_source, vllm_token_counter
from gpufleet.loadtest.record import RequestRecord
from gpufleet.sim.probe import sim_process

pytestmark = pytest.mark.integration

LOCUST = str(Path(sys.executable).parent / "locust")
MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # the bench profile's model
OUTPUT_TOKENS = 16

# The user both tests run: a chat request per task; its record is one JSON line in $RECORDS.
MINIMAL_USER = f'''
import json, os, time
from locust import HttpUser
from gpufleet.loadtest.prompts import prompt_source
from gpufleet.loadtest.record import RequestRecord
from gpufleet.loadtest.shapes import current_step

RECORDS = os.environ["RECORDS"]
MODEL = "{MODEL}"


class MinimalSender(HttpUser):
    abstract = True
    source = prompt_source("synthetic-chat", 200, {OUTPUT_TOKENS}, seed=os.getpid())

    def send(self, prompt, intended_epoch, step):
        start = time.time()
        response = self.client.post("/v1/chat/completions", json=prompt.openai_chat_body(MODEL), name=step or "-")
        end = time.time()
        usage = response.json().get("usage", {{}}) if response.status_code == 200 else {{}}
        record = RequestRecord(
            start_epoch=start, api="openai-chat", step=step, intended_epoch=intended_epoch,
            e2e_s=end - start, usage_input_tokens=usage.get("prompt_tokens"),
            usage_output_tokens=usage.get("completion_tokens"),
            expected_input_tokens=prompt.expected_input_tokens,
            expected_output_tokens=prompt.expected_output_tokens, status=response.status_code,
            worker=str(os.getpid()), extra={{"user": id(self), "end_epoch": end}},
        )
        with open(RECORDS, "a", encoding="utf-8") as out:
            out.write(json.dumps(record.to_dict()) + "\\n")
'''

STEP_RAMP = MINIMAL_USER + '''
from locust import task
from gpufleet.loadtest.shapes import StepRampShape


class ClosedLoopUser(MinimalSender):
    @task
    def ask(self):
        self.send(self.source(), None, current_step(self.environment))


class TinyRamp(StepRampShape):
    concurrencies = (1, 2)
    warmup_s = 2.0
    measure_s = 3.0
'''

OPEN_LOOP = MINIMAL_USER + '''
from gpufleet.loadtest.shapes import OpenLoopDispatcher, OpenLoopPlan, OpenLoopShape


class Dispatcher(OpenLoopDispatcher, MinimalSender):
    prompts = MinimalSender.source


class PoissonArrivals(OpenLoopShape):
    plan = OpenLoopPlan(rates=(8.0,), warmup_s=1.0, measure_s=3.0, burstiness=1.0, seed=3, max_in_flight=32)
    dispatcher = Dispatcher
    lead_s = 1.0
    drain_s = 30.0
'''


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with sim_process(["--profile", "bench", "--startup-delay", "0"]) as (_, url):
        yield url


def run_locust(tmp_path: Path, locustfile: str, url: str, timeout_s: float = 90
               ) -> tuple[subprocess.CompletedProcess[str], float, list[RequestRecord]]:
    path = tmp_path / "locustfile.py"
    path.write_text(textwrap.dedent(locustfile), encoding="utf-8")
    records = tmp_path / "records.jsonl"
    env = {**os.environ, "RECORDS": str(records)}
    started = time.monotonic()
    proc = subprocess.run([LOCUST, "-f", str(path), "--headless", "--host", url, "--only-summary",
                           "--loglevel", "WARNING"], capture_output=True, text=True, timeout=timeout_s, env=env,
                          cwd=tmp_path)
    elapsed = time.monotonic() - started
    lines = records.read_text(encoding="utf-8").splitlines() if records.exists() else []
    return proc, elapsed, [RequestRecord.from_dict(json.loads(line)) for line in lines]


def overlapping(records: list[RequestRecord]) -> bool:
    spans = sorted((r.start_epoch, r.extra["end_epoch"]) for r in records)
    return any(later[0] < earlier[1] for earlier, later in pairwise(spans))


def test_step_ramp_ends_by_itself_and_labels_requests_by_step(tmp_path: Path, sim_url: str) -> None:
    proc, elapsed, records = run_locust(tmp_path, STEP_RAMP, sim_url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 10 <= elapsed < 30  # 2 steps x (2 s + 3 s), no --run-time: the shape ended the run
    by_step: dict[str, list[RequestRecord]] = {}
    for record in records:
        by_step.setdefault(record.step, []).append(record)
    expected = ["warmup:concurrency=1", "concurrency=1", "warmup:concurrency=2", "concurrency=2"]
    assert [step for step in expected if len(by_step.get(step, [])) >= 3] == expected, sorted(by_step)
    assert set(by_step) <= {*expected, ""}  # "": sent in the last second, after the plan ended
    assert all(r.status == 200 and r.error is None for r in records)
    # one user in the first measured window, two in the second, both sending at once
    assert len({r.extra["user"] for r in by_step["concurrency=1"]}) == 1
    assert not overlapping(by_step["concurrency=1"])
    assert len({r.extra["user"] for r in by_step["concurrency=2"]}) == 2
    assert overlapping(by_step["concurrency=2"])
    # the step windows follow each other in time: labels are taken at send time
    first = min(r.start_epoch for r in records)
    assert max(r.start_epoch for r in by_step["concurrency=1"]) - first < 5.0 + 0.5
    assert min(r.start_epoch for r in by_step["concurrency=2"]) - first > 7.0 - 0.5
    # prompts and output lengths arrive exactly as built
    assert all(r.usage_input_tokens == r.expected_input_tokens == 200 for r in records)
    assert all(r.usage_output_tokens == r.expected_output_tokens == OUTPUT_TOKENS for r in records)


def test_open_loop_keeps_its_schedule_and_ends_when_answered(tmp_path: Path, sim_url: str) -> None:
    proc, elapsed, records = run_locust(tmp_path, OPEN_LOOP, sim_url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 20  # 1 s lead + 4 s of arrivals, then done: well before drain_s
    assert len(records) == 32  # 8/s x 4 s
    assert all(r.status == 200 and r.intended_epoch is not None for r in records)
    lags = [r.dispatch_lag_s for r in records if r.dispatch_lag_s is not None]
    assert len(lags) == 32 and min(lags) > -0.005 and max(lags) < 0.1
    intended = sorted(r.intended_epoch for r in records if r.intended_epoch is not None)
    gaps = [b - a for a, b in pairwise(intended)]
    assert statistics.fmean(gaps) == pytest.approx(4.0 / 32, rel=0.35)  # Poisson at 8/s, rescaled to 4 s
    warm = [r for r in records if r.step == "warmup:rate=8"]
    measured = [r for r in records if r.step == "rate=8"]
    assert len(warm) + len(measured) == 32 and warm and measured
    assert max(r.intended_epoch or 0 for r in warm) < min(r.intended_epoch or 0 for r in measured)


def test_prompts_aligned_through_tokenize_arrive_with_exact_prompt_tokens(sim_url: str) -> None:
    aligner = TokenizeAligner(vllm_token_counter(sim_url, MODEL), MODEL)
    for kind, path in (("synthetic-chat", "/v1/chat/completions"), ("synthetic-text", "/v1/completions")):
        source = prompt_source(kind, 1024, 8, seed=2, aligner=aligner, max_model_len=8192)
        prompt = source()
        body = prompt.openai_chat_body(MODEL) if prompt.messages else prompt.openai_completions_body(MODEL)
        request = urllib.request.Request(sim_url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            usage = json.load(response)["usage"]
        assert usage["prompt_tokens"] == 1024 and usage["completion_tokens"] == 8
