"""The gateway's added time to first token: TTFT through nginx vs straight to the same engine.

The issue's bound: TTFT through the gateway within 1 ms (p99) of direct. One simulator process
and one nginx with the gateway role's rendered files (tests/integration/gateway_harness.py) on
loopback; requests straight to the simulator and through nginx alternate (ABBA, so neither side
always goes first), one at a time on keep-alive connections, same body (a streamed chat,
max_tokens 1). TTFT is stamped right after the read that brought the first content chunk,
before any parsing; raw sockets, the GC paused.

Why the set-up is what it is (each was measured on the 2-vCPU development VM):
* the engine runs the bench profile without its 15 ms request overhead and with a 0.2 ms first
  step. The engine's time is the same on both paths and cancels in the difference, but its length
  exposes each request to this VM's 1-9 ms vCPU stalls (~10 a second): with the plain profile's
  ~18 ms TTFT, p99s of 200 requests a side moved by +-2.5 ms between identical runs;
* client, nginx and simulator share one CPU. Unpinned, each of the gateway's two extra hops is a
  wake-up on the other vCPU (an inter-processor interrupt through the hypervisor), ~0.15 ms at
  p50 and up to ~1 ms at p99 on this VM; pinned, the difference is nginx's own work;
* a measurement is valid only where the direct path's own p99 - p50 is at most 1 ms: wider, the
  p99s measure the machine's noise, not the gateway. An invalid measurement is repeated (at most
  3 times); the gateway's numbers play no part in that choice. Exit 0: valid and within the
  bound; 1: valid and over it; 2: the machine was too noisy to tell.

    .venv/bin/python benchmarks/bench_gateway_ttft.py [--pairs 2000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

import gpufleet.sim

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integration.gateway_harness import (
    Connection,
    ForeignLoad,
    NginxGateway,
    SimProcess,
    chat_body,
    new_key,
    percentile,
    pinned,
    running_sims,
)

KEY = new_key("bench")
CHAT = "/v1/chat/completions"
BOUND_MS = 1.0
MAX_REFERENCE_SPREAD_MS = 1.0
UNLIMITED = {"rate_per_second": 1000, "burst": 1000, "max_conns_per_key": 64}


def fast_profile(folder: Path) -> Path:
    """The bench profile without its fixed request overhead and with a 0.2 ms first step."""
    profile = yaml.safe_load((Path(gpufleet.sim.__file__).parent / "profiles" / "bench.yml").read_text())
    profile |= {"name": "bench-fast-ttft", "request_overhead_s": 0.0, "step_overhead_s": 0.0,
                "decode_s": {1: 0.0002, 512: 0.001}}
    path = folder / "bench-fast-ttft.yml"
    path.write_text(yaml.safe_dump(profile))
    return path


def measure(sim: SimProcess, gw: NginxGateway, pairs: int, warmup: int) -> dict[str, list[float]]:
    """TTFT in ms of `pairs` interleaved requests straight to `sim` and through `gw`."""
    body = json.dumps(chat_body(1)).encode()
    ports = {"direct": sim.port, "gateway": gw.port}
    conns = {arm: Connection(port) for arm, port in ports.items()}
    headers = {"direct": {}, "gateway": {"Authorization": f"Bearer {KEY.key}"}}
    ttft: dict[str, list[float]] = {"direct": [], "gateway": []}
    deadline = time.monotonic() + 60
    gc.disable()
    try:
        for i in range(pairs + warmup):
            if time.monotonic() > deadline:
                raise SystemExit(f"only {i} pairs in 60 s: something is wrong with the set-up")
            for arm in ("direct", "gateway") if i % 4 in (0, 3) else ("gateway", "direct"):
                conn = conns[arm]
                reply = conn.receive(conn.send("POST", CHAT, body, headers[arm]))
                first = reply.tokens()
                if reply.status != 200 or not reply.stream_done or not first:
                    raise SystemExit(f"{arm}: a request failed: {reply.status} {reply.body[:300]!r}")
                if i >= warmup:
                    ttft[arm].append((first[0][0] - reply.sent_at) * 1e3)
                if reply.headers.get("connection") == "close":  # nginx's keepalive_requests (1000)
                    conn.close()
                    conns[arm] = Connection(ports[arm])
                time.sleep(0.0002)
    finally:
        gc.enable()
        for conn in conns.values():
            conn.close()
    return ttft


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    print(f"machine: {os.uname().machine}, {os.cpu_count()} CPUs, CPython {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        with running_sims(tmp, 1, "--profile", str(fast_profile(tmp))) as (sim,), \
                NginxGateway(tmp / "gateway", [sim], [KEY], **UNLIMITED) as gw:
            ours = [os.getpid(), sim.proc.pid, gw.proc.pid, *gw.workers()]
            cpu = max(os.sched_getaffinity(0))
            with pinned(ours, cpu):
                for number in range(1, 4):
                    with ForeignLoad(ours, cpu) as load:
                        ttft = measure(sim, gw, args.pairs, args.warmup)
                    stats = {arm: {q: percentile(v, q) for q in (50, 90, 99)} for arm, v in ttft.items()}
                    spread = stats["direct"][99] - stats["direct"][50]
                    diff = stats["gateway"][99] - stats["direct"][99]
                    print(f"measurement {number}: {args.pairs} pairs, others took {load.share:.0%} of CPU {cpu}")
                    for arm, s in stats.items():
                        print(f"  {arm:8} TTFT ms  p50 {s[50]:.3f}  p90 {s[90]:.3f}  p99 {s[99]:.3f}  "
                              f"max {max(ttft[arm]):.3f}")
                    print(f"  gateway - direct: p50 {stats['gateway'][50] - stats['direct'][50]:+.3f} ms, "
                          f"p99 {diff:+.3f} ms (bound {BOUND_MS} ms); direct p99 - p50 {spread:.3f} ms")
                    if spread <= MAX_REFERENCE_SPREAD_MS:
                        verdict = "within" if diff <= BOUND_MS else "OVER"
                        print(f"valid measurement: the gateway's p99 TTFT is {verdict} {BOUND_MS} ms of direct")
                        return 0 if diff <= BOUND_MS else 1
                    print("  not valid: the direct path itself spread over 1 ms (machine noise); again")
    print("the machine was too noisy to resolve 1 ms at p99; run it on a quieter machine")
    return 2


if __name__ == "__main__":
    sys.exit(main())
