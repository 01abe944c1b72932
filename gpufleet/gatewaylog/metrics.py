"""Every metric the gateway exporter exposes: name, type, help and labels, in exposition order.

The names are constants here so the Prometheus rules (gpufleet/monitoring/rules.py) and dashboards
can import them instead of spelling them again; docs/gateway-exporter.md's table is checked against
`ALL_METRICS` by tests/unit/test_gatewaylog_docs.py. A counter's `name` is its exposed name, with
`_total`. This module imports nothing beyond the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

REQUESTS = "gpufleet_gateway_requests_total"
REQUEST_DURATION = "gpufleet_gateway_request_duration_seconds"
UPSTREAM_HEADER = "gpufleet_gateway_upstream_header_seconds"
UPSTREAM_RETRIES = "gpufleet_gateway_upstream_retries_total"
LOG_LINES = "gpufleet_gateway_log_lines_total"
LOG_MALFORMED_LINES = "gpufleet_gateway_log_malformed_lines_total"
LOG_ROTATIONS = "gpufleet_gateway_log_rotations_total"
LOG_UP = "gpufleet_gateway_log_up"
LOG_LAST_LINE = "gpufleet_gateway_log_last_line_timestamp_seconds"

# LLM requests last from tens of milliseconds (a 401, a short completion) to minutes (a long
# stream); the SLOs' end-to-end and first-token limits fall between 0.5 and 60 s.
REQUEST_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# Time to the engine's response headers: for a stream that is about the time to first token, so the
# buckets reach lower than the whole request's.
UPSTREAM_HEADER_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)

ROTATION_KINDS = ("rename", "truncate")


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """The family name prometheus_client wants: a counter's without `_total`."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


REQUESTS_DEF = MetricDef(
    REQUESTS, "counter", "Requests the gateway answered, by HTTP status as nginx logged it and API client "
    "(`-` for requests without a known key).", ("model_name", "status", "client"))
REQUEST_DURATION_DEF = MetricDef(
    REQUEST_DURATION, "histogram", "Time from the request's first byte to the response's last (nginx "
    "$request_time).", ("model_name",))
UPSTREAM_HEADER_DEF = MetricDef(
    UPSTREAM_HEADER, "histogram", "Time the engine that answered took to send its response headers (the last "
    "value of nginx $upstream_header_time; for a stream, about the time to first token). Only requests that "
    "reached an engine.", ("model_name",))
UPSTREAM_RETRIES_DEF = MetricDef(
    UPSTREAM_RETRIES, "counter", "Requests nginx sent to more than one engine instance (the first refused, "
    "dropped or answered 502/503).", ("model_name",))
LOG_LINES_DEF = MetricDef(LOG_LINES, "counter", "Lines read from the access log, malformed ones included.")
LOG_MALFORMED_LINES_DEF = MetricDef(
    LOG_MALFORMED_LINES, "counter", "Lines that were not a gateway access record (not counted in the request "
    "metrics), and unfinished or overlong lines that were dropped.")
LOG_ROTATIONS_DEF = MetricDef(
    LOG_ROTATIONS, "counter", "Times the access log was replaced by a new file (`rename`) or truncated in place "
    "(`truncate`, copytruncate).", ("kind",))
LOG_UP_DEF = MetricDef(LOG_UP, "gauge", "1 while the access log exists and is readable, else 0.")
LOG_LAST_LINE_DEF = MetricDef(
    LOG_LAST_LINE, "gauge", "When the exporter last read a line from the access log (Unix time); absent "
    "before the first.")

REQUEST_METRICS: tuple[MetricDef, ...] = (
    REQUESTS_DEF, REQUEST_DURATION_DEF, UPSTREAM_HEADER_DEF, UPSTREAM_RETRIES_DEF,
)
SELF_METRICS: tuple[MetricDef, ...] = (
    LOG_LINES_DEF, LOG_MALFORMED_LINES_DEF, LOG_ROTATIONS_DEF, LOG_UP_DEF, LOG_LAST_LINE_DEF,
)
ALL_METRICS: tuple[MetricDef, ...] = REQUEST_METRICS + SELF_METRICS
