"""PromQL building blocks for the dashboards, and Grafana's variables expanded for plain Prometheus.

The dashboards' expressions use Grafana's variables: `$host`, `$model_name`, `$instance`, `$gpu`
(multi-valued, matched with `=~`) and `$__rate_interval` in every rate() window. `expand()` turns
such an expression into one Prometheus itself runs (the tests hand every panel's query to promtool
and to a live Prometheus).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

RATE_INTERVAL = "$__rate_interval"

# Grafana's built-in interval variables, as plain Prometheus durations: $__rate_interval is at
# least four scrape intervals (the fleet's default scrape interval is 15 s)
BUILTIN_DEFAULTS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}

_SPECIAL = set(".^$*+?()[]{}|\\")


def quote(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def eq(label: str, value: str) -> str:
    return f"{label}={quote(value)}"


def matches(label: str, regex: str) -> str:
    return f"{label}=~{quote(regex)}"


def var(label: str, name: str | None = None) -> str:
    """A matcher on a multi-valued Grafana variable: label=~"$name"."""
    return f'{label}=~"${name or label}"'


def selector(metric: str, *matchers: str) -> str:
    return f"{metric}{{{', '.join(matchers)}}}" if matchers else metric


def rate(series: str, window: str = RATE_INTERVAL) -> str:
    return f"rate({series}[{window}])"


def increase(series: str, window: str = RATE_INTERVAL) -> str:
    return f"increase({series}[{window}])"


def or_zero(expr: str) -> str:
    """`expr`, or a single 0 when it has no series: an event that has not happened reads 0, not "No data"
    (which would look the same as a broken query or a missing exporter)."""
    return f"{expr} or on() vector(0)"


def sum_by(labels: Sequence[str], expr: str) -> str:
    return f"sum by ({', '.join(labels)}) ({expr})"


def quantile(q: float, bucket_rates: str, by: Sequence[str]) -> str:
    """The q-quantile of a histogram per `by`, from the rate of its `_bucket` series."""
    return f"histogram_quantile({q:g}, {sum_by([*by, 'le'], bucket_rates)})"


def ratio(metric: str, bad: Sequence[str], matchers: Sequence[str], by: Sequence[str]) -> str:
    """rate(metric{bad, matchers}) / rate(metric{matchers}) per `by`; 0, not absent, while nothing is bad."""
    total = sum_by(by, rate(selector(metric, *matchers)))
    return f"(\n  {sum_by(by, rate(selector(metric, *bad, *matchers)))}\n  or\n  0 * {total}\n)\n/\n{total}"


# ---- Grafana's variables -------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def regex_value(values: str | Sequence[str]) -> str:
    """A variable's value as Grafana writes it into a regex matcher: one value as is, several as an
    alternation of literals (regex characters escaped, as Grafana's regex formatting does)."""
    if isinstance(values, str):
        return values
    escaped = ("".join(f"\\\\{c}" if c in _SPECIAL else c for c in value) for value in values)
    return "(" + "|".join(escaped) + ")"


def expand(expr: str, variables: Mapping[str, str | Sequence[str]] | None = None) -> str:
    """`expr` with Grafana's variables replaced, so plain Prometheus can run it.

    `$name`, `${name}`, `${name:format}` and `[[name]]` become `variables[name]`: a string as is (a
    regex such as `gpu-01|gpu-02`), a list of values as an escaped alternation. Variables not given
    become `.*` (Grafana's "All"); `$__rate_interval`, `$__interval` and `$__range` become 1m, 15s
    and 1h unless given. ValueError for `$datasource` (it names a data source, never a value in a
    query) and for an unknown `$__` built-in.
    """
    given = dict(variables or {})

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in given:
            return regex_value(given[name])
        if name.startswith("__"):
            if name not in BUILTIN_DEFAULTS:
                raise ValueError(f"{match.group(0)}: no value for this Grafana built-in variable")
            return BUILTIN_DEFAULTS[name]
        if name == "datasource":
            raise ValueError(f"{match.group(0)} in a query: the data source variable is not a value")
        return ".*"

    return _VARIABLE.sub(value, expr)
