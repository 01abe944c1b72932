"""Performance profiles: how long one scheduler iteration takes on a given GPU layout.

A profile is the simulator's whole notion of hardware. The scheduler decides *what* runs in a
step (how many sequences decode, how many prompt tokens are prefilled, how much KV cache is
read); the profile turns that into seconds. The functional form is chosen to be physically
readable and fittable:

    step_time = step_overhead_s                          (launch, scheduling, sampling)
              + decode_s(decode_seqs)                    (weight read + per-sequence work)
              + kv_read_s_per_token * context_tokens     (attention reading the KV cache)
              + prefill_s_per_token * prefill_tokens     (prompt compute)
              + mixed_step_s(decode_seqs)                (only when a step mixes prefill and decodes)

`decode_s` and `mixed_step_s` are piecewise-linear tables over the batch size, so a fit can put a
knot at every concurrency a user measured; the linear terms come from bandwidth and FLOP
arithmetic. `mixed_step_s` is what a new prompt costs the running batch beyond its own compute
(a step that admits a request rebuilds the batch's inputs and sampling state and runs without
the decode-only CUDA graphs); it is a per-step penalty rather than a factor on prefill tokens so
that a step prefilling many prompts at once stays bounded by its FLOPs.

Profiles live in gpufleet/sim/profiles/<name>.yml; each file's header comment says what it
models and where its numbers come from.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

from gpufleet.errors import ConfigError, Problem
from gpufleet.paths import display_path
from gpufleet.sim.types import SimConfig
from gpufleet.suggest import hint
from gpufleet.yamlfile import LineDict, load_yaml

PROFILE_SUFFIX = ".yml"


@dataclass(frozen=True)
class Table:
    """A piecewise-linear function of the batch size, given at knots.

    Below the first knot the first value holds; between knots values are interpolated; past the
    last knot the last segment's slope continues when `extend` is "linear" (a cost that grows with
    the batch keeps growing, never below zero) and the last value holds when it is "flat" (or
    when there is only one knot).
    """

    points: tuple[tuple[float, float], ...]
    extend: str = "linear"

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a table needs at least one point")
        if self.extend not in ("linear", "flat"):
            raise ValueError(f"extend must be 'linear' or 'flat', not {self.extend!r}")
        xs = [x for x, _ in self.points]
        if any(b <= a for a, b in pairwise(xs)):
            raise ValueError(f"table knots must be strictly increasing, got {xs}")
        object.__setattr__(self, "_xs", tuple(xs))

    @classmethod
    def of(cls, mapping: dict[float, float], extend: str = "linear") -> Table:
        return cls(tuple(sorted((float(k), float(v)) for k, v in mapping.items())), extend)

    def at(self, x: float) -> float:
        pts = self.points
        if x <= pts[0][0] or len(pts) == 1:
            return pts[0][1]
        i = bisect_right(self._xs, x)  # type: ignore[attr-defined]
        if i >= len(pts):
            return self._extend(x)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    def _extend(self, x: float) -> float:
        if self.extend == "flat":
            return self.points[-1][1]
        (x0, y0), (x1, y1) = self.points[-2], self.points[-1]
        return max(0.0, y1 + (y1 - y0) * (x - x1) / (x1 - x0))

    def knots(self) -> list[float]:
        return [x for x, _ in self.points]

    def as_dict(self) -> dict[float, float]:
        return dict(self.points)


@dataclass(frozen=True)
class Profile:
    """Named timing parameters of one engine layout (all times in seconds)."""

    name: str
    description: str
    step_overhead_s: float
    decode_s: Table
    kv_read_s_per_token: float
    prefill_s_per_token: float
    mixed_step_s: Table
    request_overhead_s: float
    frontend_token_s: float
    eos_probability: float
    startup_s: float
    engine: dict[str, Any] = field(default_factory=dict)  # the layout it was measured on (SimConfig fields)
    header: str = ""  # the YAML header comment: what it models, where the numbers come from
    source: str | None = None  # the file it was loaded from

    def step_time(self, decode_seqs: int, prefill_tokens: int, context_tokens: int) -> float:
        """Seconds for one scheduler iteration; zero for an empty step.

        `decode_seqs` sequences each compute one token, `prefill_tokens` prompt tokens are
        computed alongside them, and `context_tokens` is the KV cache the step's attention reads
        (every scheduled sequence's context including the new tokens).
        """
        if decode_seqs <= 0 and prefill_tokens <= 0:
            return 0.0
        seconds = self.step_overhead_s + self.kv_read_s_per_token * context_tokens
        if decode_seqs > 0:
            seconds += self.decode_s.at(decode_seqs)
        if prefill_tokens > 0:
            seconds += self.prefill_s_per_token * prefill_tokens
            if decode_seqs > 0:
                seconds += self.mixed_step_s.at(decode_seqs)
        return seconds

    def sim_config(self, **overrides: Any) -> SimConfig:
        """A SimConfig for the layout this profile models, with `overrides` applied."""
        values: dict[str, Any] = {"seed": 0, **self.engine, **overrides}
        values.setdefault("served_model_name", values.get("model"))
        missing = [f.name for f in fields(SimConfig) if f.name not in values]
        if missing:
            raise ConfigError(
                [
                    Problem(
                        file=self.source,
                        key="engine",
                        message=f"profile {self.name!r} does not say {', '.join(missing)} of the layout it models",
                        fix=f"add {', '.join(missing)} under 'engine:' or pass them to the simulator",
                    )
                ]
            )
        return SimConfig(**{f.name: values[f.name] for f in fields(SimConfig)})

    def with_changes(self, **changes: Any) -> Profile:
        return replace(self, **changes)

    def to_yaml(self) -> str:
        """The profile as a YAML file, header comment first; `load_profile` reads it back."""
        lines = [f"# {line}".rstrip() for line in self.header.strip("\n").splitlines()] if self.header else []
        lines.append(f"name: {self.name}")
        lines.append(f"description: {_quote(self.description)}")
        if self.engine:
            lines.append("engine:  # the layout these timings are for")
            for key in ENGINE_KEYS:
                if key in self.engine:
                    value = self.engine[key]
                    lines.append(f"  {key}: {_quote(value) if isinstance(value, str) else _num(value)}")
        for key, comment in TIMING_KEYS.items():
            value = getattr(self, key)
            if isinstance(value, Table):
                lines.append(f"{key}:  # {comment}")
                lines.extend(f"  {_num(x)}: {_num(y)}" for x, y in value.points)
            else:
                lines.append(f"{key}: {_num(value)}  # {comment}")
        return "\n".join(lines) + "\n"


# key -> what it means, for validation messages and the comments to_yaml writes
TIMING_KEYS: dict[str, str] = {
    "step_overhead_s": "fixed cost of every step: scheduling, kernel launches, sampling",
    "decode_s": "decode cost by number of decoding sequences (weight read + per-sequence work), seconds",
    "kv_read_s_per_token": "attention's KV cache read, per context token in the step",
    "prefill_s_per_token": "prefill cost per prompt token",
    "mixed_step_s": "extra cost of a step that prefills beside this many decoding sequences, seconds",
    "request_overhead_s": "API server time before a request reaches the scheduler (HTTP, tokenizing, IPC)",
    "frontend_token_s": "output processing per token: the k-th token of a step is out k times this after it",
    "eos_probability": "chance per output token of stopping (after min_tokens, unless ignore_eos)",
    "startup_s": "model load time before the server answers (slow start)",
}
TABLE_KEYS = ("decode_s", "mixed_step_s")
TABLE_EXTEND = {"decode_s": "linear", "mixed_step_s": "flat"}
ENGINE_KEYS = (
    "model",
    "served_model_name",
    "tensor_parallel_size",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "num_gpu_blocks",
    "gpu_memory_utilization",
)
_ENGINE_INT_KEYS = ("tensor_parallel_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                    "num_gpu_blocks")
TOP_KEYS = ("name", "description", "engine", *TIMING_KEYS)


def _num(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    text = f"{value:.6g}"
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"  # YAML 1.1 reads 2e-05 as text, 2.0e-05 as a number
    return text


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def profiles_dir() -> Path:
    return Path(str(resources.files("gpufleet.sim").joinpath("profiles")))


def list_profiles() -> list[str]:
    """The names of the packaged profiles."""
    return sorted(p.name[: -len(PROFILE_SUFFIX)] for p in profiles_dir().glob(f"*{PROFILE_SUFFIX}"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A packaged profile by name, or a profile YAML file by path; ConfigError on any problem."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith((".yml", ".yaml")):
        path = Path(name_or_path)
        shown = display_path(path)
    else:
        path = profiles_dir() / f"{text}{PROFILE_SUFFIX}"
        shown = f"gpufleet/sim/profiles/{text}{PROFILE_SUFFIX}"
        if not path.is_file():
            raise ConfigError(
                [
                    Problem(
                        file=None,
                        key="profile",
                        message=f"no simulator profile named {text!r}",
                        fix=hint(text, list_profiles(), "profile") + ", or give the path of a profile YAML file",
                    )
                ]
            )
    if not path.is_file():
        raise ConfigError(
            [Problem(file=shown, key="", message="does not exist", fix="check the path of the profile YAML file")]
        )
    data = load_yaml(path, shown)
    header = _header_comment(path.read_text(encoding="utf-8"))
    return parse_profile(data, shown, header=header)


def _header_comment(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines)


def parse_profile(data: Any, shown: str | None, header: str = "") -> Profile:
    """Validate a profile mapping, collecting every problem into one ConfigError."""
    problems: list[Problem] = []

    def problem(key: str, message: str, fix: str, container: Any = None, line_key: Any = None) -> None:
        line = None
        if isinstance(container, LineDict):
            line = container.key_lines.get(line_key if line_key is not None else key.rsplit(".", 1)[-1])
        problems.append(Problem(file=shown, line=line, key=key, message=message, fix=fix))

    if not isinstance(data, dict):
        raise ConfigError(
            [Problem(file=shown, key="", message="is not a mapping of profile keys",
                     fix=f"write the profile as 'key: value' lines: {', '.join(TOP_KEYS)}")]
        )
    for key in data:
        if key not in TOP_KEYS:
            problem(str(key), "is not a profile key", hint(str(key), TOP_KEYS), data, key)
    values: dict[str, Any] = {}
    for key in ("name", "description"):
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            problem(key, f"must be a non-empty text, not {value!r}", f"write the profile's {key}", data)
        values[key] = value if isinstance(value, str) else ""
    for key in TIMING_KEYS:
        if key not in data:
            problem(key, "is missing", f"add '{key}:' ({TIMING_KEYS[key]})", None)
            continue
        raw = data[key]
        if key in TABLE_KEYS:
            values[key] = _parse_table(key, raw, data, problem)
            continue
        number = _number(raw)
        upper = 1.0 if key == "eos_probability" else math.inf
        if number is None or number < 0 or number >= upper:
            bound = "a number from 0 up to (not including) 1" if key == "eos_probability" else "a number >= 0"
            problem(key, f"must be {bound}, not {raw!r}", f"set {key} to {bound} ({TIMING_KEYS[key]})", data)
            continue
        values[key] = number
    engine = _parse_engine(data.get("engine"), data, problem)
    if problems:
        raise ConfigError(problems)
    return Profile(engine=engine, header=header, source=shown, **values)


def _number(raw: Any) -> float | None:
    if isinstance(raw, str):
        # YAML 1.1 reads 1e-8 (no dot) as text; take it as the number it was meant to be
        try:
            raw = float(raw)
        except ValueError:
            return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    return float(raw) if math.isfinite(raw) else None


def _parse_table(key: str, raw: Any, data: dict[str, Any], problem: Any) -> Table | None:
    decode = key == "decode_s"
    lowest = 1 if decode else 0
    what = "sequences" if decode else "decoding sequences"
    example = "{1: 0.005, 8: 0.009, 32: 0.02}" if decode else "{0: 0.0, 32: 0.1}"
    if not isinstance(raw, dict) or not raw:
        problem(key, f"must be a mapping of batch size to value, not {raw!r}", f"write e.g. {key}: {example}", data)
        return None
    points: dict[float, float] = {}
    ok = True
    for knot, value in raw.items():
        if isinstance(knot, bool) or not isinstance(knot, int) or knot < lowest:
            problem(f"{key}.{knot}", f"the batch size must be a whole number of {what} >= {lowest}",
                    f"write the knots as whole numbers, e.g. {key}: {example}", raw, knot)
            ok = False
            continue
        number = _number(value)
        if number is None or number < 0 or (decode and number == 0):
            bound = "> 0" if decode else ">= 0"
            problem(f"{key}.{knot}", f"must be a number {bound} (seconds), not {value!r}",
                    f"write the value at {knot} {what}, e.g. {key}: {example}", raw, knot)
            ok = False
            continue
        points[float(knot)] = number
    return Table.of(points, TABLE_EXTEND[key]) if ok else None


def _parse_engine(raw: Any, data: dict[str, Any], problem: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problem("engine", f"must be a mapping of engine settings, not {raw!r}",
                f"write the layout's settings under engine: ({', '.join(ENGINE_KEYS)})", data)
        return {}
    engine: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in ENGINE_KEYS:
            problem(f"engine.{key}", "is not an engine setting", hint(str(key), ENGINE_KEYS, "setting"), raw, key)
        elif key in ("model", "served_model_name"):
            if not isinstance(value, str) or not value:
                problem(f"engine.{key}", f"must be a model name, not {value!r}", "write the Hugging Face id", raw, key)
            else:
                engine[key] = value
        elif key in _ENGINE_INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problem(f"engine.{key}", f"must be a whole number >= 1, not {value!r}",
                        f"write {key} as vLLM takes it, e.g. from 'gpufleet plan'", raw, key)
            else:
                engine[key] = value
        else:  # gpu_memory_utilization
            number = _number(value)
            if number is None or not 0 < number <= 1:
                problem(f"engine.{key}", f"must be a fraction in (0, 1], not {value!r}", "write e.g. 0.9", raw, key)
            else:
                engine[key] = number
    return engine
