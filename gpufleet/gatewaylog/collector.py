"""The prometheus_client collector: the metric families of one `GatewayStats` snapshot, per scrape.

A custom collector rather than prometheus_client's Counter and Histogram objects: those add a
`_created` series to every counter and histogram, and the snapshot keeps a scrape consistent
(every request is in the counter and the duration histogram, or in neither). The registry holds
this collector only, without the process and platform collectors: the host's node_exporter covers
the machine, and the exporter's own health is the `gpufleet_gateway_log_*` series.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gpufleet.gatewaylog import metrics as m
from gpufleet.gatewaylog.stats import GatewayStats, Histogram


class GatewayCollector(Collector):
    """Renders `stats` with `model_name` (the gateway's served model) on the request series."""

    def __init__(self, stats: GatewayStats, model_name: str) -> None:
        self.stats = stats
        self.model_name = model_name

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not trigger a collection

    def collect(self) -> Iterator[Metric]:
        snap = self.stats.snapshot()
        model = self.model_name

        requests = CounterMetricFamily(m.REQUESTS_DEF.family, m.REQUESTS_DEF.help, labels=m.REQUESTS_DEF.labels)
        for (status, client), count in sorted(snap.requests.items()):
            requests.add_metric([model, status, client], count)
        yield requests
        yield _histogram(m.REQUEST_DURATION_DEF, model, snap.request_duration)
        yield _histogram(m.UPSTREAM_HEADER_DEF, model, snap.upstream_header)
        retries = CounterMetricFamily(m.UPSTREAM_RETRIES_DEF.family, m.UPSTREAM_RETRIES_DEF.help,
                                      labels=m.UPSTREAM_RETRIES_DEF.labels)
        retries.add_metric([model], snap.retries)
        yield retries

        yield CounterMetricFamily(m.LOG_LINES_DEF.family, m.LOG_LINES_DEF.help, value=snap.lines)
        yield CounterMetricFamily(m.LOG_MALFORMED_LINES_DEF.family, m.LOG_MALFORMED_LINES_DEF.help,
                                  value=snap.malformed)
        rotations = CounterMetricFamily(m.LOG_ROTATIONS_DEF.family, m.LOG_ROTATIONS_DEF.help,
                                        labels=m.LOG_ROTATIONS_DEF.labels)
        for kind in m.ROTATION_KINDS:
            rotations.add_metric([kind], snap.rotations.get(kind, 0))
        yield rotations
        yield GaugeMetricFamily(m.LOG_UP_DEF.name, m.LOG_UP_DEF.help, value=1 if snap.up else 0)
        if snap.last_line_at is not None:
            yield GaugeMetricFamily(m.LOG_LAST_LINE_DEF.name, m.LOG_LAST_LINE_DEF.help, value=snap.last_line_at)


def _histogram(definition: m.MetricDef, model: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(definition.name, definition.help, labels=definition.labels)
    buckets = [(floatToGoString(le), float(count)) for le, count in histogram.cumulative()]
    family.add_metric([model], buckets, sum_value=histogram.total)
    return family


def build_registry(collector: GatewayCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
