"""`--simulate`: engine metrics in, stand-in GPU readings out; and the exporter's command-line checks."""

from __future__ import annotations

import argparse

import pytest

from gpufleet.cli.exporter_cmd import engine_sources, parse_listen
from gpufleet.cli.main import build_parser
from gpufleet.exporter.collector import GpuCollector, build_registry
from gpufleet.exporter.nvml import Nvml
from gpufleet.exporter.sampler import Sampler
from gpufleet.exporter.simulate import (
    EngineLoad,
    EngineSource,
    Simulation,
    metrics_url,
    parse_load,
)
from gpufleet.testbed.pci import gpu_uuid
from tests.unit.exporter_scrape import Clock, Scrape

VLLM_TEXT = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 6.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.4
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",gpu_memory_utilization="0.95",engine="0"} 1.0
"""
TGI_TEXT = """\
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 3
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 2500
# TYPE tgi_batch_max_total_tokens gauge
tgi_batch_max_total_tokens 10000
"""
GIB = 1024**3


def test_vllm_load() -> None:
    assert parse_load(VLLM_TEXT) == EngineLoad(6.0, 0.4, 0.95)
    older = VLLM_TEXT.replace("kv_cache_usage_perc", "gpu_cache_usage_perc")
    assert parse_load(older) == EngineLoad(6.0, 0.4, 0.95)


def test_tgi_load() -> None:
    assert parse_load(TGI_TEXT) == EngineLoad(3.0, 0.25, 0.9)


class Engines:
    """Engine loads by URL, set by the test; None: the engine does not answer."""

    def __init__(self) -> None:
        self.loads: dict[str, EngineLoad | None] = {}

    def __call__(self, url: str) -> EngineLoad | None:
        return self.loads.get(url)


def simulated(count: int = 4) -> tuple[Simulation, Engines, Clock, Sampler]:
    engines, clock = Engines(), Clock()
    sources = [EngineSource("http://127.0.0.1:8000/metrics", (0, 1)), EngineSource("http://127.0.0.1:8001/metrics",
                                                                                   (2,))]
    sim = Simulation(count, sources, host="gpu-01", clock=clock, fetch=engines)
    sampler = Sampler(Nvml(sim.fake), interval=5, clock=clock, before_sample=sim.refresh,
                      process_name=sim.fake.process_name)
    return sim, engines, clock, sampler


def scrape(sampler: Sampler) -> Scrape:
    from prometheus_client import generate_latest

    return Scrape(generate_latest(build_registry(GpuCollector(sampler, mode="simulate"),
                                                 process_metrics=False)).decode())


def test_gpus_follow_their_engine_and_idle_gpus_stay_idle() -> None:
    _, engines, _, sampler = simulated()
    engines.loads["http://127.0.0.1:8000/metrics"] = EngineLoad(4, 0.5, 0.9)
    sampler.run_once()
    s = scrape(sampler)
    total = 24564 * 1024 * 1024
    for gpu in ("0", "1"):
        assert s.value("gpufleet_gpu_utilization_ratio", gpu=gpu) == 0.5
        assert s.value("gpufleet_gpu_memory_used_bytes", gpu=gpu) == int(0.9 * total * (0.25 + 0.75 * 0.5))
        assert s.value("gpufleet_gpu_processes", gpu=gpu) == 1
        assert s.value("gpufleet_gpu_process_memory_used_bytes", gpu=gpu, process="gpufleet-sim") > 0
        assert s.value("gpufleet_gpu_clock_event_active", gpu=gpu, reason="gpu_idle") == 0
        assert s.value("gpufleet_gpu_power_usage_watts", gpu=gpu) == pytest.approx(25.5 + (382.5 - 25.5) * 0.5)
    # engine 8001 does not answer: its GPU idles with nothing on it; GPU 3 has no engine
    for gpu in ("2", "3"):
        assert s.value("gpufleet_gpu_utilization_ratio", gpu=gpu) == 0
        assert s.value("gpufleet_gpu_memory_used_bytes", gpu=gpu) == 0
        assert s.value("gpufleet_gpu_processes", gpu=gpu) == 0
        assert s.value("gpufleet_gpu_clock_event_active", gpu=gpu, reason="gpu_idle") == 1
        assert s.value("gpufleet_gpu_pcie_link_generation", gpu=gpu, link="current") == 1
    assert s.value("gpufleet_exporter_info", mode="simulate") == 1
    assert s.value("gpufleet_gpu_driver_info", driver_version="simulated") == 1
    assert s.value("gpufleet_gpu_up", gpu="0", uuid=gpu_uuid("gpu-01", 0), name="NVIDIA GeForce RTX 4090 D") == 1
    assert s.value("gpufleet_gpu_info", gpu="3", pci_bus_id="00000000:04:00.0") == 1


def test_full_load_saturates_and_heats_up_over_time() -> None:
    _, engines, clock, sampler = simulated()
    engines.loads["http://127.0.0.1:8000/metrics"] = EngineLoad(20, 1.0, 0.9)
    sampler.run_once()
    temperatures = []
    for _ in range(40):
        clock.now += 5
        sampler.run_once()
        temperatures.append(scrape(sampler).value("gpufleet_gpu_temperature_celsius", gpu="0"))
    s = scrape(sampler)
    assert s.value("gpufleet_gpu_utilization_ratio", gpu="0") == 1
    assert temperatures == sorted(temperatures)
    assert 35 < temperatures[0] < temperatures[-1] <= 80
    assert temperatures[-1] >= 78  # 200 s is several 30 s time constants
    assert s.value("gpufleet_gpu_energy_consumed_joules_total", gpu="0") == pytest.approx(200 * 382.5, rel=0.01)
    assert s.value("gpufleet_gpu_memory_used_bytes", gpu="0") <= s.value("gpufleet_gpu_memory_total_bytes", gpu="0")

    engines.loads["http://127.0.0.1:8000/metrics"] = EngineLoad(0, 0.0, 0.9)
    for _ in range(40):
        clock.now += 5
        sampler.run_once()
    s = scrape(sampler)
    assert s.value("gpufleet_gpu_utilization_ratio", gpu="0") == 0
    assert s.value("gpufleet_gpu_temperature_celsius", gpu="0") <= 37


@pytest.mark.parametrize(("count", "sources", "message"), [
    (0, [], "1 to 16"),
    (2, [EngineSource("u", (2,))], "GPU 2 does not exist"),
    (4, [EngineSource("a", (0, 1)), EngineSource("b", (1,))], "GPU 1 is given to two engines"),
])
def test_simulation_refuses_impossible_layouts(count: int, sources: list[EngineSource], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Simulation(count, sources, host="h")


def test_simulated_gpu_model_from_the_catalogue() -> None:
    sim = Simulation(1, gpu_id="h100-80gb", host="h")
    assert sim.fake.gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert sim.fake.gpus[0].power_limit_mw == 700_000
    with pytest.raises(ValueError, match="did you mean 'rtx-4090d'"):
        Simulation(1, gpu_id="rtx-4090-d", host="h")


# ---- command line ------------------------------------------------------------------------------


def test_metrics_url() -> None:
    assert metrics_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://127.0.0.1:8000/metrics") == "http://127.0.0.1:8000/metrics"
    for bad in ("127.0.0.1:8000", "ftp://h/x", "http://h:99999"):
        with pytest.raises(ValueError, match="engine URL"):
            metrics_url(bad)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9835") == ("127.0.0.1", 9835)
    assert parse_listen("[::1]:9835") == ("::1", 9835)
    for bad in ("9835", ":9835", "host:", "host:http", "h:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


def args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["exporter", *flags])


def test_engine_flags_pair_up() -> None:
    sources = engine_sources(args("--simulate", "4", "--engine-url", "http://127.0.0.1:8000", "--engine-gpus", "0,1",
                                  "--engine-url", "http://127.0.0.1:8001", "--engine-gpus", "2,3"))
    assert sources == [EngineSource("http://127.0.0.1:8000/metrics", (0, 1)),
                       EngineSource("http://127.0.0.1:8001/metrics", (2, 3))]
    single = engine_sources(args("--simulate", "2", "--engine-url", "http://127.0.0.1:8000"))
    assert single == [EngineSource("http://127.0.0.1:8000/metrics", (0, 1))]


@pytest.mark.parametrize(("flags", "message"), [
    (["--engine-url", "http://127.0.0.1:8000"], "only go with --simulate"),
    (["--simulate-gpu", "h200"], "only go with --simulate"),
    (["--simulate", "2", "--engine-url", "http://a:1", "--engine-url", "http://b:1"], "one --engine-gpus per engine"),
    (["--simulate", "2", "--engine-url", "http://a:1", "--engine-gpus", "0", "--engine-gpus", "1"],
     "1 --engine-url but 2 --engine-gpus"),
    (["--simulate", "2", "--engine-url", "http://a:1", "--engine-gpus", "0,x"], "indices separated by commas"),
    (["--simulate", "2", "--engine-url", "http://a:1", "--engine-gpus", "0,0"], "listed twice"),
])
def test_engine_flags_that_do_not_fit_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine_sources(args(*flags))


@pytest.mark.parametrize("flags", [["--interval", "0"], ["--interval", "nan"], ["--simulate", "0"],
                                   ["--listen", "nowhere"], ["--simulate", "2", "--simulate-gpu", "gtx-1080"]])
def test_bad_flags_exit_2_with_an_error_line(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from gpufleet.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["exporter", *flags])
    assert exit_info.value.code == 2
    assert "gpufleet exporter: error:" in capsys.readouterr().err
