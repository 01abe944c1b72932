"""GPU memory and utilization per load-test step, read from Prometheus (the report's seed columns).

The load generator cannot see the GPUs; the fleet's GPU exporter can, and Prometheus keeps its
samples. For each step the report asks for the exporter's series averaged over the step's window
(first send to last completion): `avg(avg_over_time(METRIC{selector}[Ds]))` evaluated at the
window's end, i.e. the time average of each GPU, then the mean over the GPUs, the seed's "per GPU"
figure. Metric names come from `gpufleet.exporter.metrics`, so a renamed metric cannot drift.

Standard library only (urllib): the report must not need a Prometheus client package.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from gpufleet.exporter.metrics import MEMORY_USED, UTILIZATION

MEMORY_METRIC = MEMORY_USED.name  # gpufleet_gpu_memory_used_bytes
UTILIZATION_METRIC = UTILIZATION.name  # gpufleet_gpu_utilization_ratio, 0-1


class PrometheusError(Exception):
    """Prometheus could not be asked or did not answer a query; the message says which and why."""


@dataclass(frozen=True)
class GpuUsage:
    """One step's GPU figures: mean memory in use per GPU (bytes) and mean utilization (0-1); None = no data."""

    memory_used_bytes: float | None
    utilization_ratio: float | None


def window_query(metric: str, start: float, end: float, selector: str = "") -> str:
    """The PromQL for a metric's mean per GPU over [start, end], evaluated at `end` (whole seconds, at least 1)."""
    seconds = max(1, math.ceil(end - start))
    labels = selector.strip()
    if labels and not labels.startswith("{"):
        labels = "{" + labels + "}"
    return f"avg(avg_over_time({metric}{labels}[{seconds}s]))"


def query_scalar(url: str, promql: str, at: float, timeout: float = 5.0) -> float | None:
    """An instant query's single value at time `at`; None when it matches no series."""
    params = urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
    endpoint = f"{url.rstrip('/')}/api/v1/query?{params}"
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout) as response:
            body = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise PrometheusError(f"{url}: {promql}: HTTP {exc.code}: {_error_text(exc)}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrometheusError(f"{url}: {promql}: {reason}") from exc
    if body.get("status") != "success":
        raise PrometheusError(f"{url}: {promql}: {body.get('errorType', 'error')}: {body.get('error', body)}")
    return _single_value(body.get("data", {}), promql)


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read().decode("utf-8"))
        return str(body.get("error", body))
    except (ValueError, OSError):
        return str(exc.reason)


def _single_value(data: Mapping, promql: str) -> float | None:
    result = data.get("result", [])
    if data.get("resultType") == "scalar":
        return _number(result[1])
    if not result:
        return None
    if len(result) != 1:
        raise PrometheusError(f"{promql}: expected one series, got {len(result)}")
    return _number(result[0]["value"][1])


def _number(text: str) -> float | None:
    value = float(text)
    return None if math.isnan(value) or math.isinf(value) else value


def gpu_usage(
    url: str,
    windows: Mapping[str, tuple[float, float]],
    selector: str = "",
    timeout: float = 5.0,
) -> dict[str, GpuUsage]:
    """GPU memory and utilization for each step's (start, end) window; `selector` narrows the GPUs
    (e.g. `instance=~"gpu-01:.*"`). Raises `PrometheusError` on the first failed query."""
    usage = {}
    for step, (start, end) in windows.items():
        usage[step] = GpuUsage(
            memory_used_bytes=query_scalar(url, window_query(MEMORY_METRIC, start, end, selector), end, timeout),
            utilization_ratio=query_scalar(url, window_query(UTILIZATION_METRIC, start, end, selector), end, timeout),
        )
    return usage
