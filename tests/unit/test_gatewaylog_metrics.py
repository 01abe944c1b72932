"""The gateway exporter's metrics after a known sequence of access-log lines, read back from a scrape."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from gpufleet.gatewaylog import metrics as m
from gpufleet.gatewaylog.follower import LogFollower
from gpufleet.gatewaylog.service import GatewayLogExporter
from gpufleet.gatewaylog.stats import Histogram
from gpufleet.monitoring.rules import GATEWAY_REQUESTS
from tests.unit.exporter_scrape import Scrape
from tests.unit.test_gatewaylog_parser import (
    LINE_200,
    LINE_401,
    LINE_429,
    LINE_BAD_REQUEST,
    LINE_NO_LIVE_UPSTREAM,
    LINE_RAW_BYTE,
    LINE_RETRIED,
)

pytestmark = pytest.mark.unit

MODEL = "qwen2.5-7b-instruct"
NOW = 1_800_000_000.0


def append(path: Path, *lines: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"".join(line + b"\n" for line in lines))
    finally:
        os.close(fd)


def with_time(line: bytes, seconds: str) -> bytes:
    """The line with another request_time (as nginx writes it: three decimals)."""
    start = line.index(b'"request_time":') + len(b'"request_time":')
    end = line.index(b",", start)
    return line[:start] + seconds.encode() + line[end:]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "access.log"
    append(path, LINE_200, LINE_200)  # before the exporter starts: never counted
    return path


@pytest.fixture
def exporter(log: Path) -> GatewayLogExporter:
    exporter = GatewayLogExporter(log, MODEL, follower=LogFollower(log), wall_clock=lambda: NOW)
    exporter.poll_once()  # the start: the file's end
    return exporter


def scrape(exporter: GatewayLogExporter) -> Scrape:
    return Scrape(generate_latest(exporter.registry).decode())


def test_the_rules_read_the_name_the_exporter_writes() -> None:
    assert m.REQUESTS == GATEWAY_REQUESTS == "gpufleet_gateway_requests_total"


def test_nothing_before_the_start_is_counted(exporter: GatewayLogExporter) -> None:
    s = scrape(exporter)
    assert s.find(m.REQUESTS) == []
    assert s.value(m.LOG_LINES) == 0 and s.value(m.LOG_MALFORMED_LINES) == 0
    assert s.value(m.LOG_UP) == 1
    assert not s.has(m.LOG_LAST_LINE)  # no line read yet: absent, not 0
    assert s.value(m.REQUEST_DURATION + "_count", model_name=MODEL) == 0
    assert s.value(m.UPSTREAM_RETRIES, model_name=MODEL) == 0


def test_counters_and_histograms_after_a_sequence_of_lines(log: Path, exporter: GatewayLogExporter) -> None:
    append(
        log,
        with_time(LINE_200, "0.031"),
        with_time(LINE_200, "0.250"),  # on a bucket's bound: inside it (le)
        with_time(LINE_200, "95.000"),  # a long stream
        LINE_RETRIED,  # 200 after a retry, header time 0.030
        LINE_401,
        LINE_429,
        LINE_429,
        LINE_NO_LIVE_UPSTREAM,  # 502, one engine tried
        LINE_RAW_BYTE,  # 404 of team-a
        LINE_BAD_REQUEST,  # 400 without a client
        b"not json at all",
        b'{"status":200}',
    )
    assert exporter.poll_once() == 12
    s = scrape(exporter)

    requests = {(lbl["status"], lbl["client"]): v for lbl, v in s.find(m.REQUESTS, model_name=MODEL)}
    assert requests == {
        ("200", "team-a"): 4,
        ("401", "-"): 1,
        ("429", "team-a"): 2,
        ("502", "team-a"): 1,
        ("404", "team-a"): 1,
        ("400", "-"): 1,
    }
    assert s.value(m.LOG_LINES) == 12
    assert s.value(m.LOG_MALFORMED_LINES) == 2
    assert s.value(m.UPSTREAM_RETRIES, model_name=MODEL) == 1  # the group name after a failure is no retry

    duration = {lbl["le"]: v for lbl, v in s.find(m.REQUEST_DURATION + "_bucket", model_name=MODEL)}
    # 0.031, 0.250, 95, 0.030, 0.006, 0, 0, 0.001, 0, 0
    assert duration["0.05"] == 8
    assert duration["0.1"] == 8
    assert duration["0.25"] == 9
    assert duration["60.0"] == 9
    assert duration["120.0"] == duration["+Inf"] == 10
    assert s.value(m.REQUEST_DURATION + "_count", model_name=MODEL) == 10
    assert s.value(m.REQUEST_DURATION + "_sum", model_name=MODEL) == pytest.approx(95.318)

    # header times: 0.029 (x3, the LINE_200s) and 0.030 (the retried one's last); none for the others
    assert s.value(m.UPSTREAM_HEADER + "_count", model_name=MODEL) == 4
    assert s.value(m.UPSTREAM_HEADER + "_sum", model_name=MODEL) == pytest.approx(3 * 0.029 + 0.030)
    header = {lbl["le"]: v for lbl, v in s.find(m.UPSTREAM_HEADER + "_bucket", model_name=MODEL)}
    assert header["0.025"] == 0 and header["0.05"] == 4

    assert s.value(m.LOG_LAST_LINE) == NOW
    assert s.value(m.LOG_UP) == 1


def test_scrape_has_every_family_with_its_type_and_no_created_series(log: Path, exporter: GatewayLogExporter) -> None:
    append(log, LINE_200, LINE_RETRIED)
    exporter.poll_once()
    s = scrape(exporter)
    assert {d.name: s.types[d.family] for d in m.ALL_METRICS} == {d.name: d.kind for d in m.ALL_METRICS}
    assert not any(name.endswith("_created") for name in s.names())
    for lbl, _ in s.find(m.REQUESTS):
        assert set(lbl) == {"model_name", "status", "client"}
    for name in (m.REQUEST_DURATION + "_count", m.UPSTREAM_HEADER + "_count", m.UPSTREAM_RETRIES):
        assert [lbl for lbl, _ in s.find(name)] == [{"model_name": MODEL}]
    assert {lbl["kind"] for lbl, _ in s.find(m.LOG_ROTATIONS)} == {"rename", "truncate"}
    sample = 'gpufleet_gateway_requests_total{client="team-a",model_name="qwen2.5-7b-instruct",status="200"} 2.0'
    assert sample in s.text


def test_rotations_and_a_missing_log_show_in_the_self_metrics(log: Path, exporter: GatewayLogExporter) -> None:
    log.rename(log.with_name("access.log.1"))
    exporter.poll_once()
    assert scrape(exporter).value(m.LOG_UP) == 0
    append(log, LINE_401)
    exporter.poll_once()
    s = scrape(exporter)
    assert s.value(m.LOG_UP) == 1
    assert s.value(m.LOG_ROTATIONS, kind="rename") == 1
    assert s.value(m.REQUESTS, status="401", client="-") == 1  # the new file, from its start

    os.truncate(log, 0)
    append(log, LINE_429)
    exporter.poll_once()
    s = scrape(exporter)
    assert s.value(m.LOG_ROTATIONS, kind="truncate") == 1
    assert s.value(m.REQUESTS, status="429", client="team-a") == 1


def test_a_missing_log_at_the_start_is_down_then_counted_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "later.log"
    exporter = GatewayLogExporter(path, MODEL, wall_clock=lambda: NOW)
    exporter.poll_once()
    assert scrape(exporter).value(m.LOG_UP) == 0
    append(path, LINE_200, LINE_429)
    exporter.poll_once()
    s = scrape(exporter)
    assert s.value(m.LOG_UP) == 1
    assert s.value(m.REQUESTS, status="200") == 1 and s.value(m.REQUESTS, status="429") == 1


def test_dropped_lines_count_as_malformed(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    append(path)
    exporter = GatewayLogExporter(path, MODEL, follower=LogFollower(path, max_line_bytes=100))
    exporter.poll_once()
    append(path, b"z" * 300, LINE_200)
    exporter.poll_once()
    s = scrape(exporter)
    assert s.value(m.LOG_MALFORMED_LINES) == 1 and s.value(m.LOG_LINES) == 2
    assert s.value(m.REQUESTS, status="200") == 1


def test_the_follower_thread_counts_what_is_appended_after_start(log: Path) -> None:
    exporter = GatewayLogExporter(log, MODEL, poll_interval=0.02)
    exporter.start()
    try:
        append(log, LINE_200, LINE_401)
        deadline = time.monotonic() + 5
        while scrape(exporter).value(m.LOG_LINES) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        s = scrape(exporter)
        assert s.value(m.REQUESTS, status="200") == 1  # the two lines before start() are not counted
        assert s.value(m.REQUESTS, status="401") == 1
        assert time.time() - s.value(m.LOG_LAST_LINE) < 60
    finally:
        exporter.stop()
    assert exporter._thread is None


def test_histogram_buckets_are_cumulative_with_le_inclusive() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]
    assert h.count == 5 and h.total == pytest.approx(8.65)
    copy = h.copy()
    h.observe(0.0)
    assert copy.count == 5


def test_metric_definitions() -> None:
    names = [d.name for d in m.ALL_METRICS]
    assert len(set(names)) == len(names)
    for d in m.ALL_METRICS:
        assert d.name.startswith("gpufleet_gateway_")
        assert d.name.endswith("_total") == (d.kind == "counter"), d.name
    assert list(m.REQUEST_BUCKETS) == sorted(m.REQUEST_BUCKETS)
    assert m.REQUEST_BUCKETS[0] == 0.05 and m.REQUEST_BUCKETS[-1] == 120
    assert list(m.UPSTREAM_HEADER_BUCKETS) == sorted(m.UPSTREAM_HEADER_BUCKETS)
