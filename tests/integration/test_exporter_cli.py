"""`gpufleet exporter` as its systemd unit runs it: a real process on loopback, scraped over HTTP.

`--simulate 4` runs against a real simulator process (`gpufleet sim serve`), loaded with streaming
requests, and its stand-in GPUs must follow that load; SIGTERM must end it with exit 0.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.gateway_harness import GPUFLEET, HOST, SimProcess, chat_body, free_port, running_sims
from tests.unit.exporter_scrape import Scrape


class ExporterProcess:
    """`gpufleet exporter --listen 127.0.0.1:<free port> FLAGS` in its own process."""

    def __init__(self, folder: Path, *flags: str) -> None:
        self.port = free_port()
        self.log = folder / f"exporter-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([str(GPUFLEET), "exporter", "--listen", f"{HOST}:{self.port}", *flags],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def scrape(self) -> Scrape:
        return Scrape(httpx.get(f"http://{HOST}:{self.port}/metrics", timeout=5).text)

    def wait_for(self, check: Callable[[Scrape], bool], what: str, timeout: float = 20.0) -> Scrape:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the exporter exited {self.proc.returncode}:\n{self.output()}"
            with contextlib.suppress(httpx.TransportError):
                last = self.scrape()
                if check(last):
                    return last
            time.sleep(0.1)
        raise AssertionError(f"{what}: not within {timeout} s; last scrape:\n{last.text if last else None}\n"
                             f"{self.output()}")

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def exporter(folder: Path, *flags: str) -> Iterator[ExporterProcess]:
    proc = ExporterProcess(folder, *flags)
    try:
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)


class Load:
    """`streams` streaming chat requests held open against the simulator until stopped."""

    def __init__(self, sim: SimProcess, streams: int, max_tokens: int) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._stream, args=(sim.port, max_tokens), daemon=True)
                        for _ in range(streams)]

    def _stream(self, port: int, max_tokens: int) -> None:
        with httpx.stream("POST", f"http://{HOST}:{port}/v1/chat/completions", json=chat_body(max_tokens),
                          timeout=60) as response:
            for _ in response.iter_lines():
                if self.stop.is_set():
                    return  # closing the connection aborts the request

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    # a small KV cache (1024 blocks = 16,384 tokens) so a few streams visibly fill it
    with running_sims(tmp_path_factory.mktemp("sim"), 1, "--num-gpu-blocks-override", "1024") as sims:
        yield sims[0]


def gpu(scrape: Scrape, metric: str, index: int) -> float:
    return scrape.value(f"gpufleet_gpu_{metric}", gpu=str(index))


def test_simulated_gpus_follow_the_engine_load_and_sigterm_exits_0(sim: SimProcess, tmp_path: Path) -> None:
    url = f"http://{HOST}:{sim.port}"
    with exporter(tmp_path, "--simulate", "4", "--interval", "0.2", "--engine-url", url,
                  "--engine-gpus", "0,1") as proc:
        idle = proc.wait_for(lambda s: len(s.find("gpufleet_gpu_up")) == 4 and s.has("gpufleet_gpu_processes",
                                                                                         gpu="0"),
                             "4 simulated GPUs, the engine's two with its process")
        assert idle.value("gpufleet_exporter_info", mode="simulate") == 1
        assert [v for _, v in idle.find("gpufleet_gpu_up")] == [1, 1, 1, 1]
        assert gpu(idle, "utilization_ratio", 0) == 0
        idle_memory = gpu(idle, "memory_used_bytes", 0)
        assert idle_memory > 0  # the engine's weights
        assert gpu(idle, "memory_used_bytes", 2) == 0  # no engine there
        idle_power = gpu(idle, "power_usage_watts", 0)

        with Load(sim, streams=8, max_tokens=4000):
            busy = proc.wait_for(
                lambda s: gpu(s, "utilization_ratio", 0) >= 0.5 and gpu(s, "memory_used_bytes", 0) > idle_memory,
                "utilization and memory of GPU 0 rising under load")
            assert gpu(busy, "utilization_ratio", 1) == gpu(busy, "utilization_ratio", 0)  # tensor parallel pair
            assert gpu(busy, "power_usage_watts", 0) > idle_power
            assert busy.value("gpufleet_gpu_clock_event_active", gpu="0", reason="gpu_idle") == 0
            assert gpu(busy, "utilization_ratio", 2) == 0
            assert gpu(busy, "memory_used_bytes", 2) == 0
        proc.wait_for(lambda s: gpu(s, "utilization_ratio", 0) == 0, "GPU 0 idle again after the load")

        assert proc.terminate() == 0
        out = proc.output()
        assert "SIMULATED GPUs: 4 stand-in NVIDIA GeForce RTX 4090 D" in out
        assert "Traceback" not in out


def test_without_a_driver_nvml_is_reported_down_not_fatal(tmp_path: Path) -> None:
    with exporter(tmp_path, "--interval", "0.2") as proc:
        scrape = proc.wait_for(lambda s: s.has("gpufleet_exporter_nvml_up"), "nvml_up reported")
        if scrape.value("gpufleet_exporter_nvml_up") == 0:  # this machine has no NVIDIA driver
            assert scrape.find("gpufleet_exporter_errors_total", kind="library")
            assert not scrape.has("gpufleet_gpu_up")
        else:  # a GPU host: every GPU it has answers
            assert scrape.find("gpufleet_gpu_up")
        assert scrape.value("gpufleet_exporter_info", mode="nvml") == 1
        assert proc.terminate() == 0


def test_address_in_use_exits_1_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([str(GPUFLEET), "exporter", "--listen", f"{HOST}:{port}"], capture_output=True,
                                text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot listen on {HOST}:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_flag_exits_2_before_starting(tmp_path: Path) -> None:
    result = subprocess.run([str(GPUFLEET), "exporter", "--simulate", "2", "--engine-gpus", "0,7", "--engine-url",
                             "http://127.0.0.1:1"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "error: engine http://127.0.0.1:1/metrics: GPU 7 does not exist" in result.stderr
