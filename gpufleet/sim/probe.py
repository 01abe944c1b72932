"""A small closed-loop streaming client for checking a simulator (or any OpenAI-compatible server).

It drives `concurrency` clients, each sending its next streaming completion as soon as the last
one ended, and stamps every SSE chunk on arrival before parsing it. The simulator's calibration
test and capacity benchmark use it; gpufleet's Locust harness is the user-facing load tool.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from gpufleet.sim.tokenizer import text_of_tokens


@dataclass
class RequestSample:
    started: float
    first_token: float | None = None
    ended: float | None = None
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started


@dataclass(frozen=True)
class ProbeResult:
    concurrency: int
    window_s: float
    requests: int  # started in the window and finished
    errors: int
    ttft_mean_s: float
    ttft_p99_s: float
    itl_mean_s: float
    output_tokens_per_s: float  # tokens that arrived in the window / window


async def _one_request(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
                       sample: RequestSample) -> None:
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            sample.error = f"HTTP {response.status}: {(await response.text())[:200]}"
            return
        buffer = b""
        async for chunk in response.content.iter_any():
            now = time.monotonic()  # stamp before parsing
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                # a completion chunk with text is a token; no JSON parsing, so one client process
                # keeps up with a server streaming tens of thousands of tokens a second
                if not event.startswith(b"data: {") or b'"text":""' in event or b'"text":' not in event:
                    continue
                if sample.first_token is None:
                    sample.first_token = now
                sample.token_times.append(now)
    sample.ended = time.monotonic()


async def closed_loop(
    base_url: str,
    *,
    model: str,
    concurrency: int,
    prompt_tokens: int,
    output_tokens: int,
    warmup_s: float,
    window_s: float,
    stagger_s: float = 0.0,
    api_key: str | None = None,
) -> ProbeResult:
    """Run the load and measure the window [warmup, warmup + window] (clients start over `stagger_s`)."""
    url = f"{base_url.rstrip('/')}/v1/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    samples: list[RequestSample] = []
    start = time.monotonic()
    measure_from, measure_to = start + warmup_s, start + warmup_s + window_s

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        await asyncio.sleep(stagger_s * index / max(concurrency, 1))
        number = 0
        while time.monotonic() < measure_to:
            body = json.dumps({
                "model": model, "prompt": text_of_tokens(prompt_tokens, seed=index * 1000 + number),
                "max_tokens": output_tokens, "ignore_eos": True, "stream": True,
            }).encode()
            sample = RequestSample(started=time.monotonic())
            samples.append(sample)
            try:
                await _one_request(session, url, body, headers, sample)
            except aiohttp.ClientError as exc:
                sample.error = str(exc)
                await asyncio.sleep(0.1)  # a failing server is not hammered in a tight loop
            number += 1

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(client(i, session)) for i in range(concurrency)]
        await asyncio.sleep(max(0.0, measure_to - time.monotonic()))
        for task in tasks:  # requests still streaming at the window's end are cut off (the server aborts them)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return summarise(samples, concurrency, measure_from, measure_to)


def summarise(samples: list[RequestSample], concurrency: int, measure_from: float, measure_to: float) -> ProbeResult:
    done = [s for s in samples if measure_from <= s.started < measure_to and s.ttft is not None and s.error is None]
    ttfts = sorted(s.ttft for s in done if s.ttft is not None)
    gaps = [b - a for s in done for a, b in zip(s.token_times, s.token_times[1:], strict=False)]
    tokens = sum(1 for s in samples for t in s.token_times if measure_from <= t < measure_to)
    errors = sum(1 for s in samples if s.error and s.started >= measure_from)
    return ProbeResult(
        concurrency=concurrency,
        window_s=measure_to - measure_from,
        requests=len(done),
        errors=errors,
        ttft_mean_s=statistics.fmean(ttfts) if ttfts else float("nan"),
        ttft_p99_s=ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else float("nan"),
        itl_mean_s=statistics.fmean(gaps) if gaps else float("nan"),
        output_tokens_per_s=tokens / (measure_to - measure_from),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def sim_process(args: Sequence[str], prefix: Sequence[str] = (), start_timeout_s: float = 30.0
                ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run `gpufleet sim serve ARGS` on 127.0.0.1 and a free port; yield (process, base URL); stop it after.

    `prefix` goes before the command (e.g. `taskset -c 0`). The port is open once the simulated
    model has loaded, so the wait is for a connection, as a client would wait.
    """
    port = free_port()
    command = [*prefix, str(Path(sys.executable).parent / "gpufleet"), "sim", "serve", *args,
               "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise RuntimeError(f"the simulator did not start: {stderr[-2000:]}") from None
                time.sleep(0.1)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
