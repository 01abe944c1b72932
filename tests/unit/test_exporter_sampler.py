"""The sampler's lifecycle: library errors and re-initialisation with backoff, hung NVML calls, its thread."""

from __future__ import annotations

import threading
import time

import pynvml
import pytest

from gpufleet.exporter.fake import FakeNvml
from gpufleet.exporter.nvml import REQUIRED_FUNCTIONS, Nvml, classify
from gpufleet.exporter.sampler import Sampler
from tests.unit.exporter_scrape import Rig


def attempt_times(rig: Rig, until: float) -> list[float]:
    """Drive the sampler as its thread would (sleep what run_once returns); when nvmlInit was tried."""
    tried: list[float] = []
    start = rig.clock.now
    while rig.clock.now - start < until:
        before = rig.fake.calls["nvmlInit"]
        delay = rig.sample()
        if rig.fake.calls["nvmlInit"] > before:
            tried.append(rig.clock.now - start)
        assert delay > 0
        rig.clock.now += delay
    return tried


@pytest.mark.parametrize("error", [pynvml.NVMLError_DriverNotLoaded, pynvml.NVMLError_Uninitialized,
                                   pynvml.NVMLError_LibRmVersionMismatch, pynvml.NVMLError_LibraryNotFound])
def test_library_error_reinitialises_with_exponential_backoff_then_recovers(error: type) -> None:
    rig = Rig(2, interval=5.0)
    rig.sample()
    assert rig.scrape().value("gpufleet_exporter_nvml_up") == 1

    rig.fake.library_error = error
    rig.clock.now += 5
    rig.sample()  # the sample fails: NVML is shut down
    scrape = rig.scrape()
    assert scrape.value("gpufleet_exporter_nvml_up") == 0
    assert [v for _, v in scrape.find("gpufleet_gpu_up")] == [0, 0]  # the GPUs last seen, down
    assert not scrape.has("gpufleet_gpu_utilization_ratio")
    assert not scrape.has("gpufleet_gpu_driver_info")
    assert rig.fake.init_count == 0  # shut down, not leaked

    # retries 1, 2, 4, 8, 16, 32 s apart, then every 60 s (the cap)
    tried = attempt_times(rig, until=250)
    assert tried == [1, 3, 7, 15, 31, 63, 123, 183, 243]

    rig.fake.library_error = None
    tried = attempt_times(rig, until=61)
    assert len(tried) == 1
    scrape = rig.scrape()
    assert scrape.value("gpufleet_exporter_nvml_up") == 1
    assert [v for _, v in scrape.find("gpufleet_gpu_up")] == [1, 1]
    assert scrape.has("gpufleet_gpu_utilization_ratio", gpu="0")
    assert scrape.value("gpufleet_exporter_errors_total", kind="library", error=error().__class__.__name__[10:]) > 1
    assert rig.fake.init_count == 1

    # after a recovery the backoff starts again at 1 s
    rig.fake.library_error = error
    rig.clock.now += 5
    assert rig.sample() == 1.0


def test_library_error_raised_by_one_gpu_call_takes_nvml_down() -> None:
    rig = Rig(2)
    rig.fake.gpus[1].fail("nvmlDeviceGetPowerUsage", pynvml.NVMLError_Uninitialized)
    rig.sample()
    assert rig.scrape().value("gpufleet_exporter_nvml_up") == 0
    assert rig.fake.init_count == 0


@pytest.mark.parametrize("function", ["nvmlDeviceGetCount", "nvmlSystemGetDriverVersion"])
def test_unknown_error_from_a_library_level_call_is_a_library_error(function: str) -> None:
    rig = Rig(2)
    rig.fake.fail(function, pynvml.NVMLError_Unknown)
    assert rig.sample() == 1.0
    scrape = rig.scrape()
    assert scrape.value("gpufleet_exporter_nvml_up") == 0
    assert scrape.value("gpufleet_exporter_errors_total", kind="library", error="Unknown") == 1
    del rig.fake.errors[function]
    rig.clock.now += 1
    rig.sample()
    assert rig.scrape().value("gpufleet_exporter_nvml_up") == 1


def test_no_driver_at_start_is_reported_not_fatal() -> None:
    rig = Rig(2)
    rig.fake.library_error = pynvml.NVMLError_LibraryNotFound
    rig.sample()
    scrape = rig.scrape()
    assert scrape.value("gpufleet_exporter_nvml_up") == 0
    assert not scrape.has("gpufleet_gpu_up")  # no GPU was ever seen


def test_a_missing_cuda_version_is_not_a_library_error() -> None:
    rig = Rig(FakeNvml(1, cuda_driver_version=None))
    rig.sample()
    scrape = rig.scrape()
    assert scrape.value("gpufleet_exporter_nvml_up") == 1
    assert scrape.value("gpufleet_gpu_driver_info", driver_version="550.54.15") == 1


def test_error_classes() -> None:
    assert classify(pynvml.NVMLError_NotSupported()) == "field"
    assert classify(pynvml.NVMLError_NoPermission()) == "field"
    assert classify(pynvml.NVMLError_GpuIsLost()) == "device"
    assert classify(pynvml.NVMLError_Unknown()) == "device"  # from a per-GPU call
    assert classify(pynvml.NVMLError_DriverNotLoaded()) == "library"
    assert classify(pynvml.NVMLError_LibRmVersionMismatch()) == "library"


# ---- hung NVML calls ---------------------------------------------------------------------------


def test_a_hung_nvml_call_never_hangs_the_scrape_and_goes_stale() -> None:
    rig = Rig(2, interval=5.0)
    rig.sample()
    rig.fake.hold("nvmlDeviceGetUtilizationRates")
    stuck = threading.Thread(target=rig.sample, daemon=True)
    stuck.start()
    try:
        time.sleep(0.05)
        assert stuck.is_alive()  # the sampler waits on the "driver"
        started = time.perf_counter()
        scrape = rig.scrape()
        assert time.perf_counter() - started < 0.5
        assert scrape.value("gpufleet_exporter_nvml_up") == 1  # the last sample is still fresh
        assert scrape.value("gpufleet_gpu_up", gpu="0") == 1

        rig.clock.now += 16  # more than 3 intervals without a new sample
        scrape = rig.scrape()
        assert scrape.value("gpufleet_exporter_sample_age_seconds") == pytest.approx(16)
        assert scrape.value("gpufleet_exporter_nvml_up") == 0
        assert [v for _, v in scrape.find("gpufleet_gpu_up")] == [0, 0]
        assert not scrape.has("gpufleet_gpu_utilization_ratio")  # no frozen values
    finally:
        rig.fake.release("nvmlDeviceGetUtilizationRates")
        stuck.join(5)
    assert rig.scrape().value("gpufleet_exporter_nvml_up") == 1  # the late sample is fresh again


# ---- the thread --------------------------------------------------------------------------------


def run_thread(sampler: Sampler, samples: int) -> None:
    """Start the sampler's thread, let it take `samples` samples (5 s at most), stop it."""
    sampler.start()
    deadline = time.monotonic() + 5
    while sampler.samples_total < samples and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert sampler.samples_total >= samples


def test_thread_samples_every_interval_and_stops() -> None:
    fake = FakeNvml(1)
    sampler = Sampler(Nvml(fake), interval=0.02)
    run_thread(sampler, 5)
    assert fake.init_count == 0  # shut NVML down on stop
    count = sampler.samples_total
    time.sleep(0.1)
    assert sampler.samples_total == count


def test_an_unexpected_exception_is_counted_and_sampling_goes_on() -> None:
    fake = FakeNvml(1)
    calls = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    sampler = Sampler(Nvml(fake), interval=0.02, before_sample=flaky)
    run_thread(sampler, 2)
    assert sampler.errors.items()[0] == (("internal", "exception"), 1)


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        Sampler(Nvml(FakeNvml(1)), interval=0)


# ---- the binding -------------------------------------------------------------------------------


def test_every_function_used_exists_in_pynvml_and_in_the_fake() -> None:
    """The required ones in pynvml (12.535 up); the optional ones may be missing there (they fall back)."""
    from gpufleet.exporter.nvml import OPTIONAL_FUNCTIONS

    for name in REQUIRED_FUNCTIONS:
        assert callable(getattr(pynvml, name, None)), f"pynvml has no {name}"
    for name in REQUIRED_FUNCTIONS + OPTIONAL_FUNCTIONS:
        assert callable(getattr(FakeNvml, name, None)), f"the fake has no {name}"


def test_error_classes_the_fake_raises_are_pynvml_s() -> None:
    fake = FakeNvml(1)
    fake.gpus[0].lost = True
    fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetHandleByIndex(0)
    fake.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
