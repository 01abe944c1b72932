"""The XID watcher against the fake NVML's event sets."""

from __future__ import annotations

import time

import pynvml

from gpufleet.exporter.events import XidWatcher
from gpufleet.exporter.fake import FakeNvml
from gpufleet.exporter.nvml import Nvml
from tests.unit.exporter_scrape import Rig


def xids(rig: Rig) -> dict[tuple[str, str], tuple[float, float]]:
    scrape = rig.scrape()
    counts = {(lbl["gpu"], lbl["xid"]): v for lbl, v in scrape.find("gpufleet_gpu_xid_errors_total")}
    seen = {(lbl["gpu"], lbl["xid"]): v for lbl, v in scrape.find("gpufleet_gpu_xid_last_seen_timestamp_seconds")}
    return {key: (counts[key], seen[key]) for key in counts}


def test_xid_events_are_counted_by_gpu_and_code_with_last_seen_time() -> None:
    rig = Rig(2)
    assert rig.watcher.run_once() == 0  # registers both GPUs, times out
    assert rig.watcher.up
    t0 = rig.wall.now
    rig.fake.emit_xid(1, 79)
    rig.fake.emit_xid(1, 79)
    rig.fake.emit_xid(0, 13)
    for _ in range(3):
        rig.watcher.run_once()
    rig.wall.now += 60
    rig.fake.emit_xid(1, 79)
    for _ in range(2):
        rig.watcher.run_once()
    assert xids(rig) == {("1", "79"): (3, t0 + 60), ("0", "13"): (1, t0)}
    labels = rig.scrape().find("gpufleet_gpu_xid_errors_total", xid="79")[0][0]
    assert labels["uuid"] == rig.fake.gpus[1].uuid
    assert labels["name"] == "NVIDIA GeForce RTX 4090 D"


def test_xid_counts_survive_nvml_going_down() -> None:
    rig = Rig(1)
    rig.sample()
    rig.watcher.run_once()
    rig.fake.emit_xid(0, 48)
    rig.watcher.run_once()
    rig.fake.library_error = pynvml.NVMLError_DriverNotLoaded
    rig.clock.now += 5
    rig.sample()
    scrape = rig.scrape()
    assert scrape.value("gpufleet_exporter_nvml_up") == 0
    assert scrape.value("gpufleet_gpu_xid_errors_total", xid="48") == 1


def test_gpus_that_refuse_events_are_skipped_and_the_rest_watched() -> None:
    rig = Rig(2)
    rig.fake.gpus[0].not_supported("nvmlDeviceRegisterEvents")
    rig.watcher.run_once()
    assert rig.watcher.up
    rig.fake.emit_xid(0, 79)  # not registered: never delivered
    rig.fake.emit_xid(1, 31)
    rig.watcher.run_once()
    rig.watcher.run_once()
    assert set(xids(rig)) == {("1", "31")}


def test_no_gpu_delivers_events_watch_is_down_and_retried_slowly() -> None:
    rig = Rig(2)
    for gpu in rig.fake.gpus:
        gpu.fail("nvmlDeviceRegisterEvents", pynvml.NVMLError_NoPermission)
    assert rig.watcher.run_once() == rig.watcher.backoff_cap
    assert not rig.watcher.up
    assert rig.fake.init_count == 0
    assert rig.scrape().value("gpufleet_exporter_xid_watch_up") == 0


def test_wait_error_rebuilds_the_event_set_with_backoff() -> None:
    rig = Rig(1)
    rig.watcher.run_once()
    rig.fake.fail("nvmlEventSetWait", pynvml.NVMLError_Unknown)
    delays = [rig.watcher.run_once() for _ in range(7)]
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert not rig.watcher.up
    assert rig.fake.init_count == 0  # every failed set freed and its NVML reference released
    assert rig.scrape().value("gpufleet_exporter_errors_total", kind="event", error="Unknown") == 7
    del rig.fake.errors["nvmlEventSetWait"]
    assert rig.watcher.run_once() == 0
    assert rig.watcher.up
    rig.fake.emit_xid(0, 94)
    rig.watcher.run_once()
    assert set(xids(rig)) == {("0", "94")}


def test_library_down_at_open_backs_off() -> None:
    rig = Rig(1)
    rig.fake.library_error = pynvml.NVMLError_DriverNotLoaded
    assert [rig.watcher.run_once() for _ in range(3)] == [1, 2, 4]
    rig.fake.library_error = None
    assert rig.watcher.run_once() == 0 and rig.watcher.up


def test_event_from_an_unregistered_device_is_counted_without_gpu_labels() -> None:
    rig = Rig(1)
    rig.watcher._record("not-a-device", 119)
    assert rig.scrape().find("gpufleet_gpu_xid_errors_total") == [({"xid": "119"}, 1)]


def test_thread_receives_events_and_stops_within_the_wait() -> None:
    fake = FakeNvml(1)
    watcher = XidWatcher(Nvml(fake), wait_ms=50)
    watcher.start()
    deadline = time.monotonic() + 5
    while not watcher.up and time.monotonic() < deadline:
        time.sleep(0.01)
    fake.emit_xid(0, 62)
    while not watcher.counts() and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 1
    assert [(c.xid, c.count) for c in watcher.counts()] == [(62, 1)]
    assert fake.init_count == 0
