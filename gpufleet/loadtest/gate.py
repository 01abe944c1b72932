"""The SLO gate: a run's verdict, its reasons and its exit code.

The objectives are the inventory's `slo` section (one source of truth with the alerts and the
dashboards), taken from one named host; the verdict says which host, model and file they came from.

Exit codes (`Verdict.exit_code`):
- 0 (`EXIT_PASS`): every step met every objective;
- 1 (`EXIT_FAIL`): an objective failed (a step's latency or error rate, or the run's throughput);
- 2 (`EXIT_INVALID`): the run cannot be judged, so neither a pass nor a fail would be true. It wins
  over a fail: a saturated load generator inflates latencies, so its "fail" may be its own.

Per step, checked against `slo`: p99 TTFT, p99 ITL, p99 TPOT and p99 E2E (when set) and the error
rate. `min_output_tokens_per_s` is a capacity objective, checked once for the run: the most output
tokens/s of a stable step must reach it (a concurrency-1 step cannot, and is not unstable for it).

A step is invalid (see `GateRules`) when:
- no request in it succeeded, or most got no HTTP answer at all (refused, reset, timed out): the
  run measured the network or a dead target, not the service;
- fewer than `min_completed` requests completed, or a gated p99 rests on fewer than
  `tail_samples / (1 - 0.99)` samples (100 by default): below that, the p99 is the largest of a few
  samples, and the largest of n samples sits near the n/(n+1) quantile, under the true p99;
- its open-loop dispatch lag (send time minus intended time) has a p99 above `max_dispatch_lag_ms`:
  the generator fell behind its schedule, which hides the server's stalls (coordinated omission);
- a load generator's CPU was above `cpu_percent_limit` in at least `cpu_saturated_fraction` of its
  samples in the step's window (and at least `cpu_min_saturated_samples` of them): its timestamps
  were taken late.

The headline is the highest step value (e.g. concurrency) whose step passes with every lower step
passing too: the seed's "stable" rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from gpufleet.errors import ConfigError, Problem
from gpufleet.loadtest.record import RequestRecord
from gpufleet.loadtest.stats import Distribution, Measured, StepStats, format_number, measured, run_stats
from gpufleet.schema.sections import Slo

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_INVALID = 2

Status = Literal["pass", "fail", "invalid"]
GATED_LEVEL = 99.0  # every latency objective in `slo` is a p99


# ---------------------------------------------------------------------------------------------
# Where the objectives come from


@dataclass(frozen=True)
class SloSource:
    """The objectives the gate used and whose they are: a host, the model it serves, the file and line."""

    slo: Slo
    host: str
    model: str | None = None
    origin: str | None = None  # "inventories/example/group_vars/all.yml:7"
    inventory: str | None = None

    def describe(self) -> str:
        text = f"slo of host {self.host}"
        if self.model:
            text += f" serving {self.model}"
        if self.origin:
            text += f", set at {self.origin}"
        return text

    def goodput(self) -> dict[str, float]:
        """The per-request objectives in vLLM's --goodput form: TTFT, TPOT and E2E (ITL is per gap, not per request)."""
        spec = {"ttft": self.slo.ttft_p99_ms}
        if self.slo.tpot_p99_ms is not None:
            spec["tpot"] = self.slo.tpot_p99_ms
        if self.slo.e2e_p99_ms is not None:
            spec["e2el"] = self.slo.e2e_p99_ms
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host, "model": self.model, "origin": self.origin, "inventory": self.inventory,
            "description": self.describe(), "slo": self.slo.model_dump(),
        }


def slo_from_fleet(path: Path | str, host: str | None = None, model: str | None = None) -> SloSource:
    """The `slo` of one host of the inventory at `path`: `host` if named, else a GPU host serving `model`
    (or any GPU host). Hosts that would qualify must agree, or the caller must name one: the gate never
    picks between two different objectives silently. Raises `ConfigError` (the CLI's exit 2)."""
    from gpufleet.fleet import load_fleet  # the fleet loader pulls in the planner; only this needs it

    fleet = load_fleet(Path(path), check_secrets=False)
    hosts = [(h.name, h.config.slo, h.config.model.name if h.config.model else None, _origin(h)) for h in fleet.hosts]
    return _pick(hosts, host, model, str(path))


_Candidate = tuple[str, Slo | None, str | None, str | None]  # host, slo, model, origin of slo


def _origin(host: Any) -> str | None:
    """Where the host's slo was written: the section's file and line, plus any key set elsewhere (host_vars)."""
    section = host.source.origin_of(("slo",))
    if section is None:
        return None
    elsewhere = []
    for key in Slo.model_fields:
        origin = host.source.origin_of(("slo", key))
        if origin is not None and origin.file != section.file:
            elsewhere.append(f"{key} at {_where(origin)}")
    return _where(section) + (f" ({', '.join(elsewhere)})" if elsewhere else "")


def _where(origin: Any) -> str:
    return f"{origin.file}:{origin.line}" if origin.line else origin.file


def _pick(hosts: Sequence[_Candidate], host: str | None, model: str | None, inventory: str) -> SloSource:
    if host is not None:
        candidates = [h for h in hosts if h[0] == host]
        if not candidates:
            raise _error(f"no host {host!r} in the inventory", f"name one of {', '.join(h[0] for h in hosts)}")
        if model is not None and candidates[0][2] != model:
            raise _error(f"host {host!r} serves {candidates[0][2]!r}, not {model!r}", "name a host serving the model")
    elif model is not None:
        candidates = [h for h in hosts if h[2] == model]
        if not candidates:
            served = sorted({h[2] for h in hosts if h[2]})
            raise _error(f"no host serves {model!r}", f"name one of the served models: {', '.join(served)}")
    else:
        candidates = [h for h in hosts if h[2] is not None] or list(hosts)
    candidates = sorted((h for h in candidates if h[1] is not None), key=lambda h: h[0])
    if not candidates:
        raise _error("no host has an slo section", "set slo in group_vars/all.yml")
    if len({json.dumps(h[1].model_dump(), sort_keys=True) for h in candidates if h[1]}) > 1:
        names = ", ".join(f"{h[0]} ({h[3]})" for h in candidates)
        raise _error(f"the hosts disagree on slo: {names}", "name the host whose slo the gate should use")
    name, slo, served, origin = candidates[0]
    assert slo is not None
    return SloSource(slo=slo, host=name, model=served, origin=origin, inventory=inventory)


def _error(message: str, fix: str) -> ConfigError:
    return ConfigError([Problem(file=None, key="slo", message=message, fix=fix)])


# ---------------------------------------------------------------------------------------------
# Rules and inputs


@dataclass(frozen=True)
class GateRules:
    """When a step's measurement is too weak to judge (exit 2); see the module docstring."""

    min_completed: int = 20
    tail_samples: int = 1  # samples that must lie above a gated p99: n >= tail_samples / (1 - 0.99)
    max_dispatch_lag_ms: float = 10.0  # p99 of send minus intended send, open loop
    cpu_percent_limit: float = 90.0  # Locust's own CPU warning threshold
    cpu_saturated_fraction: float = 0.25
    cpu_min_saturated_samples: int = 2
    max_no_answer_ratio: float = 0.5  # share of requests that got no HTTP answer

    def min_tail_samples(self, level: float = GATED_LEVEL) -> int:
        """Samples needed for a percentile to have `tail_samples` above it: 100 for p99 and 1."""
        return max(0, math.ceil(round(self.tail_samples * 100 / (100 - level), 9)))


@dataclass(frozen=True)
class CpuSample:
    """One load-generator CPU reading (Locust's runner samples its process every few seconds)."""

    epoch: float
    percent: float
    worker: str = ""


# ---------------------------------------------------------------------------------------------
# The verdict


@dataclass(frozen=True)
class Check:
    """One objective against one measured value: pass or fail, and the room left (margin, %)."""

    slo: str  # the inventory key: "ttft_p99_ms"
    what: str  # "p99 TTFT"
    unit: str  # "ms", "%", "tokens/s"
    value: float | None  # None when nothing was measured
    limit: float
    bound: Literal["max", "min"]  # value must be at most / at least the limit
    step: str = ""
    scale: float = 1.0  # display factor (error rates are fractions, shown in %)

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value <= self.limit if self.bound == "max" else self.value >= self.limit

    @property
    def margin_pct(self) -> float | None:
        """Room left as a share of the limit: positive passes, negative fails; None for a 0 limit or no value."""
        if self.value is None or self.limit == 0:
            return None
        room = self.limit - self.value if self.bound == "max" else self.value - self.limit
        return room / self.limit * 100

    def describe(self) -> str:
        """"p99 TTFT 612.3 ms > 500 ms (margin -22.5%)"."""
        limit = _with_unit(self.limit * self.scale, self.unit)
        if self.value is None:
            return f"{self.what}: nothing measured (limit {limit})"
        relation = ("≤" if self.passed else ">") if self.bound == "max" else ("≥" if self.passed else "<")
        margin = "" if self.margin_pct is None else f" (margin {self.margin_pct:+.1f}%)"
        return f"{self.what} {_with_unit(self.value * self.scale, self.unit)} {relation} {limit}{margin}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "slo": self.slo, "what": self.what, "step": self.step, "value": self.value, "limit": self.limit,
            "bound": self.bound, "unit": self.unit, "passed": self.passed, "margin_pct": self.margin_pct,
            "text": self.describe(),
        }


def _fmt(value: float) -> str:
    return f"{value:,.1f}" if abs(value) >= 10 or value == 0 else f"{value:.3g}"


def _with_unit(value: float, unit: str) -> str:
    return f"{_fmt(value)}{unit}" if unit == "%" else f"{_fmt(value)} {unit}".strip()


@dataclass(frozen=True)
class StepVerdict:
    stats: StepStats
    checks: tuple[Check, ...]
    invalid: tuple[str, ...] = ()  # why the step's measurement cannot be judged

    @property
    def status(self) -> Status:
        if self.invalid:
            return "invalid"
        return "pass" if all(c.passed for c in self.checks) else "fail"

    @property
    def stable(self) -> bool:
        """The seed's "stable": every per-step objective held, on a valid measurement."""
        return self.status == "pass"

    @property
    def reasons(self) -> list[str]:
        if self.invalid:
            return list(self.invalid)
        return [c.describe() for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.stats.step, "label": self.stats.label, "status": self.status, "stable": self.stable,
            "invalid": list(self.invalid), "reasons": self.reasons, "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True)
class Headline:
    """The highest step value meeting every objective with every lower step meeting them too."""

    key: str | None  # "concurrency"; None outside a stepped run
    value: float | None  # None when no step qualifies
    step: str | None = None
    output_throughput: float | None = None
    request_goodput: float | None = None
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    source: SloSource
    rules: GateRules
    steps: tuple[StepVerdict, ...]
    run_checks: tuple[Check, ...]  # objectives of the run as a whole (throughput)
    headline: Headline
    run_invalid: tuple[str, ...] = ()  # the run as a whole cannot be judged (no records)
    cpu_samples: int = 0  # how many load-generator CPU readings the gate had
    notes: tuple[str, ...] = field(default=())

    @property
    def status(self) -> Status:
        if self.run_invalid or any(s.status == "invalid" for s in self.steps):
            return "invalid"
        if any(s.status == "fail" for s in self.steps) or not all(c.passed for c in self.run_checks):
            return "fail"
        return "pass"

    @property
    def exit_code(self) -> int:
        return {"pass": EXIT_PASS, "fail": EXIT_FAIL, "invalid": EXIT_INVALID}[self.status]

    @property
    def reasons(self) -> list[str]:
        """Why the verdict is what it is, one line each; invalidity first, as it decides the exit code."""
        lines = list(self.run_invalid)
        lines += [f"{_step_name(s)}: invalid: {r}" for s in self.steps for r in s.invalid]
        if self.status == "invalid":
            return lines
        lines += [f"{_step_name(s)}: {c.describe()}" for s in self.steps for c in s.checks if not c.passed]
        lines += [f"run: {c.describe()}" for c in self.run_checks if not c.passed]
        return lines

    def overall_checks(self) -> list[Check]:
        """Per objective, the step that came closest to (or furthest past) its limit: the run's worst case."""
        worst: dict[str, Check] = {}
        for check in (c for s in self.steps for c in s.checks):
            kept = worst.get(check.slo)
            if kept is None or _badness(check) > _badness(kept):
                worst[check.slo] = check
        return [*worst.values(), *self.run_checks]

    def summary(self) -> str:
        """The verdict as a person reads it on a terminal."""
        lines = [f"SLO gate: {self.status.upper()} (exit {self.exit_code}): {self.source.describe()}"]
        lines.append(self.headline.text)
        lines += [f"  {line}" for line in self.reasons]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status, "exit_code": self.exit_code, "slo_source": self.source.to_dict(),
            "rules": asdict(self.rules), "headline": self.headline.to_dict(), "reasons": self.reasons,
            "run_invalid": list(self.run_invalid), "steps": [s.to_dict() for s in self.steps],
            "run_checks": [c.to_dict() for c in self.run_checks],
            "overall_checks": [c.to_dict() for c in self.overall_checks()],
            "cpu_samples": self.cpu_samples, "notes": list(self.notes),
        }


def _badness(check: Check) -> tuple[int, float]:
    margin = check.margin_pct
    return (0 if check.passed else 1, -margin if margin is not None else math.inf)


def _step_name(step: StepVerdict) -> str:
    return step.stats.step or "run"


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    records: Iterable[RequestRecord],
    source: SloSource,
    *,
    client_cpu: Iterable[CpuSample] = (),
    rules: GateRules | None = None,
) -> Verdict:
    """Judge a run's records against `source.slo`: the verdict per step, for the run, and its exit code.

    `client_cpu` are the load generators' CPU readings over the run; `rules` default to `GateRules()`.
    """
    rules = rules or GateRules()
    kept = measured(records)
    stats = run_stats(kept.records, goodput=source.goodput())
    cpu = sorted(client_cpu, key=lambda s: (s.worker, s.epoch))
    steps = tuple(_judge_step(s, source.slo, rules, cpu) for s in stats)
    headline = _headline(steps)
    run_invalid = () if stats else ("no measured requests were recorded",)
    notes = _notes(kept, cpu)
    return Verdict(
        source=source, rules=rules, steps=steps, run_checks=(_throughput_check(steps, source.slo),),
        headline=headline, run_invalid=run_invalid, cpu_samples=len(cpu), notes=notes,
    )


def _notes(kept: Measured, cpu: Sequence[CpuSample]) -> tuple[str, ...]:
    notes = []
    if kept.warmup:
        notes.append(f"{kept.warmup} warm-up requests were left out")
    if kept.outside:
        notes.append(f"{kept.outside} requests sent outside every step were left out")
    if not cpu:
        notes.append("no load-generator CPU samples were given: CPU saturation was not checked")
    return tuple(notes)


def step_checks(stats: StepStats, slo: Slo) -> tuple[Check, ...]:
    """The per-step objectives of `slo` against one step: p99 latencies and the error rate."""
    checks = [
        Check("ttft_p99_ms", "p99 TTFT", "ms", stats.ttft.p(GATED_LEVEL), slo.ttft_p99_ms, "max", stats.step),
        Check("itl_p99_ms", "p99 ITL", "ms", stats.itl.p(GATED_LEVEL), slo.itl_p99_ms, "max", stats.step),
    ]
    if slo.tpot_p99_ms is not None:
        checks.append(Check("tpot_p99_ms", "p99 TPOT", "ms", stats.tpot.p(GATED_LEVEL), slo.tpot_p99_ms, "max",
                            stats.step))
    if slo.e2e_p99_ms is not None:
        checks.append(Check("e2e_p99_ms", "p99 E2E", "ms", stats.e2el.p(GATED_LEVEL), slo.e2e_p99_ms, "max",
                            stats.step))
    checks.append(Check("max_error_rate", "error rate", "%", stats.error_rate if stats.sent else None,
                        slo.max_error_rate, "max", stats.step, scale=100))
    return tuple(checks)


def _judge_step(stats: StepStats, slo: Slo, rules: GateRules, cpu: Sequence[CpuSample]) -> StepVerdict:
    invalid = [
        *_target_problems(stats, rules),
        *_sample_problems(stats, slo, rules),
        *_lag_problems(stats, rules),
        *_cpu_problems(stats, rules, cpu),
    ]
    return StepVerdict(stats=stats, checks=step_checks(stats, slo), invalid=tuple(invalid))


def _top_errors(stats: StepStats, count: int = 3) -> str:
    ranked = sorted(stats.errors.items(), key=lambda kv: (-kv[1], kv[0]))[:count]
    return "; ".join(f"{reason} ({n})" for reason, n in ranked)


def _target_problems(stats: StepStats, rules: GateRules) -> list[str]:
    """The target did not answer: what was measured is the network or a dead service."""
    if stats.sent and stats.no_answer / stats.sent >= rules.max_no_answer_ratio:
        return [f"{stats.no_answer} of {stats.sent} requests got no answer from the target (refused, reset or "
                f"timed out): {_top_errors(stats)}"]
    if stats.sent and stats.completed == 0:
        return [f"none of {stats.sent} requests succeeded: {_top_errors(stats)}"]
    return []


def _sample_problems(stats: StepStats, slo: Slo, rules: GateRules) -> list[str]:
    """Too few samples for the gated p99s to mean what they say."""
    if stats.completed == 0:
        return []  # said by _target_problems
    if stats.completed < rules.min_completed:
        return [f"only {stats.completed} requests completed; a step needs at least {rules.min_completed}"]
    need = rules.min_tail_samples()
    gated = [("TTFT", stats.ttft), ("ITL", stats.itl)]
    gated += [("TPOT", stats.tpot)] if slo.tpot_p99_ms is not None else []
    gated += [("E2E", stats.e2el)] if slo.e2e_p99_ms is not None else []
    return [
        f"p99 {name} rests on {dist.n} samples; a p99 needs at least {need} "
        f"({rules.tail_samples} above it), or it is the largest of a few samples and under the true p99"
        for name, dist in gated if dist.n < need
    ]


def _lag_problems(stats: StepStats, rules: GateRules) -> list[str]:
    lag: Distribution | None = stats.dispatch_lag
    p99 = lag.p(GATED_LEVEL) if lag is not None else None
    if p99 is None or p99 <= rules.max_dispatch_lag_ms:
        return []
    return [f"p99 dispatch lag {p99:,.1f} ms > {format_number(rules.max_dispatch_lag_ms)} ms: the load generator "
            "fell behind its schedule, which hides the server's stalls (coordinated omission)"]


def _cpu_problems(stats: StepStats, rules: GateRules, cpu: Sequence[CpuSample]) -> list[str]:
    if stats.window_start is None or stats.window_end is None:
        return []
    by_worker: dict[str, list[CpuSample]] = {}
    for sample in cpu:
        if stats.window_start <= sample.epoch <= stats.window_end:
            by_worker.setdefault(sample.worker, []).append(sample)
    problems = []
    for worker, samples in by_worker.items():
        hot = sum(1 for s in samples if s.percent > rules.cpu_percent_limit)
        if hot >= rules.cpu_min_saturated_samples and hot / len(samples) >= rules.cpu_saturated_fraction:
            who = f"load generator {worker}" if worker else "the load generator"
            problems.append(f"{who} ran above {format_number(rules.cpu_percent_limit)}% CPU in {hot} of "
                            f"{len(samples)} samples: its timestamps were taken late")
    return problems


def _throughput_check(steps: Sequence[StepVerdict], slo: Slo) -> Check:
    """min_output_tokens_per_s against the best stable step: the throughput the service sustains within its SLOs."""
    stable = [s.stats.output_throughput for s in steps if s.stable]
    return Check("min_output_tokens_per_s", "output tokens/s of the best stable step", "tokens/s",
                 max(stable) if stable else None, slo.min_output_tokens_per_s, "min", "")


def _headline(steps: Sequence[StepVerdict]) -> Headline:
    keys = {s.stats.key for s in steps}
    if not steps or len(keys) != 1 or any(s.stats.value is None for s in steps):
        state = "every step" if steps and all(s.stable for s in steps) else "not every step"
        return Headline(key=None, value=None, text=f"not a stepped run: {state} met its objectives")
    key = keys.pop()
    best: StepVerdict | None = None
    for step in steps:  # ascending value (run_stats)
        if not step.stable:
            break
        best = step
    if best is None:
        first = steps[0]
        return Headline(key=key, value=None, text=f"no {key} met every SLO: the lowest, {first.stats.label}, was "
                        f"{first.status} ({'; '.join(first.reasons)})")
    stats = best.stats
    goodput = f", goodput {stats.request_goodput:,.2f} req/s" if stats.request_goodput is not None else ""
    return Headline(
        key=key, value=stats.value, step=stats.step, output_throughput=stats.output_throughput,
        request_goodput=stats.request_goodput,
        text=f"highest {key} meeting every SLO: {stats.label} "
             f"({stats.output_throughput:,.1f} output tokens/s{goodput})",
    )
