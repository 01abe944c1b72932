"""The fleet's Grafana dashboards, generated from its inventory.

Four dashboards, each a plain dict in Grafana's JSON model (schemaVersion 39), tagged `gpufleet`,
reading the `datasource` variable:

- `gpufleet-slo`: per served model, the recorded TTFT, inter-token and end-to-end percentiles,
  output tokens/s, the gateways' 5xx and 429 ratios, goodput and error-budget burn, with the
  model's `slo` as thresholds; the firing alerts.
- `gpufleet-gpus`: per host and GPU, from the GPU exporter: health, utilisation, memory (the
  GpuMemoryHigh limit), temperature, power, clocks and throttling, XID, ECC, PCIe replays,
  per-process memory.
- `gpufleet-gateway`: requests by status, 429s by client, the error ratios, request and upstream
  header time from the gateway's access-log exporter; nginx's connections and up.
- `gpufleet-engine`: per engine instance, from its /metrics: up, running and waiting requests, KV
  cache, TTFT, inter-token and end-to-end percentiles from the raw histograms, tokens/s.

Thresholds are the ones the alerts use: `slo` per model (slo.py), `monitoring.alerts`
(thresholds.py) and the GpuMemoryHigh limit per host. Metric names are the ones rules.py reads,
the GPU exporter's definitions and the gateway exporter's; every recorded series a panel reads is
checked against the rendered rules. `panel_queries()` lists a dashboard's queries and `expand()`
(dashboards_promql) makes them runnable on plain Prometheus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpufleet.exporter import metrics as gpu
from gpufleet.fleet import Fleet
from gpufleet.gatewaylog import metrics as gwlog
from gpufleet.monitoring.dashboards_panels import (
    Panel,
    Query,
    Thresholds,
    Variable,
    above,
    all_panels,
    below,
    dashboard,
    row,
    stat,
    table,
    timeseries,
    up_stat,
)
from gpufleet.monitoring.dashboards_promql import (
    eq,
    expand,
    increase,
    matches,
    or_zero,
    quantile,
    rate,
    ratio,
    selector,
    sum_by,
    var,
)
from gpufleet.monitoring.jobs import JOB_ENGINE, JOB_GATEWAY, JOB_GPU_EXPORTER, JOB_NGINX
from gpufleet.monitoring.rules import (
    E2E,
    GENERATION_TOKENS,
    ITL,
    ITL_OLD,
    KV_CACHE,
    KV_CACHE_OLD,
    NGINX_UP,
    QUANTILES,
    REQUEST_SUCCESS,
    TTFT,
    WAITING,
    bare,
    rule_groups,
    slis,
)
from gpufleet.monitoring.slo import BURN_WINDOWS, ModelSlo, model_slos
from gpufleet.monitoring.thresholds import ACTIONABLE_XIDS, THROTTLE_REASONS, fleet_thresholds, gpu_memory_limit
from gpufleet.schema.sections import AlertThresholds

__all__ = ["DASHBOARD_UIDS", "dashboards", "expand", "gpu_memory_limits", "panel_queries"]

# Engine metrics the rules do not read (vLLM's names; the simulator exposes them too)
RUNNING = "vllm:num_requests_running"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
PREEMPTIONS = "vllm:num_preemptions_total"

NGINX_CONNECTIONS = "nginx_connections_active"
NGINX_REQUESTS = "nginx_http_requests_total"

FIRING = selector("ALERTS", eq("alertstate", "firing"))

UID_SLO = "gpufleet-slo"
UID_GPUS = "gpufleet-gpus"
UID_GATEWAY = "gpufleet-gateway"
UID_ENGINE = "gpufleet-engine"
DASHBOARD_UIDS = (UID_SLO, UID_GPUS, UID_GATEWAY, UID_ENGINE)

SECONDS = "s"
RATIO = "percentunit"
TOKENS_PER_S = "suffix:tok/s"

# the SLIs' names in legends, by the burn-rate alert that watches them (rules.slis)
SLI_LEGENDS = {"SloAvailabilityBurnRate": "availability", "SloTtftBurnRate": "time to first token",
               "SloItlBurnRate": "inter-token latency"}


@dataclass
class Context:
    fleet: Fleet
    thresholds: AlertThresholds
    source: str
    slos: list[ModelSlo] = field(init=False)
    records: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.slos = model_slos(self.fleet)
        groups = rule_groups(self.fleet, self.thresholds)
        self.records = {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}

    def recorded(self, name: str) -> str:
        """A recording rule's name, checked against the rules rendered for this fleet."""
        if name not in self.records:
            raise ValueError(f"{name}: no recording rule of that name in gpufleet/monitoring/rules.py")
        return name

    def footer(self) -> str:
        return (f" Generated from {self.source} by gpufleet/monitoring/dashboards.py and provisioned read-only: "
                "change the inventory or the code and render again (monitoring/README.md, Grafana).")


def dashboards(
    fleet: Fleet, thresholds: AlertThresholds | None = None, source: str = "the inventory"
) -> list[dict[str, Any]]:
    """The four dashboards for `fleet`; `thresholds` default to the inventory's `monitoring.alerts`."""
    ctx = Context(fleet, thresholds or fleet_thresholds(fleet), source)
    return [slo_overview(ctx), gpus(ctx), gateway(ctx), engines(ctx)]


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of every panel of `board`, in order."""
    return [(panel["title"], target["expr"]) for panel in all_panels(board) for target in panel["targets"]]


def _ms(value: float) -> str:
    return f"{value:g} ms"


def _percent(ratio_: float) -> str:
    return f"{ratio_ * 100:.3g}%"


def _by_value(values: dict[str, float], fmt: Any = str) -> str:
    """'gpu-01, gpu-02: 97%; gpu-03: 90%' from {name: value}."""
    grouped: dict[float, list[str]] = {}
    for name, value in values.items():
        grouped.setdefault(value, []).append(name)
    return "; ".join(f"{', '.join(names)}: {fmt(value)}" for value, names in grouped.items()) or "none"


# ---- Fleet SLO overview -------------------------------------------------------------------------


def slo_overview(ctx: Context) -> dict[str, Any]:
    panels: list[Panel] = [
        row("Fleet"),
        stat("Firing alerts", "Alerts firing now, of every severity (Prometheus' ALERTS series).", "none",
             [Query(f"count({FIRING}) or vector(0)", "firing")], above(1), width=6, height=6),
        stat("Paging alerts", "Alerts firing now with severity page: someone acts now.", "none",
             [Query(f"count({selector('ALERTS', eq('alertstate', 'firing'), eq('severity', 'page'))}) "
                    "or vector(0)", "paging")], above(1), width=6, height=6),
        table("Firing alerts by name", "Each firing alert with its severity, host and model; the runbooks "
              "(runbooks/<alert>.md) say what to do.", "none",
              [Query(or_zero(f"count by (alertname, severity, host, model_name) ({FIRING})"), "{{alertname}}")],
              height=6),
    ]
    for model in ctx.slos:
        panels += model_panels(ctx, model)
    return dashboard(
        UID_SLO, "gpufleet / Fleet SLO overview",
        "Per served model: latency percentiles, throughput, the gateways' error ratios, goodput and error-budget "
        "burn against the inventory's slo; the firing alerts." + ctx.footer(),
        [], panels,
    )


def model_panels(ctx: Context, model: ModelSlo) -> list[Panel]:
    """One row per served model, its thresholds from its `slo`."""
    name = model.model_name
    slo = model.slo
    this = eq("model_name", name)

    def rec(record: str) -> str:
        return selector(ctx.recorded(record), this)

    def percentile(metric: str, q: float) -> str:
        return rec(f"model_name:{bare(metric)}:p{q * 100:g}_rate5m")

    bucket_note = {"ttft": model.ttft.note(), "itl": model.itl.note()}
    e2e = above(slo.e2e_p99_ms / 1000) if slo.e2e_p99_ms else Thresholds()
    e2e_text = f"slo.e2e_p99_ms, {_ms(slo.e2e_p99_ms)}" if slo.e2e_p99_ms else "none: slo.e2e_p99_ms is not set"
    burn_1h = Thresholds("green", ((1.0, "orange"), *((p.factor, "red") for p in BURN_WINDOWS if p.long == "1h")))
    model_slis = slis(model)

    def burn(window: str) -> list[Query]:
        return [Query(f"{rec(sli.record.format(window=window))} / (1 - {sli.objective:g})",
                      SLI_LEGENDS.get(sli.alert, sli.alert)) for sli in model_slis]

    page_factor = next((p.factor for p in BURN_WINDOWS if p.long == "1h"), None)
    return [
        row(f"{name}: TTFT p99 ≤ {_ms(slo.ttft_p99_ms)}, ITL p99 ≤ {_ms(slo.itl_p99_ms)}, errors ≤ "
            f"{_percent(slo.max_error_rate)}, ≥ {slo.min_output_tokens_per_s:g} tok/s"),
        timeseries("Time to first token", f"p50 and p99 of {name}'s time to first token over 5 minutes (the "
                   f"recording rules, from the engines' histograms). Red line: slo.ttft_p99_ms, "
                   f"{_ms(slo.ttft_p99_ms)}.{bucket_note['ttft']}", SECONDS,
                   [Query(percentile(TTFT, 0.5), "p50"), Query(percentile(TTFT, 0.99), "p99")],
                   above(slo.ttft_p99_ms / 1000), width=8),
        timeseries("Inter-token latency p99", f"p99 of the gaps between {name}'s output tokens over 5 minutes. "
                   f"Red line: slo.itl_p99_ms, {_ms(slo.itl_p99_ms)}.{bucket_note['itl']}", SECONDS,
                   [Query(percentile(ITL, 0.99), "p99")], above(slo.itl_p99_ms / 1000), width=8),
        timeseries("End-to-end latency p99", f"p99 of {name}'s request latency, first byte in to last token out, "
                   f"over 5 minutes. Red line: {e2e_text}.", SECONDS,
                   [Query(percentile(E2E, 0.99), "p99")], e2e, width=8),
        timeseries("Output tokens/s", f"Tokens {name}'s engines generate per second, all instances together. "
                   f"Red below slo.min_output_tokens_per_s ({slo.min_output_tokens_per_s:g}): the throughput the "
                   "service must sustain at the load test's load, so less at light traffic is no fault.",
                   TOKENS_PER_S, [Query(rec(f"model_name:{bare(GENERATION_TOKENS)}:rate5m"), "tokens/s")],
                   below(slo.min_output_tokens_per_s), width=8, min_=0),
        timeseries("Gateway 5xx ratio", f"Share of the gateways' requests for {name} answered 5xx over 5 minutes "
                   f"(the access-log exporter). Red line: slo.max_error_rate, {_percent(slo.max_error_rate)}.",
                   RATIO, [Query(rec("model_name:gpufleet_gateway_requests_errors:ratio_rate5m"), "5xx")],
                   above(slo.max_error_rate), width=8, min_=0),
        timeseries("Gateway 429 ratio", f"Share of the gateways' requests for {name} refused with 429 (per-key "
                   "limits, the concurrency cap) over 5 minutes. Red line: monitoring.alerts.gateway_limited_ratio, "
                   f"{_percent(ctx.thresholds.gateway_limited_ratio)} (GatewayRateLimitRatioHigh).", RATIO,
                   [Query(rec("model_name:gpufleet_gateway_requests_limited:ratio_rate5m"), "429")],
                   above(ctx.thresholds.gateway_limited_ratio), width=8, min_=0),
        timeseries("Goodput", f"Requests per second for {name} whose first token came within slo.ttft_p99_ms "
                   f"({_ms(slo.ttft_p99_ms)}), next to all finished requests per second.", "reqps",
                   [Query(rec("model_name:gpufleet_goodput_requests:rate5m"), "goodput"),
                    Query(rec(f"model_name:{bare(REQUEST_SUCCESS)}:rate5m"), "finished")], width=8, min_=0),
        timeseries("Error-budget burn rate (1h)", f"Each SLO's bad-event ratio over the last hour divided by its "
                   "budget (1 - objective; availability from slo.availability_target "
                   f"{slo.availability_target:g}, latency objectives 99%). 1 spends the 30-day budget in 30 days"
                   + (f"; above {page_factor:g} (red) the burn-rate alert pages." if page_factor else "."),
                   "none", burn("1h"), burn_1h, width=8, min_=0),
        stat("Error-budget burn rate (3d)", "The same over the last 3 days: above 1 (red) the 30-day budget "
             "runs out before the month does, and the ticket burn-rate alert fires.", "none", burn("3d"),
             above(1.0), width=8, height=8),
    ]


# ---- GPUs -------------------------------------------------------------------------------------------


def gpu_memory_limits(fleet: Fleet, thresholds: AlertThresholds) -> dict[str, float]:
    """Each GPU host's GpuMemoryHigh limit, as the alert has it."""
    return {host.name: gpu_memory_limit(host, thresholds) for host in fleet.hosts if host.plan is not None}


def gpus(ctx: Context) -> dict[str, Any]:
    t = ctx.thresholds
    on = (var("host"), var("gpu"))
    per_gpu = "{{host}} GPU {{gpu}}"

    def series(metric: gpu.MetricDef, *extra: str) -> str:
        return selector(metric.name, *on, *extra)

    limits = gpu_memory_limits(ctx.fleet, t)
    counts = {h.name: h.plan.gpu_count for h in ctx.fleet.hosts if h.plan is not None}
    count_thresholds = (Thresholds("red", ((min(counts.values()), "green"),)) if len(set(counts.values())) == 1
                        else Thresholds())
    xids = "|".join(str(x) for x in ACTIONABLE_XIDS)
    panels: list[Panel] = [
        row("Health"),
        up_stat("GPU exporter up", f"Prometheus reaches the GPU exporter (job {JOB_GPU_EXPORTER}) on each host.",
                selector("up", eq("job", JOB_GPU_EXPORTER), var("host"))),
        up_stat("NVML up", "The exporter's NVML library answered its latest sample (0 while the driver is down, "
                "re-initialising or hung).", selector(gpu.NVML_UP.name, var("host"))),
        stat("GPUs answering NVML", f"GPUs per host that answered the latest sample; the inventory's gpus.count: "
             f"{_by_value(counts)} (GpuMissing, GpuLost).", "none",
             [Query(sum_by(["host"], selector(gpu.UP.name, var("host"))), "{{host}}")], count_thresholds),
        stat("Actionable XIDs in range", f"XID events with an operator-actionable code ({xids.replace('|', ', ')}) "
             "in the dashboard's time range (GpuXidError; docs/exporter.md).", "none",
             [Query(f"sum by (host) ({increase(series(gpu.XID_ERRORS, matches('xid', xids)), '$__range')}) "
                    "or vector(0)", "{{host}}")], above(1)),
        row("Load and memory"),
        timeseries("GPU utilization", "Share of the sample period in which a kernel ran.", RATIO,
                   [Query(series(gpu.UTILIZATION), per_gpu)], min_=0, max_=1),
        timeseries("GPU memory in use", "Device memory used / installed. Red line: the GpuMemoryHigh limit, "
                   "monitoring.alerts.gpu_memory_ratio or serving.gpu_memory_utilization + gpu_memory_margin where "
                   f"that is higher (vLLM takes its share at start-up): {_by_value(limits, _percent)}.", RATIO,
                   [Query(f"{series(gpu.MEMORY_USED)} / {series(gpu.MEMORY_TOTAL)}", per_gpu)],
                   above(*limits.values()), min_=0, max_=1),
        timeseries("GPU memory by process", "Device memory each compute process holds (host PID and command).",
                   "bytes", [Query(series(gpu.PROCESS_MEMORY), "{{host}} GPU {{gpu}} {{process}} ({{pid}})")],
                   min_=0),
        timeseries("Power", "Power drawn by each board and the limit the driver enforces.", "watt",
                   [Query(series(gpu.POWER_USAGE), f"{per_gpu} draw"),
                    Query(series(gpu.POWER_LIMIT), f"{per_gpu} limit")], min_=0),
        row("Heat and clocks"),
        timeseries("Temperature", "GPU core temperature. Red line: monitoring.alerts.gpu_temperature_celsius, "
                   f"{t.gpu_temperature_celsius:g} °C (GpuTemperatureHigh).", "celsius",
                   [Query(series(gpu.TEMPERATURE), per_gpu)], above(t.gpu_temperature_celsius), width=8),
        timeseries("SM clock", "SM (shader) clock, and the highest the GPU supports.", "hertz",
                   [Query(series(gpu.SM_CLOCK), per_gpu), Query(series(gpu.SM_CLOCK_MAX), f"{per_gpu} max")],
                   width=8, min_=0),
        timeseries("Throttle reasons", "Clock event reasons holding the clocks down (1 while active). "
                   f"{', '.join(THROTTLE_REASONS)} mean heat or power supply (GpuClocksThrottled); sw_power_cap is "
                   "a busy GPU at its power limit, gpu_idle an idle one.", "none",
                   [Query(f"{series(gpu.CLOCK_EVENT)} == 1", f"{per_gpu} {{{{reason}}}}")], width=8, min_=0),
        row("Errors"),
        timeseries("XID errors", "XID events the driver reported, by code, per rate interval.", "none",
                   [Query(or_zero(sum_by(["host", "gpu", "xid"], increase(series(gpu.XID_ERRORS)))),
                          f"{per_gpu} XID {{{{xid}}}}")],
                   width=6, min_=0),
        timeseries("ECC errors (volatile)", "ECC memory errors since the driver was loaded; uncorrected ones page "
                   "(GpuEccUncorrectable).", "none",
                   [Query(series(gpu.ECC_ERRORS, eq("scope", "volatile")), f"{per_gpu} {{{{error_type}}}}")],
                   width=6, min_=0),
        timeseries("PCIe replays/s", "PCIe link-level retransmissions per second: a growing rate means a bad "
                   "riser, slot or link.", "none", [Query(rate(series(gpu.PCIE_REPLAYS)), per_gpu)], width=6, min_=0),
        timeseries("Row remapping", "1 while a memory row remap waits for a GPU reset (GpuRowRemapPending), or "
                   "when one failed (GpuRowRemapFailure: the GPU needs service).", "none",
                   [Query(series(gpu.REMAP_PENDING), f"{per_gpu} pending"),
                    Query(series(gpu.REMAP_FAILURE), f"{per_gpu} failed")], above(1), width=6, min_=0),
    ]
    return dashboard(
        UID_GPUS, "gpufleet / GPUs",
        "Every GPU of the fleet from the GPU exporter (docs/exporter.md): health, load, memory, heat, clocks and "
        "hardware errors, with the alerts' thresholds from the inventory." + ctx.footer(),
        [Variable("host", "host", selector(gpu.INFO.name)),
         Variable("gpu", "gpu", selector(gpu.INFO.name, var("host")), "GPU")],
        panels,
    )


# ---- Gateway ----------------------------------------------------------------------------------------


def gateway(ctx: Context) -> dict[str, Any]:
    on = (var("host"), var("model_name"))
    requests = selector(gwlog.REQUESTS, *on)
    gateways = {h.name: h.config.slo.max_error_rate for h in ctx.fleet.hosts if h.gateway is not None}
    limited = ctx.thresholds.gateway_limited_ratio

    def percentiles(histogram: str) -> list[Query]:
        return [Query(quantile(q, rate(selector(f"{histogram}_bucket", *on)), ["model_name"]),
                      f"{{{{model_name}}}} p{q * 100:g}") for q in QUANTILES]

    exporter_note = ("From the gateway's access-log exporter (job "
                     f"{JOB_GATEWAY}; monitoring/README.md, \"The gateway's status codes\").")
    panels: list[Panel] = [
        row("Gateways"),
        up_stat("nginx up", "nginx answers the nginx exporter's stub_status requests (GatewayDown).",
                selector(NGINX_UP, var("host"))),
        up_stat("nginx exporter up", f"Prometheus reaches the nginx exporter (job {JOB_NGINX}).",
                selector("up", eq("job", JOB_NGINX), var("host"))),
        up_stat("Access-log exporter up", f"Prometheus reaches the gateway's access-log exporter (job {JOB_GATEWAY}).",
                selector("up", eq("job", JOB_GATEWAY), var("host"))),
        up_stat("Access log readable", "The access-log exporter finds the gateway's access log and can read it.",
                selector(gwlog.LOG_UP, var("host"))),
        row("Requests"),
        timeseries("Requests/s by status", f"The gateways' answers per second by HTTP status. {exporter_note}",
                   "reqps", [Query(sum_by(["status"], rate(requests)), "{{status}}")], min_=0, stack=True),
        timeseries("429/s by client", "Requests refused with 429 per second, by API key's client name: per-key "
                   "rate and connection limits, or the gateway's concurrency cap.", "reqps",
                   [Query(or_zero(sum_by(["client"], rate(selector(gwlog.REQUESTS, eq("status", "429"), *on)))),
                          "{{client}}")], min_=0),
        timeseries("5xx ratio", "Share of requests answered 5xx, per gateway and model. Red line: each gateway's "
                   f"slo.max_error_rate ({_by_value(gateways, _percent)}; GatewayErrorRatioHigh).", RATIO,
                   [Query(ratio(gwlog.REQUESTS, [matches("status", "5..")], on, ["host", "model_name"]),
                          "{{host}} {{model_name}}")], above(*gateways.values()), min_=0),
        timeseries("429 ratio", "Share of requests refused with 429, per gateway and model. Red line: "
                   f"monitoring.alerts.gateway_limited_ratio, {_percent(limited)} (GatewayRateLimitRatioHigh).",
                   RATIO, [Query(ratio(gwlog.REQUESTS, [eq("status", "429")], on, ["host", "model_name"]),
                                 "{{host}} {{model_name}}")], above(limited), min_=0),
        row("Latency"),
        timeseries("Request duration", "Time from the request's first byte to the response's last, as the "
                   f"gateway logs it (streamed responses: the whole stream). {exporter_note}", SECONDS,
                   percentiles(gwlog.REQUEST_DURATION), min_=0),
        timeseries("Upstream header time", "Time until the engine answered the gateway with its response "
                   f"headers (nginx's upstream_header_time). {exporter_note}", SECONDS,
                   percentiles(gwlog.UPSTREAM_HEADER), min_=0),
        timeseries("Upstream retries/s", "Requests nginx sent to a second engine instance because the first "
                   "refused, dropped or answered 502/503: an instance failing or restarting.", "reqps",
                   [Query(sum_by(["model_name"], rate(selector(gwlog.UPSTREAM_RETRIES, *on))), "{{model_name}}")],
                   width=24, min_=0),
        row("nginx"),
        timeseries("nginx active connections", "Client connections nginx holds open, including idle keep-alive "
                   "ones (stub_status).", "short",
                   [Query(selector(NGINX_CONNECTIONS, var("host")), "{{host}}")], min_=0),
        timeseries("nginx requests/s", "Requests nginx handled per second, every path and status (stub_status).",
                   "reqps", [Query(sum_by(["host"], rate(selector(NGINX_REQUESTS, var("host")))), "{{host}}")],
                   min_=0),
    ]
    return dashboard(
        UID_GATEWAY, "gpufleet / Gateway",
        "The nginx gateways: what clients get (status codes, limits, latency) and nginx's own health."
        + ctx.footer(),
        [Variable("host", "host", selector("up", matches("job", f"{JOB_NGINX}|{JOB_GATEWAY}"))),
         Variable("model_name", "model_name", selector(gwlog.REQUESTS, var("host")), "model")],
        panels,
    )


# ---- Per engine -------------------------------------------------------------------------------------


def engines(ctx: Context) -> dict[str, Any]:
    on = (var("host"), var("instance"))
    per = "{{host}} {{instance}}"
    slos = [m.slo for m in ctx.slos]
    ttft = above(*(s.ttft_p99_ms / 1000 for s in slos))
    itl = above(*(s.itl_p99_ms / 1000 for s in slos))
    e2e = above(*(s.e2e_p99_ms / 1000 for s in slos if s.e2e_p99_ms))
    slo_text = {
        key: _by_value({m.model_name: getattr(m.slo, key) for m in ctx.slos if getattr(m.slo, key)}, _ms)
        for key in ("ttft_p99_ms", "itl_p99_ms", "e2e_p99_ms")
    }
    kv = ctx.thresholds.kv_cache_ratio

    def series(metric: str) -> str:
        return selector(metric, *on)

    def percentiles(bucket_rates: str) -> list[Query]:
        return [Query(quantile(q, bucket_rates, ["host", "instance"]), f"{per} p{q * 100:g}") for q in QUANTILES]

    itl_rates = f"{rate(series(f'{ITL}_bucket'))} or {rate(series(f'{ITL_OLD}_bucket'))}"
    kv_usage = f"{series(KV_CACHE)} or {series(KV_CACHE_OLD)}"
    panels: list[Panel] = [
        row("Instances"),
        up_stat("Engine up", f"Prometheus reaches the engine's /metrics (job {JOB_ENGINE}; EngineDown after 5 "
                "minutes).", selector("up", eq("job", JOB_ENGINE), *on), per, width=24),
        row("Load"),
        timeseries("Requests running and waiting", "Requests in the engine's batch, and those queued for a place "
                   "in it (a growing queue: EngineQueueGrowing).", "short",
                   [Query(series(RUNNING), f"{per} running"), Query(series(WAITING), f"{per} waiting")], min_=0),
        timeseries("KV cache usage", f"Share of the KV cache in use. Red line: monitoring.alerts.kv_cache_ratio, "
                   f"{_percent(kv)}: beyond it requests wait and running ones may be preempted.", RATIO,
                   [Query(kv_usage, per)], above(kv), min_=0, max_=1),
        timeseries("Tokens/s", "Prompt tokens processed and output tokens generated per second.", TOKENS_PER_S,
                   [Query(sum_by(["host", "instance"], rate(series(GENERATION_TOKENS))), f"{per} output"),
                    Query(sum_by(["host", "instance"], rate(series(PROMPT_TOKENS))), f"{per} prompt")], min_=0),
        timeseries("Finished requests/s", "Requests finished per second, by reason (stop, length, abort).", "reqps",
                   [Query(sum_by(["host", "instance", "finished_reason"], rate(series(REQUEST_SUCCESS))),
                          f"{per} {{{{finished_reason}}}}")], min_=0),
        row("Latency"),
        timeseries("Time to first token", "p50, p90 and p99 per instance, from its histogram. Red line: "
                   f"slo.ttft_p99_ms ({slo_text['ttft_p99_ms']}).", SECONDS,
                   percentiles(rate(series(f"{TTFT}_bucket"))), ttft, width=8, min_=0),
        timeseries("Inter-token latency", "p50, p90 and p99 of the gaps between output tokens per instance. Red "
                   f"line: slo.itl_p99_ms ({slo_text['itl_p99_ms']}).", SECONDS, percentiles(itl_rates), itl,
                   width=8, min_=0),
        timeseries("End-to-end latency", "p50, p90 and p99 of whole requests per instance. Red line: "
                   f"slo.e2e_p99_ms ({slo_text['e2e_p99_ms']}).", SECONDS,
                   percentiles(rate(series(f"{E2E}_bucket"))), e2e, width=8, min_=0),
        timeseries("Preemptions/s", "Running requests preempted (their KV cache freed, recomputed later) per "
                   "second: the KV cache is too small for the batch.", "short",
                   [Query(sum_by(["host", "instance"], rate(series(PREEMPTIONS))), per)], width=24, min_=0),
    ]
    engine_up = selector("up", eq("job", JOB_ENGINE))
    return dashboard(
        UID_ENGINE, "gpufleet / Engines",
        "Each engine instance (vLLM, or the simulator) from its /metrics: load, KV cache, latency percentiles "
        "and throughput." + ctx.footer(),
        [Variable("host", "host", engine_up),
         Variable("instance", "instance", selector("up", eq("job", JOB_ENGINE), var("host")))],
        panels,
    )
