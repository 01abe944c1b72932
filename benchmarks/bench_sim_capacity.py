"""Simulator capacity: concurrent streams and output tokens/s one process serves on one core,
and how closely the tokens it writes follow the model's schedule.

The simulator runs pinned to CPU 0 (`taskset -c 0`), the load client pinned to CPU 1. The client
keeps `--streams` streaming completions open (closed loop, `ignore_eos`, fixed lengths) for a
warm-up and a measured window, counting tokens as they arrive. Afterwards the simulator's
`/admin/token-log` gives, for every token, the time the model scheduled it and the time the
server finished writing it; the lag (written - scheduled) over the window is the figure that
must stay within 1 ms p99.

    .venv/bin/python benchmarks/bench_sim_capacity.py [--streams 512] [--window 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
import urllib.request
from pathlib import Path

from gpufleet.sim.probe import closed_loop, sim_process
from gpufleet.sim.profile import load_profile


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args()

    # the bench profile carries its layout (Llama-3.1-8B on an H100, max_num_seqs 512, fp8 KV blocks)
    sim_args = ["--profile", "bench", "--startup-delay", "0", "--token-log-tokens", "2000000"]
    if args.streams > 512:
        sim_args += ["--max-num-seqs", str(args.streams)]
    with sim_process(sim_args, prefix=["taskset", "-c", "0"]) as (server, base):
        os.sched_setaffinity(0, {1})
        cpu_before = _cpu_seconds(server.pid)
        client_before = _cpu_seconds(os.getpid())
        started = time.monotonic()
        result = asyncio.run(closed_loop(
            base, model=load_profile("bench").engine["served_model_name"], concurrency=args.streams,
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens, warmup_s=args.warmup, window_s=args.window, stagger_s=args.warmup / 2,
        ))
        elapsed = time.monotonic() - started
        cpu = (_cpu_seconds(server.pid) - cpu_before) / elapsed
        client_cpu = (_cpu_seconds(os.getpid()) - client_before) / elapsed
        with urllib.request.urlopen(f"{base}/admin/token-log", timeout=60) as response:  # loopback only
            log = json.load(response)
        window_start = log["now"] - (time.monotonic() - (started + args.warmup))
        window_end = window_start + args.window
        lags = [
            (written - scheduled) * 1000
            for record in log["requests"]
            for scheduled, written in zip(record["scheduled"], record["written"], strict=False)
            if window_start <= scheduled < window_end
        ]

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, CPython {platform.python_version()}; "
          "simulator pinned to CPU 0, client to CPU 1")
    print(f"streams: {args.streams} (prompt {args.prompt_tokens}, output {args.output_tokens} tokens, closed loop); "
          f"window {args.window:.0f} s after {args.warmup:.0f} s warm-up")
    print(f"output tokens/s received by the client: {result.output_tokens_per_s:,.0f}")
    print(f"simulator CPU: {cpu * 100:.0f}% of one core over the run (client: {client_cpu * 100:.0f}%)")
    print(f"tokens in the window: {len(lags):,}; write lag behind the model's schedule: "
          f"p50 {_percentile(lags, 0.5):.3f} ms, p99 {_percentile(lags, 0.99):.3f} ms, "
          f"p99.9 {_percentile(lags, 0.999):.3f} ms, max {max(lags):.3f} ms")
    print(f"client-side: TTFT mean {result.ttft_mean_s * 1000:.1f} ms, ITL mean {result.itl_mean_s * 1000:.2f} ms, "
          f"errors {result.errors}")


if __name__ == "__main__":
    main()
