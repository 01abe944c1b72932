"""The Locust users against a real simulator: every token's timing checked against what the server wrote.

The simulator (`gpufleet sim serve`, its own process on 127.0.0.1, API key required) logs when it
finished writing each token (`/admin/token-log`, CLOCK_MONOTONIC); the users stamp reads with
perf_counter, the same clock on this host. Locust runs as users run it: `locust -f
loadtests/locustfile.py --headless ...` in a subprocess, its raw records written by the master
(`--gpufleet-records-file`).

- accuracy: 64 OpenAIChatUsers in one Locust process for 15 s; every token matched with the one the
  server wrote, |measured - server-written| within 0.5 ms at p50 and 5 ms at p99 for TTFT and ITL.
  That is a correctness bound: it fails when a read waits for a buffer to fill (32 ms p99), when
  parsing moves back onto the hot path (7-12 ms) or when timestamps come from the wrong place,
  and it holds on a VM whose host steals its CPU. The issue's 2 ms p99 acceptance is a timing
  target, measured across load levels by benchmarks/bench_loadtest_client.py (results page:
  1.54 ms ITL and 0.68 ms TTFT at 64 streams, held to 128), where a noisy host is repeated rather
  than failed: a valid run here once measured 2.6 ms TTFT p99 with steal in 19% of its
  intervals. The simulator and Locust run on
  CPUs of their own, as a load generator should: on the 2-vCPU development VM the simulator's
  frontend spins through the last millisecond before each token, and unpinned, the scheduler now
  and then puts Locust on its CPU, where both lose milliseconds (docs/loadtest.md, "Timing");
- distributed: `--processes 2` (a master and two workers); the master holds every record, exactly
  the requests the simulator finished. The simulator stops stepping after N requests
  (`--hang-after-requests`), so no request can finish while Locust stops its users: the count
  is exact, not raced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import gpufleet.sim
from gpufleet.loadtest.calibration import (
    MIN_ITL_SAMPLES,
    MIN_TTFT_SAMPLES,
    StealWatch,
    TimingErrors,
    compare,
    percentile,
)
from gpufleet.loadtest.record import RequestRecord
from tests.integration.gateway_harness import HOST, SimProcess, running_sims

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).parent / "locust"
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
P50_BOUND_MS = 0.5
P99_BOUND_MS = 5.0
TRIES = 5


def key_file(folder: Path) -> Path:
    path = folder / "api.key"
    path.write_text("sk-gf-loadtest-accuracy-0123456789abcdef\n")
    os.chmod(path, 0o600)
    return path


def no_eos_profile(folder: Path, **changes: object) -> Path:
    """The bench profile without EOS, with `changes`: every answer runs to max_tokens (an answer
    that is only an EOS has no text, a failure, which would fail Locust's exit code)."""
    profile = yaml.safe_load((Path(gpufleet.sim.__file__).parent / "profiles" / "bench.yml").read_text())
    path = folder / "bench-no-eos.yml"
    path.write_text(yaml.safe_dump(profile | {"name": "bench-no-eos", "eos_probability": 0.0, **changes}))
    return path


def even_profile(folder: Path, streams: int, itl_s: float) -> Path:
    """Every step `itl_s` long, its `streams` tokens released evenly across it (a token every itl_s/streams).

    A known schedule without idle gaps: on a VM, a vCPU that idles for milliseconds halts, and
    waking it is the hypervisor's business (0.2 ms at p50, 1.5 ms at p99, 8 ms at worst after
    16 ms idle on the development VM: docs/loadtest.md), which the comparison would charge to the
    load generator. With a token every ~0.3 ms neither process idles long enough for that.
    """
    return no_eos_profile(folder, decode_s={1: itl_s}, step_overhead_s=0.0, kv_read_s_per_token=0.0,
                          request_overhead_s=0.002, frontend_token_s=itl_s / streams * 0.98)


def cpus() -> tuple[set[int], set[int]]:
    """One CPU for the simulator (and this test), another for Locust; all for both on a 1-CPU machine."""
    allowed = sorted(os.sched_getaffinity(0))
    return ({allowed[0]}, {allowed[1]}) if len(allowed) > 1 else (set(allowed), set(allowed))


def pin(sim: SimProcess, sim_cpus: set[int]) -> None:
    """The simulator's threads and this process on `sim_cpus`."""
    for task in Path(f"/proc/{sim.proc.pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), sim_cpus)
    os.sched_setaffinity(0, sim_cpus)


def run_locust(folder: Path, sim: SimProcess, key: Path, *args: str, timeout: float = 120,
               on_cpus: set[int] | None = None, locustfiles: str = str(LOCUSTFILE)) -> list[RequestRecord]:
    """`locust --headless` against `sim` (on `on_cpus`); the master's raw records (it must exit 0: no failure)."""
    records = folder / "records.jsonl"
    command = [str(LOCUST), "-f", locustfiles, "--headless", "--only-summary", "--host", f"http://{sim.server}",
               "--gpufleet-api-key-file", str(key), "--gpufleet-records-file", str(records), *args]
    allowed = on_cpus or os.sched_getaffinity(0)
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=lambda: os.sched_setaffinity(0, allowed))
    output = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"locust exited {proc.returncode}:\n{output}"
    assert records.exists(), output
    return [RequestRecord.from_dict(json.loads(line)) for line in records.read_text().splitlines()]


@dataclass
class Measurement:
    records: list[RequestRecord]
    errors: TimingErrors
    sim_lag_p99_ms: float  # the simulator's own lateness behind its schedule, outside stolen moments
    disturbed: float  # the share of the run's 20 ms intervals in which the hypervisor stole Locust's CPU

    def check_complete(self) -> None:
        """Every request of the run served and matched, whatever the host's noise left to compare."""
        ok = [r for r in self.records if r.ok]
        assert len(ok) == len(self.records) >= 400, f"{len(self.records)} records, {len(self.records) - len(ok)} failed"
        assert all(r.status == 200 and r.usage_output_tokens == 64 and r.content_chunks for r in ok)
        assert {r.worker for r in self.records} == {"local"}
        assert self.errors.matched == len(ok) and self.errors.unmatched == self.errors.inconsistent == 0


def measure_64_streams(folder: Path) -> Measurement:
    """64 OpenAIChatUsers for 15 s, Locust and the simulator on CPUs of their own."""
    folder.mkdir()
    key = key_file(folder)
    # 20 ms between a stream's tokens (50 tokens/s each), 3,200 tokens/s in all
    flags = ("--profile", str(even_profile(folder, 64, 0.020)), "--api-key-file", str(key),
             "--token-log-tokens", "5000000")
    own = os.sched_getaffinity(0)
    sim_cpus, locust_cpus = cpus()
    with running_sims(folder, 1, *flags) as (sim,):
        pin(sim, sim_cpus)
        try:
            with StealWatch(locust_cpus, interval_s=0.02, margin_s=0.01) as steal:
                records = run_locust(folder, sim, key, "-u", "64", "-r", "64", "-t", "15s", "--gpufleet-max-tokens",
                                     "64", on_cpus=locust_cpus)
        finally:
            os.sched_setaffinity(0, own)
        log = sim.token_log()
    lags = [(w - s) * 1e3 for entry in log.values() for w, s in zip(entry["written"], entry["scheduled"], strict=True)
            if not any(start <= w <= end for start, end in steal.windows)]
    return Measurement(records, compare([r for r in records if r.ok], log, exclude=steal.windows),
                       percentile(lags, 99), steal.disturbed_share)


def test_64_streams_are_timed_to_the_servers_own_record(tmp_path: Path) -> None:
    """|measured - server-written| within 0.5 ms at p50 and 5 ms at p99 for TTFT and ITL at 64 streams
    (the 2 ms p99 acceptance is the benchmark's, see the module docstring).

    The tokens come evenly (`even_profile`), so neither process idles long enough for the VM to
    halt its vCPU. Other load on the host still takes a vCPU away for milliseconds now and then
    (steal time, in bursts of seconds on the development VM), and what arrives meanwhile is
    stamped late by any client. So the samples of the 20 ms intervals (and the one before) in
    which the hypervisor stole Locust's CPU are left out (calibration.StealWatch; counted in
    `excluded`; steal on the simulator's CPU delays its writes, not the times it logs after
    them). On a busy host that can leave one run too few samples for a p99 (a CI host stole in
    42-55% of the intervals of every try, leaving 790-4,600 ITL samples a run, yet those had
    p99 errors of 1.1-1.4 ms): so the undisturbed samples of up to 5 runs are pooled until
    they reach the count, each run checked whole on its own.
    """
    pooled = TimingErrors()
    for attempt in range(1, TRIES + 1):
        run = measure_64_streams(tmp_path / f"try-{attempt}")
        print(f"\ntry {attempt}: {len(run.records)} requests, simulator write lag p99 {run.sim_lag_p99_ms:.2f} ms, "
              f"steal in {run.disturbed:.0%} of the run: {json.dumps(run.errors.summary(), indent=1)}")
        run.check_complete()
        pooled = pooled.pooled(run.errors)
        if pooled.enough_for_p99():
            break
    else:
        pytest.fail(f"the machine was too noisy to measure: the hypervisor stole Locust's CPU so often in {TRIES} "
                    f"runs (the last: {run.disturbed:.0%} of its 20 ms intervals) that only {len(pooled.ttft_ms)} TTFT "
                    f"and {len(pooled.itl_ms)} ITL samples were undisturbed (a p99 needs {MIN_TTFT_SAMPLES} and "
                    f"{MIN_ITL_SAMPLES}); run it when the host is quieter")
    summary = pooled.summary()
    print(f"pooled over {attempt} run(s): {json.dumps(summary, indent=1)}")
    for metric in ("ttft_ms", "itl_ms"):
        assert summary[metric]["p50_abs"] <= P50_BOUND_MS, summary
        assert summary[metric]["p99_abs"] <= P99_BOUND_MS, summary


def test_the_master_receives_every_record_of_two_workers(tmp_path: Path) -> None:
    key = key_file(tmp_path)
    finished = 300
    flags = ("--profile", str(no_eos_profile(tmp_path)), "--api-key-file", str(key), "--hang-after-requests",
             str(finished), "--token-log-tokens", "1000000")
    with running_sims(tmp_path, 1, *flags) as (sim,):
        records = run_locust(tmp_path, sim, key, "--processes", "2", "-u", "32", "-r", "32", "-t", "12s",
                             "--gpufleet-max-tokens", "16", "--gpufleet-api", "openai-completions")
        log = sim.token_log()
    served = {request_id for request_id, entry in log.items() if entry["finish_reason"] in ("length", "stop")}
    assert len(served) >= finished
    assert all(r.ok and r.api == "openai-completions" for r in records)
    ids = [r.extra["response_id"] for r in records]
    assert len(ids) == len(set(ids))
    assert set(ids) == served  # every finished request, once, and nothing else
    workers = {r.worker for r in records}
    assert len(workers) == 2 and "local" not in workers
    assert compare(records, log).matched == len(records)


def test_a_wrong_key_fails_every_request_with_the_servers_message(tmp_path: Path) -> None:
    key = key_file(tmp_path)
    wrong = tmp_path / "wrong.key"
    wrong.write_text("sk-gf-not-the-right-key-000000000000\n")
    os.chmod(wrong, 0o600)
    records_file = tmp_path / "records.jsonl"
    with running_sims(tmp_path, 1, "--api-key-file", str(key)) as (sim,):
        proc = subprocess.run(
            [str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "--only-summary", "--host", f"http://{HOST}:{sim.port}",
             "--gpufleet-api-key-file", str(wrong), "--gpufleet-records-file", str(records_file), "-u", "2", "-r", "2",
             "-t", "2s"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1  # Locust's exit code when requests failed
    records = [RequestRecord.from_dict(json.loads(line)) for line in records_file.read_text().splitlines()]
    assert records and all(r.status == 401 and r.error == "HTTP 401: Unauthorized" for r in records)
    assert "HTTP 401: Unauthorized" in proc.stdout + proc.stderr  # Locust's failure table
    assert "sk-gf-not-the-right-key" not in proc.stdout + proc.stderr


def test_a_key_file_others_can_read_is_refused_before_any_request(tmp_path: Path) -> None:
    key = key_file(tmp_path)
    os.chmod(key, 0o644)
    proc = subprocess.run(
        [str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "--host", f"http://{HOST}:9", "--gpufleet-api-key-file",
         str(key), "-u", "1", "-t", "1s"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "is readable by others (mode 0644)" in proc.stderr and "chmod 600" in proc.stderr


def test_the_run_time_counts_from_the_start_of_the_run_however_slow_the_start(tmp_path: Path) -> None:
    """`-t 3s` gives 3 s of requests even when the locustfiles took seconds to import, as on a busy
    host: Locust's timer counts from gevent's cached clock, which the users read afresh at init
    (users.count_run_time_from_now). Without that, the import's 2.5 s plus Locust's own ~1.5 s
    came off the 3 s and the run ended before a request finished."""
    slow = tmp_path / "slow_import.py"
    slow.write_text("import time\n\nend = time.perf_counter() + 2.5\nwhile time.perf_counter() < end:  # gevent's loop "
                    "does not run meanwhile\n    pass\n")
    key = key_file(tmp_path)
    with running_sims(tmp_path, 1, "--profile", str(no_eos_profile(tmp_path)), "--api-key-file", str(key)) as (sim,):
        records = run_locust(tmp_path, sim, key, "-u", "2", "-r", "2", "-t", "3s", "--gpufleet-max-tokens", "16",
                             locustfiles=f"{LOCUSTFILE},{slow}")
    assert records, "no request finished: the run ended as it began"
    first_sent = min(r.start_epoch for r in records)
    last_ended = max(r.start_epoch + (r.e2e_s or 0.0) for r in records)
    assert last_ended - first_sent >= 2.5, f"requests over {last_ended - first_sent:.2f} s of a 3 s run"


def test_tgi_users_stream_generate_stream(tmp_path: Path) -> None:
    key = key_file(tmp_path)
    flags = ("--api", "tgi", "--profile", str(no_eos_profile(tmp_path)), "--api-key-file", str(key))
    with running_sims(tmp_path, 1, *flags) as (sim,):
        records = run_locust(tmp_path, sim, key, "-u", "4", "-r", "4", "-t", "3s", "--gpufleet-max-tokens", "16",
                             "TgiUser")
    assert len(records) >= 8
    for record in records:
        assert record.ok and record.api == "tgi" and record.status == 200
        assert record.usage_output_tokens == 16 == record.extra["text_events"]
        assert record.extra["finish_reason"] == "length" and 1 <= record.content_chunks <= 16
        assert record.ttft_s is not None and record.e2e_s is not None and record.e2e_s >= record.ttft_s
        assert len(record.itl_s) == record.content_chunks - 1
