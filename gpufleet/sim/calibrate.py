"""Fit a profile to measurements: mean TTFT and aggregate output tokens/s at several concurrencies.

The fit runs the virtual-time simulator itself (virtual.py) inside the loop, so what is fitted
is exactly what later runs will reproduce, queueing and prefill interference included. Each
measured concurrency gets its own parameters, which makes the problem square and nearly
diagonal:

* the aggregate throughput at concurrency c is governed by the decode step cost there: the fit
  puts a `decode_s` knot at every measured c;
* the TTFT at the lowest measured concurrency is governed by the request overhead and the
  prefill cost (scaled together, keeping the base profile's split between them);
* the TTFT at every other c by what a prefill costs when c-1 sequences decode alongside: a
  `mixed_step_s` knot at c-1.

Each round simulates every measured point and moves each parameter by a damped Newton step in
log space (errors are ratios, so a 10% miss is a 10% miss at 100 or 1000 tokens/s), with each
sensitivity estimated from the run itself (the share of the TTFT or of the request's time the
parameter accounts for). Table knots
outside the measured range keep their ratio to the nearest measured knot, so the base profile's
overload shape carries over. A handful of rounds reach 1%; 5-6 points take a few seconds.

CLI: python -m gpufleet.sim.calibrate MEASUREMENTS.csv --base PROFILE --out NEW.yml
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from gpufleet.errors import ConfigError, Problem
from gpufleet.paths import display_path
from gpufleet.sim.profile import ENGINE_KEYS, Profile, Table, load_profile
from gpufleet.sim.types import SimConfig
from gpufleet.sim.virtual import LoadResult, run_closed_loop
from gpufleet.suggest import hint

CSV_COLUMNS = ("concurrency", "ttft_ms", "output_tokens_per_s", "prompt_tokens", "output_tokens")
HEADER_MARK = "Calibration (written by gpufleet.sim.calibrate"


@dataclass(frozen=True)
class Measurement:
    """One closed-loop load run on the real system: `concurrency` clients, fixed prompt and
    output lengths (ignore_eos), and what the load tool reported."""

    concurrency: int
    ttft_ms: float
    output_tokens_per_s: float
    prompt_tokens: int
    output_tokens: int


# The seed article's table: Qwen2.5-7B-Instruct bf16 on 4x RTX 4090D (TP4, vLLM), 512-token
# prompts, 512 output tokens forced, closed loop. Concurrency 64 was unstable (TTFT > 500 ms,
# OOM on the real system), so it is not a fit target; see docs/simulator-model.md.
SEED_MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement(1, 120, 185, 512, 512),
    Measurement(4, 145, 340, 512, 512),
    Measurement(8, 180, 520, 512, 512),
    Measurement(16, 240, 680, 512, 512),
    Measurement(32, 380, 760, 512, 512),
)


@dataclass(frozen=True)
class FitRow:
    measurement: Measurement
    result: LoadResult

    @property
    def ttft_error(self) -> float:
        return self.result.ttft_mean_s * 1e3 / self.measurement.ttft_ms - 1

    @property
    def throughput_error(self) -> float:
        return self.result.output_tokens_per_s / self.measurement.output_tokens_per_s - 1


@dataclass(frozen=True)
class FitResult:
    profile: Profile
    rows: tuple[FitRow, ...]
    rounds: int

    @property
    def max_error(self) -> float:
        return max(max(abs(r.ttft_error), abs(r.throughput_error)) for r in self.rows)

    def table(self) -> str:
        return format_table(self.rows)


def format_table(rows: tuple[FitRow, ...] | list[FitRow]) -> str:
    lines = [
        "| concurrency | TTFT target ms | TTFT got ms | error | tokens/s target | tokens/s got | error |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        m, r = row.measurement, row.result
        lines.append(
            f"| {m.concurrency} | {m.ttft_ms:g} | {r.ttft_mean_s * 1e3:.0f} | {row.ttft_error:+.1%} "
            f"| {m.output_tokens_per_s:g} | {r.output_tokens_per_s:.0f} | {row.throughput_error:+.1%} |"
        )
    return "\n".join(lines)


def simulate(profile: Profile, config: SimConfig, measurement: Measurement) -> LoadResult:
    """The virtual-time counterpart of one measurement."""
    return run_closed_loop(config, profile, measurement.concurrency, measurement.prompt_tokens,
                           measurement.output_tokens, ignore_eos=True)


def evaluate(profile: Profile, config: SimConfig, measurements: list[Measurement] | tuple[Measurement, ...]
             ) -> tuple[FitRow, ...]:
    return tuple(FitRow(m, simulate(profile, config, m)) for m in measurements)


# the fit ----------------------------------------------------------------------------------------


class _Params:
    """The fitted parameters in log space, and how they make a profile from the base."""

    def __init__(self, base: Profile, concurrencies: list[int]):
        self.base = base
        self.cs = concurrencies
        # x[0..n): log decode_s at each c; x[n]: log latency scale; x[n+1..2n): log mixed_step_s at c-1
        self.x = [math.log(base.decode_s.at(c)) for c in concurrencies]
        self.x.append(0.0)
        self.x += [math.log(max(MIN_SECONDS, base.mixed_step_s.at(c - 1))) for c in concurrencies[1:]]

    def profile(self, x: list[float]) -> Profile:
        base, cs, n = self.base, self.cs, len(self.cs)
        decode = {float(c): math.exp(v) for c, v in zip(cs, x[:n], strict=True)}
        decode.update(_outside(base.decode_s, decode))
        mixed = {float(cs[0] - 1): base.mixed_step_s.at(cs[0] - 1)}
        mixed.update({float(c - 1): math.exp(v) for c, v in zip(cs[1:], x[n + 1:], strict=True)})
        mixed.update(_outside(base.mixed_step_s, mixed))
        scale = math.exp(x[n])
        return replace(
            base,
            decode_s=Table.of(decode, base.decode_s.extend),
            mixed_step_s=Table.of(mixed, base.mixed_step_s.extend),
            prefill_s_per_token=base.prefill_s_per_token * scale,
            request_overhead_s=base.request_overhead_s * scale,
        )


MIN_SECONDS = 1e-5  # the smallest table value the fit moves from (log space needs > 0)


def _outside(base: Table, fitted: dict[float, float]) -> dict[float, float]:
    """Base knots outside the fitted range, keeping their ratio to the nearest fitted knot."""
    lo, hi = min(fitted), max(fitted)
    extra: dict[float, float] = {}
    for knot, value in base.points:
        ref = lo if knot < lo else hi if knot > hi else None
        if ref is None:
            continue
        at_ref = base.at(ref)
        extra[knot] = value * fitted[ref] / at_ref if at_ref > 0 else value
    return extra


def fit(measurements: list[Measurement] | tuple[Measurement, ...], base: Profile, config: SimConfig, *,
        tolerance: float = 0.01, max_rounds: int = 15) -> FitResult:
    """Fit `base` to `measurements` (see the module docstring); the best profile found."""
    if not measurements:
        raise ValueError("no measurements to fit")
    cs = sorted({m.concurrency for m in measurements})
    params = _Params(base, cs)
    x = params.x
    best: tuple[float, Profile, tuple[FitRow, ...]] | None = None
    damping = DAMPING
    rounds = 0
    for rounds in range(1, max_rounds + 1):  # noqa: B007 - reported
        profile = params.profile(x)
        rows = evaluate(profile, config, measurements)
        y = _residuals(rows, cs)
        worst = max(abs(v) for v in y)
        if best is None or worst < best[0]:
            best = (worst, profile, rows)
        else:
            # a closed loop's mean TTFT jumps a little with the phase pattern its clients settle
            # in, so the iteration can circle the solution: take shorter steps as it does
            damping *= 0.75
        if worst < tolerance:
            break
        slopes = _sensitivities(profile, rows, cs)
        x = [xi - max(-0.7, min(0.7, damping * yi / si)) for xi, yi, si in zip(x, y, slopes, strict=True)]
        x = [max(math.log(MIN_SECONDS), xi) for xi in x]
    assert best is not None
    _, profile, rows = best
    fitted = replace(profile, header=_fit_header(base.header, rows))
    return FitResult(fitted, rows, rounds)


DAMPING = 0.8  # of each round's step: the parameters are weakly coupled (a prefill stalls decodes)


def _sensitivities(profile: Profile, rows: tuple[FitRow, ...], cs: list[int]) -> list[float]:
    """d log(simulated) / d log(parameter) for each parameter's own target, from the model's structure.

    A throughput moves with the share of each request's time spent in the fitted decode cost; a
    TTFT with the share of it that the fitted parameter is. Estimating these from the run is
    steadier than finite differences, which the discreteness of a simulation makes noisy.
    """
    by_c: dict[int, list[FitRow]] = {c: [] for c in cs}
    for row in rows:
        by_c[row.measurement.concurrency].append(row)
    slopes: list[float] = []
    for c in cs:
        shares = [
            (r.measurement.output_tokens - 1) * profile.decode_s.at(c) / r.result.e2e_mean_s for r in by_c[c]
        ]
        slopes.append(-min(1.0, max(0.1, sum(shares) / len(shares))))
    lowest = by_c[cs[0]]
    shares = [
        (profile.request_overhead_s + profile.prefill_s_per_token * r.measurement.prompt_tokens) / r.result.ttft_mean_s
        for r in lowest
    ]
    slopes.append(min(1.0, max(0.1, sum(shares) / len(shares))))
    for c in cs[1:]:
        shares = [profile.mixed_step_s.at(c - 1) / r.result.ttft_mean_s for r in by_c[c]]
        slopes.append(min(1.0, max(0.02, sum(shares) / len(shares))))
    return slopes


def fit_profile(measurements: list[Measurement], base: Profile, config: SimConfig) -> Profile:
    """The profile that reproduces `measurements` in virtual time (see `fit` for the details)."""
    return fit(measurements, base, config).profile


def _residuals(rows: tuple[FitRow, ...], cs: list[int]) -> list[float]:
    """Log errors per parameter: throughput per concurrency, then TTFT per concurrency."""
    thr: dict[int, list[float]] = {c: [] for c in cs}
    ttft: dict[int, list[float]] = {c: [] for c in cs}
    for row in rows:
        c = row.measurement.concurrency
        thr[c].append(math.log(row.result.output_tokens_per_s / row.measurement.output_tokens_per_s))
        ttft[c].append(math.log(row.result.ttft_mean_s * 1e3 / row.measurement.ttft_ms))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return [mean(thr[c]) for c in cs] + [mean(ttft[c]) for c in cs]


def _fit_header(header: str, rows: tuple[FitRow, ...]) -> str:
    kept = header.split(HEADER_MARK)[0].rstrip()
    section = [
        f"{HEADER_MARK}, virtual-time closed-loop runs vs the measurements):",
        *format_table(rows).splitlines(),
    ]
    return (kept + "\n\n" if kept else "") + "\n".join(section)


# deriving a layout from a calibrated one ------------------------------------------------------


def derive_profile(
    base: Profile,
    *,
    name: str,
    description: str,
    cards_ratio: float,
    weight_read_scale: float,
    ttft_ms: float,
    prompt_tokens: int = 512,
    engine: dict[str, object] | None = None,
    header: str = "",
) -> Profile:
    """The same model on a fraction of the base's GPUs (or another precision), from the base's fit.

    * per-sequence work spreads over the cards, so b sequences on the new layout cost what
      b / cards_ratio cost on the base: the decode table's growth and the mixed-step cost are
      the base's read at b / cards_ratio (the concurrency knee moves with the card count);
    * the weight read (the decode cost of one sequence) scales with the weight bytes per GPU:
      decode_s(b) = weight_read_scale * base.decode_s(1) + base.decode_s(b / cards_ratio) - base.decode_s(1);
    * each GPU holds 1 / cards_ratio times the base's share of every token's KV cache;
    * the prefill cost per token is set so the TTFT of one `prompt_tokens` request alone is `ttft_ms`,
      and the mixed-step cost scales with it (whatever slows a prompt down slows the step that
      carries it beside the decodes as much).
    """
    if not 0 < cards_ratio <= 1:
        raise ValueError("cards_ratio must be in (0, 1]")
    d1 = base.decode_s.at(1)
    top = max(base.decode_s.knots()) * cards_ratio
    mapped = [k * cards_ratio for k in base.decode_s.knots()]
    powers = (2**i for i in range(12) if 2**i <= top)
    knots = sorted({1, *powers, *(int(b) for b in mapped if b >= 1 and b.is_integer())})
    decode = {b: weight_read_scale * d1 + base.decode_s.at(b / cards_ratio) - d1 for b in knots}
    kv = base.kv_read_s_per_token / cards_ratio
    alone = ttft_ms / 1e3 - base.request_overhead_s - base.step_overhead_s - kv * prompt_tokens
    if alone <= 0:
        raise ValueError(f"a {ttft_ms} ms TTFT is below the base's request overhead")
    slower = alone / (base.prefill_s_per_token * prompt_tokens)
    mixed = {b: slower * base.mixed_step_s.at(b / cards_ratio) for b in [0, *knots]}
    return replace(
        base,
        name=name,
        description=description,
        decode_s=Table.of(decode, base.decode_s.extend),
        mixed_step_s=Table.of(mixed, base.mixed_step_s.extend),
        kv_read_s_per_token=kv,
        prefill_s_per_token=alone / prompt_tokens,
        engine=dict(engine if engine is not None else base.engine),
        header=header,
        source=None,
    )


def behaviour_table(profile: Profile, config: SimConfig, concurrencies: list[int] | tuple[int, ...],
                    prompt_tokens: int = 512, output_tokens: int = 512) -> str:
    """A markdown table of virtual closed-loop runs: what a profile predicts at each concurrency."""
    lines = [
        "| concurrency | TTFT mean ms | TTFT p99 ms | ITL mean ms | output tokens/s | preemptions |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in concurrencies:
        r = run_closed_loop(config, profile, c, prompt_tokens, output_tokens, ignore_eos=True)
        lines.append(f"| {c} | {r.ttft_mean_s * 1e3:.0f} | {r.ttft_p99_s * 1e3:.0f} | {r.itl_mean_s * 1e3:.1f} "
                     f"| {r.output_tokens_per_s:.0f} | {r.preemptions} |")
    return "\n".join(lines)


# measurements files ---------------------------------------------------------------------------


def load_measurements(csv_path: str | Path) -> list[Measurement]:
    """Read a measurements CSV (columns: concurrency, ttft_ms, output_tokens_per_s,
    prompt_tokens, output_tokens; extra columns ignored; lines starting with # skipped)."""
    path = Path(csv_path)
    shown = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(file=shown, key="", message=f"cannot be read: {exc.strerror}",
                                   fix="check the path of the measurements CSV")]) from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#")]
    if not lines:
        raise ConfigError([Problem(file=shown, key="", message="holds no measurements",
                                   fix=f"write a header line ({','.join(CSV_COLUMNS)}) and one row per run")])
    reader = csv.DictReader([line for _, line in lines], skipinitialspace=True)
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise ConfigError([Problem(file=shown, line=lines[0][0], key="", message=f"lacks the column(s) "
                                   f"{', '.join(missing)}", fix=f"use the header {','.join(CSV_COLUMNS)}")])
    problems: list[Problem] = []
    found: list[Measurement] = []
    for (line_no, _), raw in zip(lines[1:], reader, strict=True):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        values: dict[str, float] = {}
        for column in CSV_COLUMNS:
            try:
                value = float(row[column])
            except (KeyError, ValueError):
                value = math.nan
            whole = column in ("concurrency", "prompt_tokens", "output_tokens")
            if not math.isfinite(value) or value <= 0 or (whole and not value.is_integer()):
                kind = "a whole number >= 1" if whole else "a number > 0"
                problems.append(Problem(file=shown, line=line_no, key=column,
                                        message=f"must be {kind}, not {row.get(column)!r}",
                                        fix=f"write {column} as {kind}"))
            values[column] = value
        if len(problems) == 0 or all(p.line != line_no for p in problems):
            found.append(Measurement(int(values["concurrency"]), values["ttft_ms"], values["output_tokens_per_s"],
                                     int(values["prompt_tokens"]), int(values["output_tokens"])))
    if problems:
        raise ConfigError(problems)
    if not found:
        raise ConfigError([Problem(file=shown, key="", message="holds a header but no measurements",
                                   fix="add one row per load run")])
    return found


def write_measurements(measurements: list[Measurement] | tuple[Measurement, ...], path: Path) -> None:
    lines = [",".join(CSV_COLUMNS)]
    lines += [f"{m.concurrency},{m.ttft_ms:g},{m.output_tokens_per_s:g},{m.prompt_tokens},{m.output_tokens}"
              for m in measurements]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpufleet.sim.calibrate",
        description="Fit a simulator profile to closed-loop measurements and write it as YAML.",
    )
    parser.add_argument("measurements", nargs="?", help="CSV: " + ",".join(CSV_COLUMNS))
    parser.add_argument("--seed-table", action="store_true", help="fit the seed article's 4x RTX 4090D table")
    parser.add_argument("--base", required=True, help="the profile to start from: a packaged name or a YAML path")
    parser.add_argument("--out", help="where to write the fitted profile (default: print it)")
    parser.add_argument("--name", help="the fitted profile's name (default: the base's)")
    parser.add_argument("--description", help="the fitted profile's description")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an engine setting of the measured layout, e.g. num_gpu_blocks=82062 (repeatable)")
    args = parser.parse_args(argv)
    try:
        if args.seed_table == bool(args.measurements):
            parser.error("give a measurements CSV or --seed-table (one of them)")
        measurements = list(SEED_MEASUREMENTS) if args.seed_table else load_measurements(args.measurements)
        base = load_profile(args.base)
        engine = dict(base.engine)
        for item in args.set:
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in ENGINE_KEYS or not value.strip():
                raise ConfigError([Problem(file=None, key=f"--set {item}", message="is not KEY=VALUE of an engine "
                                           "setting", fix=hint(key, ENGINE_KEYS, "setting"))])
            engine[key] = _setting(value.strip())
        base = replace(base, engine=engine, name=args.name or base.name,
                       description=args.description or base.description)
        result = fit(measurements, base, base.sim_config())
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    print(result.table(), file=sys.stderr)
    print(f"{result.rounds} rounds, worst error {result.max_error:.1%}", file=sys.stderr)
    text = result.profile.to_yaml()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def _setting(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


if __name__ == "__main__":
    sys.exit(main())
