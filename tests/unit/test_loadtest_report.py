"""The report: files written, the seed's table, vLLM's JSON names, valid PNGs, Prometheus columns or their absence."""

from __future__ import annotations

import json
import math
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from gpufleet.loadtest.gate import Verdict, evaluate
from gpufleet.loadtest.prometheus import window_query
from gpufleet.loadtest.report import GIB, ReportFiles, RunMeta, write_report
from tests.unit.loadtest_synth import SEED_STEPS, example_source, seed_run, step_records

META = RunMeta(target="http://127.0.0.1:8080", model="Qwen/Qwen2.5-7B-Instruct", api="openai-chat",
               shape="closed loop, concurrency 1, 4, 8, 16, 32, 64", extra={"seed": 7})
SEED_HEADERS = ["Concurrency", "Mean TTFT (ms)", "p99 TTFT (ms)", "Output tokens/s", "Stable"]
GPU_HEADERS = ["VRAM per GPU (GiB)", "GPU utilization (%)"]
VRAM_GIB = {1: 18.2, 4: 19.1, 8: 20.3, 16: 21.7, 32: 23.1}  # the seed's per-GPU memory; 64 has no data
VLLM_FIELDS = {
    "date", "backend", "model_id", "max_concurrency", "request_rate", "duration", "completed", "failed",
    "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput", "output_throughput",
    "total_token_throughput", "max_concurrent_requests",
    *(f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el")
      for stat in ("mean", "median", "std", "p50", "p90", "p95", "p99")),
}


@pytest.fixture(scope="module")
def verdict() -> Verdict:
    return evaluate(seed_run(), example_source())


@pytest.fixture(scope="module")
def report(verdict: Verdict, tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    return write_report(tmp_path_factory.mktemp("report"), verdict, META)


def table(markdown: str, heading: str) -> list[list[str]]:
    """The first Markdown table after `heading`, as rows of cells (header first, separator dropped)."""
    lines = markdown.split(f"\n{heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([cell.strip() for cell in line[2:-2].split(" | ")])
    return rows


# --- files and the seed's table ------------------------------------------------------------------------------


def test_every_file_is_written_beside_the_others(report: ReportFiles):
    assert [p.name for p in (report.markdown, report.html, report.json)] == ["loadtest.md", "loadtest.html",
                                                                              "loadtest.json"]
    assert sorted(p.name for p in report.plots.values()) == [
        "loadtest-latency-vs-throughput.png", "loadtest-throughput.png", "loadtest-ttft-itl.png"]
    for path in (report.markdown, report.html, report.json, *report.plots.values()):
        assert path.parent == report.markdown.parent and path.stat().st_size > 0


def test_results_table_has_the_seeds_rows_and_columns(report: ReportFiles, verdict: Verdict):
    rows = table(report.markdown.read_text(), "## Results")
    assert rows[0] == SEED_HEADERS
    body = rows[1:]
    assert [r[0] for r in body] == ["1", "4", "8", "16", "32", "64"]
    for row, step in zip(body, verdict.steps, strict=True):
        assert row[1] == f"{step.stats.ttft.mean:,.0f}"
        assert row[2] == f"{step.stats.ttft.p(99):,.0f}"
        assert row[3] == f"{step.stats.output_throughput:,.0f}"
    stable = [r[-1] for r in body]
    assert stable[:4] == ["yes"] * 4
    assert stable[4].startswith("yes (near limit: p99 TTFT margin +")  # the seed's ⚠️ at 32
    assert stable[5].startswith("no: p99 TTFT ") and "> 500.0 ms" in stable[5]
    mean_ttft = [float(r[1].replace(",", "")) for r in body]
    assert mean_ttft == sorted(mean_ttft)  # TTFT grows with concurrency, as in the seed


def test_gpu_columns_are_omitted_with_a_note_without_prometheus(report: ReportFiles):
    text = report.markdown.read_text()
    assert "VRAM per GPU and GPU utilization are omitted: no Prometheus URL was given" in text
    assert "VRAM per GPU (GiB)" not in text
    assert "gpu_memory_used_bytes" not in json.loads(report.json.read_text())["steps"][0]


def test_verdict_section_shows_every_check_with_its_margin(report: ReportFiles, verdict: Verdict):
    rows = table(report.markdown.read_text(), "## SLO verdict: FAIL (exit code 1)")
    assert rows[0] == ["Step", "Objective", "Value", "Limit", "Margin", "Result"]
    top = verdict.steps[-1]
    ttft = next(c for c in top.checks if c.slo == "ttft_p99_ms")
    assert ["concurrency=64", "p99 TTFT (ttft_p99_ms)", f"{ttft.value:,.2f} ms", "500.00 ms",
            f"{ttft.margin_pct:+.1f}%", "FAIL"] in rows
    assert len(rows) == 1 + sum(len(s.checks) for s in verdict.steps) + 1  # + the run's throughput check
    assert rows[-1][0] == "run" and rows[-1][-1] == "pass"


def test_headline_metadata_and_definitions_are_in_both_documents(report: ReportFiles, verdict: Verdict):
    markdown, page = report.markdown.read_text(), report.html.read_text()
    for text in (markdown, page):
        assert verdict.headline.text in text
        assert "highest concurrency meeting every SLO: 32" in text
        assert "Target: http://127.0.0.1:8080" in text
        assert "seed: 7" in text
        assert "slo of host gpu-01 serving Qwen/Qwen2.5-7B-Instruct" in text
        assert "Date: 2025-06-15T15:06:40Z" in text  # the first send: no clock in the report
    assert "- TTFT: send -> arrival of the first chunk that carries generated text" in markdown  # from record.py
    assert "<li>TTFT: send -&gt; arrival of the first chunk" in page
    assert "- Goodput: requests per second that met every per-request objective" in markdown  # from stats.py
    assert "| concurrency=64 | HTTP 500: engine error |" in markdown


# --- JSON ----------------------------------------------------------------------------------------------------


def test_json_has_vllm_field_names_per_step_and_run_metadata(report: ReportFiles, verdict: Verdict):
    data = json.loads(report.json.read_text())
    assert data["metadata"] | {"gpu_metrics": None} == {
        "date": "2025-06-15T15:06:40Z", "target": META.target, "model": META.model, "api": "openai-chat",
        "shape": META.shape, "label": "", "seed": 7, "gpu_metrics": None}
    assert [s["max_concurrency"] for s in data["steps"]] == [1, 4, 8, 16, 32, 64]
    for entry, step in zip(data["steps"], verdict.steps, strict=True):
        assert set(entry) >= VLLM_FIELDS
        assert (entry["date"], entry["backend"], entry["model_id"]) == ("20250615-150640", "openai-chat",
                                                                        META.model)
        assert entry["p99_ttft_ms"] == step.stats.ttft.p(99)
        assert entry["output_throughput"] == step.stats.output_throughput
        assert entry["stable"] is step.stable
    assert data["verdict"]["exit_code"] == 1
    assert data["headline"]["value"] == 32


# --- plots and HTML ------------------------------------------------------------------------------------------


def test_plots_are_valid_png_images(report: ReportFiles):
    for path in report.plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 300
            assert len(image.convert("L").getcolors()) > 10  # something was drawn
    markdown = report.markdown.read_text()
    assert all(f"]({p.name})" in markdown for p in report.plots.values())


def test_html_is_self_contained(report: ReportFiles):
    page = report.html.read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert ".png" not in page and "<link" not in page and "<script" not in page
    assert "<th>Concurrency</th><th>Mean TTFT (ms)</th><th>p99 TTFT (ms)</th>" in page


def test_output_is_deterministic_for_the_same_records(tmp_path: Path):
    first = write_report(tmp_path / "a", evaluate(seed_run(), example_source()), META)
    second = write_report(tmp_path / "b", evaluate(seed_run(), example_source()), META)
    names = sorted(p.name for p in first.markdown.parent.iterdir())
    assert names == sorted(p.name for p in second.markdown.parent.iterdir())
    for name in names:
        assert (first.markdown.parent / name).read_bytes() == (second.markdown.parent / name).read_bytes(), name


def test_an_unstepped_run_reports_one_row(tmp_path: Path):
    import random

    records = step_records(SEED_STEPS[3], random.Random(2), 1_750_000_000.0, label="")
    files = write_report(tmp_path, evaluate(records, example_source()), META)
    rows = table(files.markdown.read_text(), "## Results")
    assert rows[0][0] == "Step" and [r[0] for r in rows[1:]] == ["all"]
    assert json.loads(files.json.read_text())["steps"][0]["max_concurrency"] is None


# --- Prometheus ----------------------------------------------------------------------------------------------


class FakePrometheus(ThreadingHTTPServer):
    """Answers /api/v1/query as Prometheus does, from a table keyed by evaluation time; records every query."""

    def __init__(self, answers: dict[str, dict[float, float]], fail: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers = answers  # metric name -> {evaluation time: value}
        self.fail = fail
        self.queries: list[dict[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakePrometheus

    def do_GET(self) -> None:
        parsed = urllib.parse.urlparse(self.path)
        params = dict(urllib.parse.parse_qsl(parsed.query))
        self.server.queries.append({"path": parsed.path, **params})
        if self.server.fail is not None:
            self._send(400, {"status": "error", "errorType": "bad_data", "error": self.server.fail})
            return
        at = float(params["time"])
        metric = next(m for m in self.server.answers if m in params["query"])
        value = self.server.answers[metric].get(round(at, 3))
        result = [] if value is None else [{"metric": {}, "value": [at, repr(value)]}]
        self._send(200, {"status": "success", "data": {"resultType": "vector", "result": result}})

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def serve(server: FakePrometheus) -> Iterator[FakePrometheus]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def prometheus(verdict: Verdict) -> Iterator[FakePrometheus]:
    memory, utilization = {}, {}
    for step in verdict.steps:
        value = int(step.stats.value)
        if value in VRAM_GIB:
            memory[round(step.stats.window_end, 3)] = VRAM_GIB[value] * GIB
            utilization[round(step.stats.window_end, 3)] = min(0.95, 0.3 + value / 50)
    yield from serve(FakePrometheus({"gpufleet_gpu_memory_used_bytes": memory,
                                     "gpufleet_gpu_utilization_ratio": utilization}))


def test_gpu_columns_come_from_prometheus_over_each_steps_window(tmp_path: Path, verdict: Verdict, prometheus):
    files = write_report(tmp_path, verdict, META, prometheus_url=prometheus.url,
                         prometheus_selector='instance=~"gpu-01:.*"')
    rows = table(files.markdown.read_text(), "## Results")
    assert rows[0] == SEED_HEADERS[:-1] + GPU_HEADERS + ["Stable"]
    assert [r[4] for r in rows[1:]] == ["18.2", "19.1", "20.3", "21.7", "23.1", "n/a"]  # no data at 64
    assert [r[5] for r in rows[1:6]] == [f"{min(0.95, 0.3 + c / 50) * 100:.0f}" for c in (1, 4, 8, 16, 32)]
    assert "gpufleet_gpu_memory_used_bytes and gpufleet_gpu_utilization_ratio" in files.markdown.read_text()
    asked = prometheus.queries
    assert len(asked) == 2 * len(verdict.steps) and {q["path"] for q in asked} == {"/api/v1/query"}
    first = verdict.steps[0].stats
    seconds = math.ceil(first.window_end - first.window_start)
    assert asked[0]["query"] == (f'avg(avg_over_time(gpufleet_gpu_memory_used_bytes{{instance=~"gpu-01:.*"}}'
                                 f"[{seconds}s]))")
    assert asked[0]["time"] == f"{first.window_end:.3f}"
    assert asked[1]["query"].startswith("avg(avg_over_time(gpufleet_gpu_utilization_ratio{")
    entry = json.loads(files.json.read_text())["steps"][0]
    assert entry["gpu_memory_used_bytes"] == pytest.approx(18.2 * GIB)
    assert entry["gpu_utilization_ratio"] == pytest.approx(0.32)


def test_a_failing_prometheus_leaves_the_columns_out_with_its_error(tmp_path: Path, verdict: Verdict):
    for server in serve(FakePrometheus({}, fail="parse error at char 5")):
        files = write_report(tmp_path, verdict, META, prometheus_url=server.url)
    text = files.markdown.read_text()
    assert "VRAM per GPU and GPU utilization are omitted: Prometheus failed:" in text
    assert "HTTP 400: parse error at char 5" in text
    assert table(text, "## Results")[0] == SEED_HEADERS


def test_an_unreachable_prometheus_leaves_the_columns_out(tmp_path: Path, verdict: Verdict):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    files = write_report(tmp_path, verdict, META, prometheus_url=f"http://127.0.0.1:{port}", timeout=2)
    text = files.markdown.read_text()
    assert "Prometheus failed:" in text and "refused" in text.lower()
    assert table(text, "## Results")[0] == SEED_HEADERS


def test_window_query_is_each_gpus_time_average_then_the_mean():
    assert window_query("m", 100.0, 160.2) == "avg(avg_over_time(m[61s]))"
    assert window_query("m", 100.0, 100.0, '{gpu="0"}') == 'avg(avg_over_time(m{gpu="0"}[1s]))'
