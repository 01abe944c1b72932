"""The exporter's output for healthy, partly unsupported and lost GPUs, against the fake NVML."""

from __future__ import annotations

import pynvml
import pytest

from gpufleet.exporter import metrics as m
from gpufleet.exporter.fake import MIB, FakeNvml, FakeProcess, make_gpus
from tests.unit.exporter_scrape import Rig

GIB = 1024 * MIB


def busy_gpu_fake() -> FakeNvml:
    """Two GPUs; GPU 0 busy with distinctive values in every field, two processes."""
    gpus = make_gpus(2)
    g = gpus[0]
    g.utilization, g.memory_utilization = 87, 41
    g.memory_used, g.memory_reserved = 20 * GIB, 329 * MIB
    g.temperature, g.fan_speed = 71, 55
    g.power_mw, g.power_limit_mw, g.energy_mj = 312_500, 425_000, 9_876_543
    g.sm_clock, g.memory_clock, g.sm_clock_max, g.memory_clock_max = 2520, 10501, 3105, 10501
    g.pstate = 2
    g.clock_events = pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonHwThermalSlowdown
    g.pcie_generation, g.pcie_max_generation, g.pcie_width, g.pcie_max_width, g.pcie_replays = 3, 4, 8, 16, 12
    g.ecc = {
        (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC): 3,
        (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_AGGREGATE_ECC): 30,
        (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC): 1,
        (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC): 2,
    }
    g.remapped_rows = (5, 1, 1, 0)
    g.processes = [FakeProcess(4242, 12 * GIB, "vllm"), FakeProcess(4343, 7 * GIB, "python3")]
    return FakeNvml(gpus)


@pytest.fixture
def rig() -> Rig:
    rig = Rig(busy_gpu_fake())
    rig.sample()
    return rig


def gpu0(rig: Rig) -> dict[str, str]:
    gpu = rig.fake.gpus[0]
    return {"gpu": "0", "uuid": gpu.uuid, "name": "NVIDIA GeForce RTX 4090 D"}


def test_healthy_gpu_has_every_metric_with_values_in_base_units(rig: Rig) -> None:
    scrape = rig.scrape()
    labels = gpu0(rig)
    expected = {
        "gpufleet_gpu_up": 1,
        "gpufleet_gpu_utilization_ratio": 0.87,
        "gpufleet_gpu_memory_utilization_ratio": 0.41,
        "gpufleet_gpu_memory_used_bytes": 20 * GIB,
        "gpufleet_gpu_memory_reserved_bytes": 329 * MIB,
        "gpufleet_gpu_memory_total_bytes": 24564 * MIB,
        "gpufleet_gpu_memory_free_bytes": 24564 * MIB - 20 * GIB - 329 * MIB,
        "gpufleet_gpu_temperature_celsius": 71,
        "gpufleet_gpu_fan_speed_ratio": 0.55,
        "gpufleet_gpu_power_usage_watts": 312.5,
        "gpufleet_gpu_power_limit_watts": 425,
        "gpufleet_gpu_energy_consumed_joules_total": 9876.543,
        "gpufleet_gpu_sm_clock_hertz": 2.52e9,
        "gpufleet_gpu_memory_clock_hertz": 10.501e9,
        "gpufleet_gpu_sm_clock_max_hertz": 3.105e9,
        "gpufleet_gpu_memory_clock_max_hertz": 10.501e9,
        "gpufleet_gpu_performance_state": 2,
        "gpufleet_gpu_pcie_replays_total": 12,
        "gpufleet_gpu_remapped_rows_pending": 1,
        "gpufleet_gpu_remapped_rows_failure": 0,
        "gpufleet_gpu_processes": 2,
    }
    for name, value in expected.items():
        assert scrape.value(name, **labels) == pytest.approx(value), name
    assert scrape.value("gpufleet_gpu_info", **labels, pci_bus_id="00000000:01:00.0") == 1
    assert scrape.value("gpufleet_gpu_pcie_link_generation", **labels, link="current") == 3
    assert scrape.value("gpufleet_gpu_pcie_link_generation", **labels, link="max") == 4
    assert scrape.value("gpufleet_gpu_pcie_link_width", **labels, link="current") == 8
    assert scrape.value("gpufleet_gpu_pcie_link_width", **labels, link="max") == 16
    ecc = {(lbl["error_type"], lbl["scope"]): v for lbl, v in scrape.find("gpufleet_gpu_ecc_errors_total", **labels)}
    assert ecc == {("corrected", "volatile"): 3, ("corrected", "aggregate"): 30,
                   ("uncorrected", "volatile"): 1, ("uncorrected", "aggregate"): 2}
    assert scrape.value("gpufleet_gpu_remapped_rows_total", **labels, error_type="corrected") == 5
    assert scrape.value("gpufleet_gpu_remapped_rows_total", **labels, error_type="uncorrected") == 1
    assert scrape.value("gpufleet_gpu_driver_info", driver_version="550.54.15", cuda_driver_version="12.4",
                        nvml_version="12.550.54.15") == 1
    assert scrape.value("gpufleet_exporter_nvml_up") == 1
    assert scrape.value("gpufleet_exporter_info", mode="nvml") == 1


def test_every_documented_series_appears_and_types_match(rig: Rig) -> None:
    rig.watcher.run_once()  # registers the GPUs (and times out waiting)
    rig.fake.emit_xid(0, 79)
    rig.watcher.run_once()
    scrape = rig.scrape()
    for metric in m.ALL_METRICS:
        if metric is m.ERRORS:
            continue  # no error has happened
        assert scrape.has(metric.name), metric.name
        assert scrape.types[metric.family] == metric.kind, metric.name


def test_both_gpus_report_with_their_own_labels(rig: Rig) -> None:
    scrape = rig.scrape()
    ups = {lbl["gpu"]: (lbl["uuid"], v) for lbl, v in scrape.find("gpufleet_gpu_up")}
    assert ups == {"0": (rig.fake.gpus[0].uuid, 1), "1": (rig.fake.gpus[1].uuid, 1)}
    assert scrape.value("gpufleet_gpu_utilization_ratio", gpu="1") == 0


def test_per_process_memory_by_pid_and_name(rig: Rig) -> None:
    scrape = rig.scrape()
    procs = {(lbl["pid"], lbl["process"]): v for lbl, v in scrape.find("gpufleet_gpu_process_memory_used_bytes")}
    assert procs == {("4242", "vllm"): 12 * GIB, ("4343", "python3"): 7 * GIB}
    assert scrape.value("gpufleet_gpu_processes", gpu="1") == 0


def test_a_process_that_exits_leaves_no_series(rig: Rig) -> None:
    rig.fake.gpus[0].processes.pop()
    rig.sample()
    scrape = rig.scrape()
    assert [lbl["pid"] for lbl, _ in scrape.find("gpufleet_gpu_process_memory_used_bytes")] == ["4242"]


def test_process_without_memory_figure_is_counted_but_has_no_memory_series(rig: Rig) -> None:
    rig.fake.gpus[1].processes = [FakeProcess(77, None, "wddm")]
    rig.sample()
    scrape = rig.scrape()
    assert scrape.value("gpufleet_gpu_processes", gpu="1") == 1
    assert not scrape.has("gpufleet_gpu_process_memory_used_bytes", gpu="1")


def test_clock_event_reasons_are_labelled_zero_one_series(rig: Rig) -> None:
    scrape = rig.scrape()
    reasons = {lbl["reason"]: v for lbl, v in scrape.find("gpufleet_gpu_clock_event_active", **gpu0(rig))}
    active = {r for r, v in reasons.items() if v == 1}
    assert active == {"sw_power_cap", "hw_thermal_slowdown"}
    assert {"gpu_idle", "hw_slowdown", "sync_boost", "sw_thermal_slowdown", "hw_power_brake_slowdown",
            "applications_clocks_setting", "display_clock_setting"} <= set(reasons)


def test_clock_event_reasons_only_for_supported_bits() -> None:
    fake = FakeNvml(1)
    fake.gpus[0].supported_clock_events = pynvml.nvmlClocksEventReasonGpuIdle | pynvml.nvmlClocksEventReasonSwPowerCap
    rig = Rig(fake)
    rig.sample()
    reasons = {lbl["reason"]: v for lbl, v in rig.scrape().find("gpufleet_gpu_clock_event_active")}
    assert reasons == {"gpu_idle": 1, "sw_power_cap": 0}


def test_clock_event_reasons_fall_back_to_the_throttle_reasons_call() -> None:
    """A driver before R535 has no nvmlDeviceGetCurrentClocksEventReasons: the deprecated call answers."""
    fake = FakeNvml(1)
    fake.gpus[0].fail("nvmlDeviceGetCurrentClocksEventReasons", pynvml.NVMLError_FunctionNotFound)
    fake.gpus[0].fail("nvmlDeviceGetSupportedClocksEventReasons", pynvml.NVMLError_FunctionNotFound)
    fake.gpus[0].clock_events = pynvml.nvmlClocksThrottleReasonHwSlowdown
    rig = Rig(fake)
    rig.sample()
    assert rig.scrape().value("gpufleet_gpu_clock_event_active", reason="hw_slowdown") == 1
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 1


# ---- unsupported fields ------------------------------------------------------------------------

UNSUPPORTED = [
    ("nvmlDeviceGetFanSpeed", ["gpufleet_gpu_fan_speed_ratio"]),
    ("nvmlDeviceGetUtilizationRates", ["gpufleet_gpu_utilization_ratio", "gpufleet_gpu_memory_utilization_ratio"]),
    ("nvmlDeviceGetTotalEnergyConsumption", ["gpufleet_gpu_energy_consumed_joules_total"]),
    ("nvmlDeviceGetPowerUsage", ["gpufleet_gpu_power_usage_watts"]),
    ("nvmlDeviceGetTotalEccErrors", ["gpufleet_gpu_ecc_errors_total"]),
    ("nvmlDeviceGetRemappedRows", ["gpufleet_gpu_remapped_rows_total", "gpufleet_gpu_remapped_rows_pending",
                                   "gpufleet_gpu_remapped_rows_failure"]),
    ("nvmlDeviceGetPcieReplayCounter", ["gpufleet_gpu_pcie_replays_total"]),
    ("nvmlDeviceGetComputeRunningProcesses", ["gpufleet_gpu_processes", "gpufleet_gpu_process_memory_used_bytes"]),
    ("nvmlDeviceGetCurrentClocksThrottleReasons", ["gpufleet_gpu_clock_event_active"]),
]


@pytest.mark.parametrize(("function", "omitted"), UNSUPPORTED, ids=[f for f, _ in UNSUPPORTED])
def test_unsupported_field_is_omitted_never_a_sentinel(function: str, omitted: list[str]) -> None:
    fake = busy_gpu_fake()
    fake.gpus[0].not_supported(function, function.replace("Throttle", "Event"))
    rig = Rig(fake)
    rig.sample()
    scrape = rig.scrape()
    for name in omitted:
        assert not scrape.has(name, gpu="0"), name
        assert scrape.has(name, gpu="1") or name == "gpufleet_gpu_process_memory_used_bytes", name
    assert scrape.value("gpufleet_gpu_up", gpu="0") == 1
    assert scrape.value("gpufleet_gpu_temperature_celsius", gpu="0") == 71
    assert not any(v < 0 for v in scrape.samples.values())


@pytest.mark.parametrize("error", [pynvml.NVMLError_NoPermission, pynvml.NVMLError_FunctionNotFound,
                                   pynvml.NVMLError_NotFound])
def test_other_field_level_errors_also_omit_the_field(error: type) -> None:
    fake = busy_gpu_fake()
    fake.gpus[0].fail("nvmlDeviceGetPowerUsage", error)
    rig = Rig(fake)
    rig.sample()
    scrape = rig.scrape()
    assert not scrape.has("gpufleet_gpu_power_usage_watts", gpu="0")
    assert scrape.value("gpufleet_gpu_up", gpu="0") == 1
    assert rig.errors.items() == []


def test_memory_without_the_v2_call_has_no_reserved_series() -> None:
    """Before driver 510 only nvmlDeviceGetMemoryInfo (v1) exists: no `reserved`, used includes it."""
    fake = busy_gpu_fake()
    fake.gpus[0].fail("nvmlDeviceGetMemoryInfo_v2", pynvml.NVMLError_FunctionNotFound)
    rig = Rig(fake)
    rig.sample()
    scrape = rig.scrape()
    assert not scrape.has("gpufleet_gpu_memory_reserved_bytes", gpu="0")
    assert scrape.value("gpufleet_gpu_memory_used_bytes", gpu="0") == 20 * GIB + 329 * MIB


def test_temperature_falls_back_to_the_deprecated_call() -> None:
    fake = busy_gpu_fake()
    fake.gpus[0].fail("nvmlDeviceGetTemperatureV", pynvml.NVMLError_FunctionNotFound)
    rig = Rig(fake)
    rig.sample()
    assert rig.scrape().value("gpufleet_gpu_temperature_celsius", gpu="0") == 71


def test_a_function_missing_from_the_binding_is_a_missing_field() -> None:
    """An older nvidia-ml-py without nvmlSystemGetCudaDriverVersion: the label is empty, nothing breaks."""

    class OldBinding(FakeNvml):
        nvmlSystemGetCudaDriverVersion = None  # type: ignore[assignment]

    rig = Rig(OldBinding(1))
    rig.sample()
    scrape = rig.scrape()
    info = scrape.find("gpufleet_gpu_driver_info")
    assert len(info) == 1 and "cuda_driver_version" not in info[0][0]
    assert scrape.value("gpufleet_gpu_up", gpu="0") == 1


@pytest.mark.skipif(not hasattr(pynvml, "NVMLLibraryMismatchError"), reason="this nvidia-ml-py has no such error")
def test_an_unversioned_call_the_driver_lacks_is_a_missing_field() -> None:
    fake = busy_gpu_fake()

    def mismatch(handle: object) -> None:
        raise pynvml.NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not match")

    fake.nvmlDeviceGetComputeRunningProcesses = mismatch  # type: ignore[method-assign]
    rig = Rig(fake)
    rig.sample()
    scrape = rig.scrape()
    assert not scrape.has("gpufleet_gpu_processes")
    assert scrape.value("gpufleet_gpu_up", gpu="0") == 1


# ---- lost GPUs ---------------------------------------------------------------------------------


def test_lost_gpu_is_down_and_the_others_still_report(rig: Rig) -> None:
    rig.fake.gpus[0].lost = True
    rig.sample()
    scrape = rig.scrape()
    labels = gpu0(rig)
    assert scrape.value("gpufleet_gpu_up", **labels) == 0
    assert scrape.value("gpufleet_gpu_info", **labels) == 1  # identity kept: alerts name the GPU
    gpu0_series = {n for (n, lbl) in scrape.samples if ("gpu", "0") in lbl}
    assert gpu0_series == {"gpufleet_gpu_up", "gpufleet_gpu_info"}
    assert scrape.value("gpufleet_gpu_up", gpu="1") == 1
    assert scrape.has("gpufleet_gpu_memory_used_bytes", gpu="1")
    assert scrape.value("gpufleet_exporter_nvml_up") == 1
    assert scrape.value("gpufleet_exporter_errors_total", kind="device", error="GpuIsLost") == 1


DEVICE_ERRORS = [getattr(pynvml, f"NVMLError_{name}") for name in
                 ("GpuIsLost", "Unknown", "GpuNotFound", "ResetRequired", "Timeout")
                 if hasattr(pynvml, f"NVMLError_{name}")]  # nvidia-ml-py 12.535 has no GpuNotFound


@pytest.mark.parametrize("error", DEVICE_ERRORS)
def test_device_error_midway_drops_the_whole_gpu_not_part_of_it(rig: Rig, error: type) -> None:
    rig.fake.gpus[1].fail("nvmlDeviceGetPcieReplayCounter", error)
    rig.sample()
    scrape = rig.scrape()
    assert scrape.value("gpufleet_gpu_up", gpu="1") == 0
    assert not scrape.has("gpufleet_gpu_utilization_ratio", gpu="1")
    assert scrape.value("gpufleet_gpu_up", gpu="0") == 1


def test_lost_gpu_comes_back_with_a_new_handle(rig: Rig) -> None:
    rig.fake.gpus[1].lost = True
    rig.sample()
    rig.fake.gpus[1].lost = False
    handles_before = rig.fake.calls["nvmlDeviceGetHandleByIndex"]
    rig.sample()
    scrape = rig.scrape()
    assert scrape.value("gpufleet_gpu_up", gpu="1") == 1
    assert scrape.has("gpufleet_gpu_utilization_ratio", gpu="1")
    assert rig.fake.calls["nvmlDeviceGetHandleByIndex"] == handles_before + 1


def test_gpu_lost_before_it_was_ever_identified_reports_by_index_only() -> None:
    fake = FakeNvml(2)
    fake.gpus[1].lost = True
    rig = Rig(fake)
    rig.sample()
    scrape = rig.scrape()
    assert scrape.find("gpufleet_gpu_up", gpu="1") == [({"gpu": "1"}, 0)]


# ---- the scrape itself -------------------------------------------------------------------------


def test_nothing_about_gpus_before_the_first_sample() -> None:
    rig = Rig(2)
    scrape = rig.scrape()
    assert not scrape.has("gpufleet_exporter_nvml_up")  # unknown is not 0
    assert not scrape.has("gpufleet_gpu_up")
    assert scrape.value("gpufleet_exporter_info", mode="nvml") == 1
    assert rig.fake.calls == {}  # and the scrape did not call NVML


def test_scrape_never_calls_nvml(rig: Rig) -> None:
    before = dict(rig.fake.calls)
    for _ in range(3):
        rig.scrape()
    assert dict(rig.fake.calls) == before


def test_self_metrics_count_and_time(rig: Rig) -> None:
    rig.clock.now += 2.5
    first = rig.scrape()
    second = rig.scrape()
    assert first.value("gpufleet_exporter_sample_age_seconds") == pytest.approx(2.5)
    assert first.value("gpufleet_exporter_last_sample_timestamp_seconds") == rig.wall.now
    assert first.value("gpufleet_exporter_samples_total") == 1
    assert second.value("gpufleet_exporter_scrapes_total") == first.value("gpufleet_exporter_scrapes_total") + 1
    assert 0 < second.value("gpufleet_exporter_scrape_duration_seconds") < 1
    assert first.value("gpufleet_exporter_sample_duration_seconds") == 0  # the injected clock did not move


def test_label_values_are_escaped_in_the_text_format() -> None:
    fake = FakeNvml(1)
    fake.gpus[0].name = 'NVIDIA "Quoted" \\ GPU'
    rig = Rig(fake)
    rig.sample()
    assert rig.scrape().value("gpufleet_gpu_up", name='NVIDIA "Quoted" \\ GPU') == 1
