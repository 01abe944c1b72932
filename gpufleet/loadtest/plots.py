"""The report's PNG plots, drawn with matplotlib's Agg canvas (no display, no pyplot global state).

Three plots, the ones the research found every serious report carries (docs/loadtest.md):
- TTFT and ITL percentiles (p50, p90, p99) against the step value, with the SLO limits;
- output tokens/s against the step value, with the throughput objective;
- p50 and p99 TTFT against output tokens/s: the knee where more load buys latency, not throughput.

Steps that were not stable are marked, so the plot tells the same story as the table. PNG metadata
carries no software version, so the bytes depend on the records alone (for a given matplotlib).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gpufleet.loadtest.gate import StepVerdict, Verdict
from gpufleet.loadtest.stats import Distribution

LEVELS = (50.0, 90.0, 99.0)
PLOTS = ("ttft-itl", "throughput", "latency-vs-throughput")  # file name suffixes
_DPI = 100


def write_plots(verdict: Verdict, out_dir: Path, basename: str) -> dict[str, Path]:
    """Draw every plot of `verdict`'s steps into `out_dir`; returns {plot name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers = {"ttft-itl": _latency_plot, "throughput": _throughput_plot,
               "latency-vs-throughput": _knee_plot}
    paths = {}
    for name in PLOTS:
        fig = drawers[name](verdict)
        path = out_dir / f"{basename}-{name}.png"
        FigureCanvasAgg(fig).print_png(path, metadata={"Software": None})
        paths[name] = path
    return paths


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _axis(verdict: Verdict) -> tuple[list[float], str, list[str]]:
    """X positions, axis label and tick labels: step values when every step has one, else 1..n."""
    steps = verdict.steps
    key = steps[0].stats.key if steps else ""
    if steps and all(s.stats.value is not None for s in steps) and len({s.stats.key for s in steps}) == 1:
        return [float(s.stats.value or 0) for s in steps], key, [s.stats.label for s in steps]
    return [float(i + 1) for i in range(len(steps))], "step", [s.stats.label for s in steps]


def _set_x(ax: Axes, xs: Sequence[float], label: str, ticks: Sequence[str]) -> None:
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(xs), list(ticks))
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)


def _mark_unstable(ax: Axes, xs: Sequence[float], ys: Sequence[float], steps: Sequence[StepVerdict]) -> None:
    bad = [(x, y) for x, y, s in zip(xs, ys, steps, strict=True) if not s.stable and not math.isnan(y)]
    if bad:
        ax.scatter([b[0] for b in bad], [b[1] for b in bad], marker="x", s=80, color="red", zorder=5,
                   label="not stable")


def _percentile_lines(ax: Axes, xs: Sequence[float], dists: Sequence[Distribution], name: str) -> None:
    for level in LEVELS:
        ys = [_nan(d.p(level)) for d in dists]
        ax.plot(xs, ys, marker="o", label=f"p{int(level)} {name}")


def _latency_plot(verdict: Verdict) -> Figure:
    xs, label, ticks = _axis(verdict)
    slo = verdict.source.slo
    fig = Figure(figsize=(10, 4), dpi=_DPI)
    for index, (name, limit) in enumerate((("ttft", slo.ttft_p99_ms), ("itl", slo.itl_p99_ms))):
        ax = fig.add_subplot(1, 2, index + 1)
        dists = [s.stats.metric(name) for s in verdict.steps]
        _percentile_lines(ax, xs, dists, name.upper())
        ax.axhline(limit, color="red", linestyle="--", label=f"SLO p99 {limit:g} ms")
        _mark_unstable(ax, xs, [_nan(d.p(99)) for d in dists], verdict.steps)
        _set_x(ax, xs, label, ticks)
        ax.set_ylabel(f"{name.upper()} (ms)")
        ax.set_title(f"{name.upper()} percentiles vs {label}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _throughput_plot(verdict: Verdict) -> Figure:
    xs, label, ticks = _axis(verdict)
    fig = Figure(figsize=(6, 4), dpi=_DPI)
    ax = fig.add_subplot(1, 1, 1)
    output = [s.stats.output_throughput for s in verdict.steps]
    ax.plot(xs, output, marker="o", label="output tokens/s")
    floor = verdict.source.slo.min_output_tokens_per_s
    ax.axhline(floor, color="red", linestyle="--", label=f"SLO min output {floor:g} tokens/s")
    _mark_unstable(ax, xs, output, verdict.steps)
    _set_x(ax, xs, label, ticks)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Throughput vs {label}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _knee_plot(verdict: Verdict) -> Figure:
    fig = Figure(figsize=(6, 4), dpi=_DPI)
    ax = fig.add_subplot(1, 1, 1)
    xs = [s.stats.output_throughput for s in verdict.steps]
    ttft = [_nan(s.stats.ttft.p(99)) for s in verdict.steps]
    ax.plot(xs, ttft, marker="o", label="p99 TTFT")
    ax.plot(xs, [_nan(s.stats.ttft.p(50)) for s in verdict.steps], marker="s", label="p50 TTFT")
    ax.axhline(verdict.source.slo.ttft_p99_ms, color="red", linestyle="--",
               label=f"SLO p99 TTFT {verdict.source.slo.ttft_p99_ms:g} ms")
    for x, y, step in zip(xs, ttft, verdict.steps, strict=True):
        if not math.isnan(y):
            ax.annotate(step.stats.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    _mark_unstable(ax, xs, ttft, verdict.steps)
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("Latency vs throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
