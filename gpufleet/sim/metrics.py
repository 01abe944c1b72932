"""The simulator's Prometheus metrics, named, typed, labelled and bucketed like vLLM V1's and TGI's.

Dashboards, alerts and the load-test checks are written against the real engines' metrics, so the
simulator must expose the same series (see docs/simulator.md and the research notes it cites):

* vLLM V1 (0.11/0.12 era): `vllm:*` with labels {model_name, engine="0"}, counters exposed by
  prometheus_client as `<name>_total` plus `<name>_created`, histograms with vLLM's exact bucket
  lists, `vllm:request_success_total` pre-initialised for every finish reason.
* TGI: `tgi_*` without a model label; counters WITHOUT `_total` (TGI's Rust exporter does not add
  it), duration histograms with its 35 geometric buckets. prometheus_client cannot emit a counter
  without `_total`, so TGI text is rendered here.

Gauges and token counters are read from the engine's `EngineStats` at scrape time; histograms are
observed from the engine listener (`request_finished`, `step_finished`) and, for the per-token
series (TTFT, inter-token latency), by the HTTP surface as it streams tokens, so they move while a
long request is still running, as vLLM's do.

Histograms are a small local class (bisect into a list) rather than prometheus_client's: at 10,000
tokens/s an inter-token observation must cost well under a microsecond, and the event loop must
never stall for a lock.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gpufleet import __version__
from gpufleet.sim.types import EngineStats, RequestTiming, SimConfig, StepRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("stop", "length", "abort")

# vLLM V1 bucket lists (vllm/v1/metrics/loggers.py, 0.11/0.12)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's `build_1_2_5_buckets`: 1, 2, 5, 10, 20, 50, ... up to and including max_value."""
    out: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(value)
        exponent += 1


def tgi_duration_buckets() -> tuple[float, ...]:
    """TGI's buckets for every `*_duration` histogram: 0.0001 x 1.5^k for k = 1..35 (0.00015 .. 145.6 s)."""
    return tuple(0.0001 * 1.5**k for k in range(1, 36))


def tgi_linear_buckets(maximum: int, count: int = 100) -> tuple[float, ...]:
    """TGI's token-count buckets: `count` equal steps up to `maximum`."""
    return tuple(maximum / count * (i + 1) for i in range(count))


class Histogram:
    """A cumulative histogram of fixed buckets: `observe` is one bisect and two additions."""

    __slots__ = ("bounds", "count", "counts", "created", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf only
        self.sum = 0.0
        self.count = 0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> Iterator[tuple[str, int]]:
        """(le, cumulative count) pairs, +Inf last."""
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            yield floatToGoString(bound), running
        yield "+Inf", running + self.counts[-1]


class LabelledHistogram:
    """A histogram family: one `Histogram` per label-value tuple, created on first use."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.children: dict[tuple[str, ...], Histogram] = {}

    def labels(self, *values: str) -> Histogram:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = Histogram(self.bounds)
        return child


StatsFn = Callable[[], EngineStats]


class VllmMetrics(Collector):
    """vLLM V1's /metrics for one server: a custom collector in its own registry, and the engine listener."""

    def __init__(
        self,
        config: SimConfig,
        stats: StatsFn,
        *,
        profile: str,
        api: str = "vllm",
        cache_dtype: str = "auto",
        num_gpu_blocks_override: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.stats = stats
        self.clock = clock
        self.labels = (config.served_model_name, "0")
        self.info_labels = {"profile": profile, "api": api, "version": __version__}
        self.cache_labels = {
            "block_size": str(config.block_size),
            "cache_dtype": cache_dtype,
            "calculate_kv_scales": "False",
            "cpu_offload_gb": "0",
            "enable_prefix_caching": "True",
            "gpu_memory_utilization": str(config.gpu_memory_utilization),
            "is_attention_free": "False",
            "num_cpu_blocks": "0",
            "num_gpu_blocks": str(config.num_gpu_blocks),
            "num_gpu_blocks_override": str(num_gpu_blocks_override),
            "sliding_window": "None",
            "swap_space": "4",
            "engine": "0",
        }
        self.created = time.time()
        tokens = build_1_2_5_buckets(config.max_model_len)
        self.ttft = Histogram(TTFT_BUCKETS)  # observed by the HTTP surface as it streams (first token)
        self.itl = Histogram(ITL_BUCKETS)  # and every later one
        self.tpot = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue = Histogram(REQUEST_LATENCY_BUCKETS)
        self.inference = Histogram(REQUEST_LATENCY_BUCKETS)
        self.prefill = Histogram(REQUEST_LATENCY_BUCKETS)
        self.decode = Histogram(REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = Histogram(tokens)
        self.generation_tokens = Histogram(tokens)
        self.max_generation_tokens = Histogram(tokens)
        self.params_max_tokens = Histogram(tokens)
        self.params_n = Histogram(PARAMS_N_BUCKETS)
        self.iteration_tokens = Histogram(ITERATION_TOKENS_BUCKETS)
        self.success = dict.fromkeys(FINISH_REASONS, 0)  # pre-initialised, as vLLM does
        self.prefix_queries = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        # a real vLLM server runs prometheus_client's default collectors in its single-process mode
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    # ---- observations -------------------------------------------------------------------------

    def request_finished(self, request_id: str, timing: RequestTiming) -> None:
        """EngineListener: observe the per-request histograms and count the finish reason."""
        reason = timing.finish_reason or "abort"
        self.success[reason] = self.success.get(reason, 0) + 1
        end = timing.last_token if timing.last_token is not None else self.clock()
        self.e2e.observe(max(0.0, end - timing.arrival))
        if timing.first_scheduled is not None:
            self.queue.observe(timing.first_scheduled - timing.arrival)
            if timing.first_token is not None:
                self.prefill.observe(timing.first_token - timing.first_scheduled)
            if timing.last_token is not None:
                self.inference.observe(timing.last_token - timing.first_scheduled)
        if timing.first_token is not None and timing.last_token is not None:
            decode = timing.last_token - timing.first_token
            self.decode.observe(decode)
            if timing.generation_tokens > 1:
                self.tpot.observe(decode / (timing.generation_tokens - 1))
        self.prompt_tokens.observe(timing.prompt_tokens)
        self.generation_tokens.observe(timing.generation_tokens)
        self.max_generation_tokens.observe(timing.generation_tokens)
        self.params_max_tokens.observe(timing.max_tokens)
        self.params_n.observe(1)
        self.prefix_queries += timing.prompt_tokens

    def step_finished(self, step: StepRecord) -> None:
        """EngineListener: one scheduler iteration's token count."""
        tokens = step.prefill_tokens + step.decode_tokens
        if tokens:
            self.iteration_tokens.observe(tokens)

    # ---- exposition ---------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterable[Metric]:
        stats = self.stats()
        names, values = ("model_name", "engine"), self.labels
        base = dict(zip(names, values, strict=True))

        def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
            metric = Metric(name, doc, "gauge")
            metric.add_sample(name, labels if labels is not None else base, value)
            return metric

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", stats.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", stats.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", stats.kv_cache_usage)
        yield gauge("vllm:engine_sleep_state", "Engine sleep state; awake = 0 means engine is sleeping; "
                    "awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; "
                    "discard_all = 1 means sleep level 2.", 1, {**base, "sleep_state": "awake"})
        yield self._counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried "
                            "tokens.", [(base, self.prefix_queries)])
        yield self._counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                            [(base, 0)])
        yield self._counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                            [(base, stats.preemptions_total)])
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                            [(base, stats.prompt_tokens_total)])
        yield self._counter("vllm:generation_tokens", "Number of generation tokens processed.",
                            [(base, stats.generation_tokens_total)])
        yield self._counter("vllm:request_success", "Count of successfully processed requests.",
                            [({**base, "finished_reason": r}, n) for r, n in self.success.items()])
        histograms = (
            ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens),
            ("vllm:request_generation_tokens", "Number of generation tokens processed.", self.generation_tokens),
            ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", self.iteration_tokens),
            ("vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation "
             "tokens.", self.max_generation_tokens),
            ("vllm:request_params_n", "Histogram of the n request parameter.", self.params_n),
            ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
             self.params_max_tokens),
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl),
            ("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per "
             "request.", self.tpot),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
             self.queue),
            ("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
             self.inference),
            ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
             self.prefill),
            ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
             self.decode),
        )
        for name, doc, hist in histograms:
            yield _histogram(name, doc, [(base, hist)], created=True)
        yield gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", 1, self.cache_labels)
        yield gauge("gpufleet_sim_info", "This server is gpufleet's engine simulator, not a real engine.", 1,
                    self.info_labels)

    def _counter(self, name: str, doc: str, children: list[tuple[dict[str, str], float]]) -> Metric:
        metric = Metric(name, doc, "counter")
        for labels, value in children:
            metric.add_sample(name + "_total", labels, value)
            metric.add_sample(name + "_created", labels, self.created)
        return metric


def _histogram(
    name: str, doc: str, children: Iterable[tuple[dict[str, str], Histogram]], *, created: bool
) -> Metric:
    metric = Metric(name, doc, "histogram")
    for labels, hist in children:
        for le, count in hist.cumulative():
            metric.add_sample(name + "_bucket", {**labels, "le": le}, count)
        metric.add_sample(name + "_count", labels, hist.count + 0.0)
        metric.add_sample(name + "_sum", labels, hist.sum)
        if created:
            metric.add_sample(name + "_created", labels, hist.created)
    return metric


# ---- TGI --------------------------------------------------------------------------------------

TGI_FAILURE_KINDS = ("overloaded", "validation", "incomplete", "generation")
TGI_METHODS = ("prefill", "decode")


class TgiMetrics:
    """TGI's router metrics for one server, rendered as its Rust exporter writes them."""

    def __init__(
        self,
        config: SimConfig,
        stats: StatsFn,
        *,
        profile: str,
        max_input_tokens: int,
        max_total_tokens: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.stats = stats
        self.clock = clock
        self.info_labels = {"profile": profile, "api": "tgi", "version": __version__}
        self.max_total_tokens = max_total_tokens
        durations = tgi_duration_buckets()
        self.request_count = 0
        self.request_success = 0
        self.request_failure: dict[str, int] = dict.fromkeys(TGI_FAILURE_KINDS, 0)
        self.batch_inference_count = dict.fromkeys(TGI_METHODS, 0)
        self.batch_inference_success = dict.fromkeys(TGI_METHODS, 0)
        self.request_duration = Histogram(durations)
        self.validation_duration = Histogram(durations)
        self.queue_duration = Histogram(durations)
        self.inference_duration = Histogram(durations)
        self.mean_time_per_token = Histogram(durations)
        self.input_length = Histogram(tgi_linear_buckets(max_input_tokens))
        self.generated_tokens = Histogram(tgi_linear_buckets(max_total_tokens))
        self.max_new_tokens = Histogram(tgi_linear_buckets(max_total_tokens))
        self.batch_next_size = Histogram(tuple(range(1, 1025)))
        self.batch_inference_duration = LabelledHistogram(durations)
        self.batch_forward_duration = LabelledHistogram(durations)

    # ---- observations -------------------------------------------------------------------------

    def request_received(self) -> None:
        self.request_count += 1

    def request_failed(self, kind: str) -> None:
        self.request_failure[kind] = self.request_failure.get(kind, 0) + 1

    def validated(self, seconds: float, input_length: int, max_new_tokens: int) -> None:
        self.validation_duration.observe(seconds)
        self.input_length.observe(input_length)
        self.max_new_tokens.observe(max_new_tokens)

    def request_finished(self, request_id: str, timing: RequestTiming) -> None:
        """EngineListener: TGI records a request's durations when it ends well; a dropped stream is a failure."""
        if timing.finish_reason == "abort":
            self.request_failed("incomplete")
            return
        self.request_success += 1
        end = timing.last_token if timing.last_token is not None else self.clock()
        self.request_duration.observe(end - timing.arrival)
        if timing.first_scheduled is not None:
            self.queue_duration.observe(timing.first_scheduled - timing.arrival)
            self.inference_duration.observe(end - timing.first_scheduled)
        if timing.first_token is not None and timing.last_token is not None and timing.generation_tokens > 1:
            self.mean_time_per_token.observe((timing.last_token - timing.first_token) / (timing.generation_tokens - 1))
        self.generated_tokens.observe(timing.generation_tokens)

    def step_finished(self, step: StepRecord) -> None:
        """EngineListener: a step with any prefill counts as a TGI prefill batch, else a decode batch."""
        method = "prefill" if step.prefill_tokens else "decode"
        self.batch_inference_count[method] += 1
        self.batch_inference_success[method] += 1
        self.batch_inference_duration.labels(method).observe(step.duration)
        self.batch_forward_duration.labels(method).observe(step.duration)
        if step.batch_size:
            self.batch_next_size.observe(step.batch_size)

    # ---- exposition ---------------------------------------------------------------------------

    def render(self) -> bytes:
        stats = self.stats()
        out: list[str] = []

        def family(name: str, kind: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
            out.append(f"# TYPE {name} {kind}\n")
            for labels, value in samples:
                out.append(f"{name}{_labels(labels)} {_rust_number(value)}\n")

        def histogram(name: str, children: Iterable[tuple[dict[str, str], Histogram]]) -> None:
            out.append(f"# TYPE {name} histogram\n")
            for labels, hist in children:
                for le, count in hist.cumulative():
                    le_text = le if le == "+Inf" else _rust_number(float(le))
                    out.append(f"{name}_bucket{_labels({**labels, 'le': le_text})} {count}\n")
                out.append(f"{name}_sum{_labels(labels)} {_rust_number(hist.sum)}\n")
                out.append(f"{name}_count{_labels(labels)} {hist.count}\n")

        family("tgi_batch_current_size", "gauge", [({}, stats.num_running)])
        family("tgi_queue_size", "gauge", [({}, stats.num_waiting)])
        family("tgi_batch_current_max_tokens", "gauge", [({}, stats.kv_blocks_used * self.config.block_size)])
        family("tgi_batch_max_total_tokens", "gauge", [({}, stats.kv_blocks_total * self.config.block_size)])
        family("tgi_request_count", "counter", [({}, self.request_count)])
        family("tgi_request_success", "counter", [({}, self.request_success)])
        family("tgi_request_failure", "counter", [({"err": k}, n) for k, n in self.request_failure.items()])
        family("tgi_batch_inference_count", "counter",
               [({"method": m}, n) for m, n in self.batch_inference_count.items()])
        family("tgi_batch_inference_success", "counter",
               [({"method": m}, n) for m, n in self.batch_inference_success.items()])
        histogram("tgi_request_duration", [({}, self.request_duration)])
        histogram("tgi_request_validation_duration", [({}, self.validation_duration)])
        histogram("tgi_request_queue_duration", [({}, self.queue_duration)])
        histogram("tgi_request_inference_duration", [({}, self.inference_duration)])
        histogram("tgi_request_mean_time_per_token_duration", [({}, self.mean_time_per_token)])
        histogram("tgi_request_input_length", [({}, self.input_length)])
        histogram("tgi_request_generated_tokens", [({}, self.generated_tokens)])
        histogram("tgi_request_max_new_tokens", [({}, self.max_new_tokens)])
        histogram("tgi_batch_next_size", [({}, self.batch_next_size)])
        histogram("tgi_batch_inference_duration",
                  [({"method": m}, h) for (m,), h in sorted(self.batch_inference_duration.children.items())])
        histogram("tgi_batch_forward_duration",
                  [({"method": m}, h) for (m,), h in sorted(self.batch_forward_duration.children.items())])
        family("gpufleet_sim_info", "gauge", [(self.info_labels, 1)])
        return "".join(out).encode("utf-8")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), "")}"'
        for k, v in labels.items()
    )
    return "{" + ",".join(escaped) + "}"


def _rust_number(value: float) -> str:
    """Numbers as Rust's `Display` writes them: integers without a fraction, never an exponent."""
    if float(value).is_integer():
        return str(int(value))
    text = repr(float(value))
    if "e" in text:
        text = f"{value:.17f}".rstrip("0")
    return text
