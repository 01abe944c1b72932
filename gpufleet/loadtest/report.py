"""The load-test report: Markdown, self-contained HTML, vLLM-compatible JSON and PNG plots.

It answers the seed's question in the seed's shape: one row per concurrency with mean and p99
TTFT, output tokens/s, VRAM per GPU (and GPU utilization) and whether the service was stable
there; then the SLO verdict with the margin of every objective, the headline (the highest
concurrency meeting every SLO), the plots, the latency distributions and the metric definitions.

Both documents are rendered from one list of blocks, so they say the same thing. The JSON file
carries vLLM's `bench serve` field names per step (stats.summary_json) beside the run's metadata
and the gate's verdict. Nothing depends on the clock or the machine: the same records and
Prometheus answers give the same bytes (the date is the run's first send unless given).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gpufleet.loadtest import record as record_module
from gpufleet.loadtest import stats as stats_module
from gpufleet.loadtest.gate import Check, StepVerdict, Verdict
from gpufleet.loadtest.plots import write_plots
from gpufleet.loadtest.prometheus import MEMORY_METRIC, UTILIZATION_METRIC, GpuUsage, PrometheusError, gpu_usage
from gpufleet.loadtest.stats import LATENCY_METRICS, PERCENTILES, Distribution, summary_json

NEAR_LIMIT_PCT = 15.0  # a stable step with less room than this is flagged, as the seed's "⚠️ (接近极限)"
GIB = 2**30
_TITLES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E"}
_PLOT_TITLES = {
    "ttft-itl": "TTFT and ITL percentiles vs load",
    "throughput": "Throughput vs load",
    "latency-vs-throughput": "Latency vs throughput",
}


@dataclass(frozen=True)
class RunMeta:
    """What was tested and how: printed at the top of the report and in the JSON's metadata."""

    target: str  # the URL the load went to (normally the gateway)
    model: str  # the model name requests asked for
    api: str  # "openai-chat", "openai-completions" or "tgi" (vLLM's `backend`)
    shape: str  # the load shape, in words: "closed loop, concurrency 1,4,8,16,32,64, 60 s each"
    date: str | None = None  # ISO 8601; None: the run's first measured send, in UTC
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping (seed, prompt sizes)


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    html: Path
    json: Path
    plots: dict[str, Path]  # plot name -> PNG beside the documents


# ---------------------------------------------------------------------------------------------
# Blocks: what both documents are made of


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    alt: str
    path: Path


Block = Heading | Para | Bullets | Table | Image


# ---------------------------------------------------------------------------------------------
# Entry point


def write_report(
    out_dir: Path | str,
    verdict: Verdict,
    meta: RunMeta,
    *,
    prometheus_url: str | None = None,
    prometheus_selector: str = "",
    basename: str = "loadtest",
    timeout: float = 5.0,
) -> ReportFiles:
    """Write `<basename>.md`, `<basename>.html`, `<basename>.json` and `<basename>-*.png` into `out_dir`.

    With `prometheus_url`, VRAM per GPU and GPU utilization are read for each step's window
    (`prometheus_selector` narrows the GPUs, e.g. `instance=~"gpu-01:.*"`); without it, or when
    Prometheus fails, those columns are left out and a note says why: a report never stops for them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    usage, gpu_note = _gpu_columns(verdict, prometheus_url, prometheus_selector, timeout)
    plots = write_plots(verdict, out, basename)
    date = meta.date or _first_send(verdict)
    blocks = _document(verdict, meta, date, usage, gpu_note, plots)
    files = ReportFiles(out / f"{basename}.md", out / f"{basename}.html", out / f"{basename}.json", plots)
    files.markdown.write_text(render_markdown(blocks), encoding="utf-8")
    files.html.write_text(render_html(blocks, title=f"Load test: {meta.model}"), encoding="utf-8")
    data = report_json(verdict, meta, date, usage, gpu_note)
    files.json.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return files


def _first_send(verdict: Verdict) -> str:
    starts = [s.stats.window_start for s in verdict.steps if s.stats.window_start is not None]
    if not starts:
        return "unknown"
    return datetime.fromtimestamp(min(starts), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _gpu_columns(
    verdict: Verdict, url: str | None, selector: str, timeout: float
) -> tuple[dict[str, GpuUsage] | None, str]:
    """Each step's GPU usage, or None and the note that says why the columns are missing."""
    if not url:
        return None, ("VRAM per GPU and GPU utilization are omitted: no Prometheus URL was given, and only "
                      "the GPU exporter (through Prometheus) can see the GPUs.")
    windows: dict[str, tuple[float, float]] = {}
    for step in verdict.steps:
        if step.stats.window_start is not None and step.stats.window_end is not None:
            windows[step.stats.step] = (step.stats.window_start, step.stats.window_end)
    try:
        usage = gpu_usage(url, windows, selector, timeout)
    except PrometheusError as exc:
        return None, f"VRAM per GPU and GPU utilization are omitted: Prometheus failed: {exc}"
    where = f" ({selector})" if selector else ""
    return usage, (f"VRAM per GPU and GPU utilization: {MEMORY_METRIC} and {UTILIZATION_METRIC}{where} from "
                   f"{url}, each GPU's time average over the step's window, then the mean over the GPUs.")


# ---------------------------------------------------------------------------------------------
# The document


def _document(
    verdict: Verdict, meta: RunMeta, date: str, usage: dict[str, GpuUsage] | None, gpu_note: str,
    plots: dict[str, Path],
) -> list[Block]:
    blocks: list[Block] = [Heading(1, f"Load test: {meta.model}")]
    blocks.append(Bullets(tuple(_meta_lines(verdict, meta, date))))
    blocks += [Heading(2, "Headline"), Para(verdict.headline.text)]
    blocks += [Heading(2, "Results"), results_table(verdict, usage), Para(gpu_note)]
    blocks += _verdict_blocks(verdict)
    blocks.append(Heading(2, "Plots"))
    blocks += [Image(_PLOT_TITLES[name], path) for name, path in plots.items()]
    blocks += [Heading(2, "Throughput and counts"), _throughput_table(verdict)]
    blocks += [Heading(2, "Latency distributions (ms)"), _latency_table(verdict)]
    errors = _errors_table(verdict)
    if errors.rows:
        blocks += [Heading(2, "Errors"), errors]
    blocks += [Heading(2, "Metric definitions"), Bullets(tuple(metric_definitions()))]
    return blocks


def _meta_lines(verdict: Verdict, meta: RunMeta, date: str) -> list[str]:
    lines = [f"Date: {date}", f"Target: {meta.target}", f"Model: {meta.model}", f"API: {meta.api}",
             f"Load shape: {meta.shape}"]
    if meta.label:
        lines.append(f"Label: {meta.label}")
    lines += [f"{key}: {value}" for key, value in sorted(meta.extra.items())]
    lines.append(f"Objectives: {verdict.source.describe()}")
    lines.append(f"Verdict: {verdict.status.upper()} (exit code {verdict.exit_code})")
    lines += [f"Note: {note}" for note in verdict.notes]
    return lines


def results_table(verdict: Verdict, usage: dict[str, GpuUsage] | None) -> Table:
    """The seed's table: one row per step; the GPU columns only when Prometheus answered."""
    key = verdict.headline.key or "step"
    headers = [key.capitalize(), "Mean TTFT (ms)", "p99 TTFT (ms)", "Output tokens/s"]
    if usage is not None:
        headers += ["VRAM per GPU (GiB)", "GPU utilization (%)"]
    headers.append("Stable")
    rows = []
    for step in verdict.steps:
        s = step.stats
        row = [s.label, _num(s.ttft.mean, 0), _num(s.ttft.p(99), 0), _num(s.output_throughput, 0)]
        if usage is not None:
            gpu = usage.get(s.step, GpuUsage(None, None))
            row += [_num(None if gpu.memory_used_bytes is None else gpu.memory_used_bytes / GIB, 1),
                    _num(None if gpu.utilization_ratio is None else gpu.utilization_ratio * 100, 0)]
        row.append(stable_text(step))
        rows.append(tuple(row))
    return Table(tuple(headers), tuple(rows))


def stable_text(step: StepVerdict) -> str:
    """"yes", "yes (near limit: …)", "no: <first failed objective>" or "invalid: <first reason>"."""
    if step.status != "pass":
        label = "no" if step.status == "fail" else "invalid"
        return f"{label}: {step.reasons[0]}"
    tight = min((c for c in step.checks if c.margin_pct is not None), key=lambda c: c.margin_pct or 0, default=None)
    if tight is not None and tight.margin_pct is not None and tight.margin_pct < NEAR_LIMIT_PCT:
        return f"yes (near limit: {tight.what} margin {tight.margin_pct:+.1f}%)"
    return "yes"


def _verdict_blocks(verdict: Verdict) -> list[Block]:
    blocks: list[Block] = [Heading(2, f"SLO verdict: {verdict.status.upper()} (exit code {verdict.exit_code})")]
    blocks.append(Para(f"Objectives: {verdict.source.describe()}. Margin is the room left as a share of the "
                       "limit: positive passes, negative fails."))
    rows = [_check_row(step.stats.step or "run", c) for step in verdict.steps for c in step.checks]
    rows += [_check_row("run", c) for c in verdict.run_checks]
    blocks.append(Table(("Step", "Objective", "Value", "Limit", "Margin", "Result"), tuple(rows)))
    if verdict.reasons:
        blocks += [Para("Reasons:"), Bullets(tuple(verdict.reasons))]
    return blocks


def _check_row(step: str, check: Check) -> tuple[str, ...]:
    space = "" if check.unit == "%" else " "
    value = "n/a" if check.value is None else f"{_num(check.value * check.scale, 2)}{space}{check.unit}"
    limit = f"{_num(check.limit * check.scale, 2)}{space}{check.unit}"
    margin = "n/a" if check.margin_pct is None else f"{check.margin_pct:+.1f}%"
    return (step, f"{check.what} ({check.slo})", value, limit, margin, "pass" if check.passed else "FAIL")


def _throughput_table(verdict: Verdict) -> Table:
    headers = ("Step", "Sent", "Completed", "Failed", "Error rate", "Window (s)", "Requests/s", "Goodput (req/s)",
               "Output tokens/s", "Total tokens/s", "Max concurrent", "p99 dispatch lag (ms)")
    rows = []
    for step in verdict.steps:
        s = step.stats
        lag = s.dispatch_lag.p(99) if s.dispatch_lag is not None else None
        rows.append((s.step or "run", str(s.sent), str(s.completed), str(s.failed), f"{s.error_rate * 100:.2f}%",
                     _num(s.duration_s, 1), _num(s.request_throughput, 2), _num(s.request_goodput, 2),
                     _num(s.output_throughput, 1), _num(s.total_token_throughput, 1),
                     str(s.max_concurrent_requests), _num(lag, 2)))
    return Table(headers, tuple(rows))


def _latency_table(verdict: Verdict) -> Table:
    levels = [f"p{stats_module.percentile_word(q)}" for q in PERCENTILES]
    headers = ("Step", "Metric", "n", "mean", "std", *levels, "max")
    rows = []
    for step in verdict.steps:
        for name in LATENCY_METRICS:
            dist: Distribution = step.stats.metric(name)
            rows.append((step.stats.step or "run", _TITLES[name], str(dist.n), _num(dist.mean, 1), _num(dist.std, 1),
                         *(_num(dist.p(q), 1) for q in PERCENTILES), _num(dist.max, 1)))
    return Table(headers, tuple(rows))


def _errors_table(verdict: Verdict) -> Table:
    rows = tuple((s.stats.step or "run", reason, str(n)) for s in verdict.steps for reason, n in s.stats.errors.items())
    return Table(("Step", "Reason", "Requests"), rows)


_VERDICT_DEFINITIONS = (
    "Stable: every per-step objective (p99 TTFT, p99 ITL, p99 TPOT and p99 E2E where set, the error rate) held, "
    "on a measurement the gate accepted as valid; the headline is the highest step that is stable with every "
    "lower step stable too.",
    "Warm-up requests and, in a stepped run, requests sent outside every step are left out of every number.",
)


def metric_definitions() -> list[str]:
    """The definitions the numbers follow, read from the modules that implement them (record.py, stats.py)."""
    return [
        *_bullets(record_module.__doc__ or "", after="Definitions"),
        *_bullets(stats_module.__doc__ or ""),
        *_VERDICT_DEFINITIONS,
    ]


def _bullets(doc: str, after: str | None = None) -> list[str]:
    lines = doc.splitlines()
    if after is not None:
        lines = lines[next((i for i, line in enumerate(lines) if line.startswith(after)), len(lines)):]
    items: list[str] = []
    for line in lines:
        if line.startswith("- "):
            items.append(line[2:].strip())
        elif items and line.startswith("  ") and line.strip():
            items[-1] += " " + line.strip()
        elif items and not line.strip():
            break
    return [item[0].upper() + item[1:] for item in items]


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


# ---------------------------------------------------------------------------------------------
# JSON


def report_json(
    verdict: Verdict, meta: RunMeta, date: str, usage: dict[str, GpuUsage] | None, gpu_note: str
) -> dict[str, Any]:
    """The run's metadata, one vLLM-style result per step (plus status and GPU figures), and the verdict."""
    vllm_meta = {"date": _vllm_date(date), "backend": meta.api, "model_id": meta.model, "label": meta.label or None}
    steps = []
    for step in verdict.steps:
        entry = summary_json(step.stats, vllm_meta)
        entry.update({"status": step.status, "stable": step.stable})
        if usage is not None:
            gpu = usage.get(step.stats.step, GpuUsage(None, None))
            entry.update({"gpu_memory_used_bytes": gpu.memory_used_bytes,
                          "gpu_utilization_ratio": gpu.utilization_ratio})
        steps.append(entry)
    metadata: dict[str, Any] = {"date": date, "target": meta.target, "model": meta.model, "api": meta.api,
                                "shape": meta.shape, "label": meta.label}
    for key, value in meta.extra.items():
        metadata.setdefault(key, value)  # extra never overrides what was tested
    metadata["gpu_metrics"] = gpu_note
    return {"metadata": metadata, "headline": verdict.headline.to_dict(), "steps": steps,
            "verdict": verdict.to_dict()}


def _vllm_date(date: str) -> str:
    """vLLM's `date` field format (%Y%m%d-%H%M%S) from an ISO date; unchanged when it does not parse."""
    try:
        return datetime.fromisoformat(date.replace("Z", "+00:00")).strftime("%Y%m%d-%H%M%S")
    except ValueError:
        return date


# ---------------------------------------------------------------------------------------------
# Rendering


def render_markdown(blocks: Sequence[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Para):
            parts.append(block.text)
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            parts.append(_markdown_table(block))
        else:
            parts.append(f"![{block.alt}]({block.path.name})")
    return "\n\n".join(parts) + "\n"


def _markdown_table(table: Table) -> str:
    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [row(table.headers), "|" + "|".join("---" for _ in table.headers) + "|"]
    lines += [row(r) for r in table.rows]
    return "\n".join(lines)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.25rem .5rem;"
    "text-align:left}th{background:#f3f3f3}img{max-width:100%}"
)


def render_html(blocks: Sequence[Block], title: str) -> str:
    """One HTML file with the plots inlined as data: URIs, so it can be mailed or archived alone."""
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            body.append(_html_table(block))
        else:
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(block.alt)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
