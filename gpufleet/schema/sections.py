"""The typed sections a host's variables may hold.

Each top-level variable of an inventory is one of these sections. Every field's description says
what it is for; validation errors quote it as the fix, and the configuration reference in
docs/configuration.md is generated from it, so the words stay in one place.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpufleet.schema.units import parse_listen, parse_size

Port = Annotated[int, Field(ge=1, le=65535)]
Size = Annotated[str, Field(description="a Docker-style size such as '32g' or '512m'")]


class Section(BaseModel):
    # strict: YAML already gives real ints/bools, so '4' in quotes is a mistake worth reporting
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Invalid(ValueError):
    """A validator's complaint: what is wrong (naming the bad value) and, optionally, the fix.

    `field` names the field at fault when a check across several fields fails, so the error
    points at that key (layout.gpu_indices) rather than at the whole section.
    """

    def __init__(self, message: str, fix: str | None = None, field: str | None = None):
        super().__init__(message)
        self.fix = fix
        self.field = field


def _split(exc: ValueError) -> Invalid:
    """units.py says 'what is wrong; what to write': keep the two apart."""
    message, _, fix = str(exc).partition("; ")
    return Invalid(message, fix or None)


def _check_size(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_size(value)
        except ValueError as exc:
            raise _split(exc) from None
    return value


class Gpus(Section):
    """The host's GPUs."""

    model: str = Field(description="the GPU model from the catalogue, e.g. rtx-4090d, a100-80gb, h100-80gb")
    count: int = Field(ge=1, le=16, description="how many GPUs of that model the host has")
    memory_mib: int | None = Field(
        default=None, ge=1024,
        description="memory per GPU in MiB as nvidia-smi reports it; only needed for a GPU the catalogue lacks",
    )


_PINNED = re.compile(r"^[\w.\-/:]+(:[\w][\w.\-]{0,127})?(@sha256:[0-9a-f]{64})?$")


class Engine(Section):
    """The inference engine each instance runs."""

    kind: Literal["vllm", "tgi", "sim"] = Field(
        description="vllm, tgi, or sim: gpufleet's labelled simulator for machines without GPUs"
    )
    image: str = Field(
        description="the container image, pinned by a version tag or an @sha256 digest, e.g. vllm/vllm-openai:v0.11.0"
    )
    port: Port = Field(description="loopback port of the first instance; instance i listens on port + i")
    listen_address: str = Field(
        description="host address the engines' ports are published on: 127.0.0.1 (only a gateway on the same "
        "host reaches them), or the host's private address when the gateway runs on other hosts",
    )
    extra_args: list[str] = Field(default_factory=list, description="extra engine command-line arguments")
    image_archive: str | None = Field(
        default=None,
        description="URL of a `docker save` archive of the image, loaded when the host lacks it (fleets that "
        "reach no registry); null: pulled",
    )
    hf_token_file: str | None = Field(
        default=None,
        description="path, relative to the inventory folder, of a file holding the Hugging Face token for gated "
        "models, mode 0600, never committed (inventories' secrets/ folder is git-ignored); null: no token "
        "(public models)",
    )

    @field_validator("image")
    @classmethod
    def _pinned(cls, image: str) -> str:
        pin = "pin a version tag (e.g. vllm/vllm-openai:v0.11.0) or a digest (name@sha256:...)"
        if not _PINNED.match(image):
            raise Invalid(f"{image!r} is not an image reference", "write name:tag, e.g. vllm/vllm-openai:v0.11.0")
        name_part = image.split("@", 1)[0]
        last = name_part.rsplit("/", 1)[-1]
        tag = last.split(":", 1)[1] if ":" in last else None
        if "@sha256:" not in image and tag == "latest":
            raise Invalid(f"{image!r} is not pinned: 'latest' moves to a new release under you", pin)
        if "@sha256:" not in image and tag is None:
            raise Invalid(f"{image!r} is not pinned: an image without a tag means 'latest', which moves", pin)
        return image

    @field_validator("listen_address")
    @classmethod
    def _address(cls, value: str) -> str:
        return _check_ip(value, "Docker publishes ports on an address, not a name")


def _check_ip(value: str, why: str) -> str:
    """An IP address (services bind to addresses, not names), or Invalid saying what to write."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise Invalid(f"{value!r} is not an IP address",
                      f"write 127.0.0.1, or the host's private address ({why})") from None
    return value


class RopeScaling(Section):
    """RoPE scaling that stretches a model's context beyond max_position_embeddings."""

    type: Literal["yarn", "linear", "dynamic"] = Field(description="the scaling method; Qwen2.5 documents yarn")
    factor: float = Field(gt=1, description="how many times the original context is stretched, e.g. 4.0")
    original_max_position_embeddings: int = Field(
        ge=1, description="the model's native context, e.g. 32768 for Qwen2.5"
    )


class Model(Section):
    """The model the instances serve."""

    name: str = Field(
        description="a catalogue model, as listed by gpufleet plan --catalogue, "
        "or a Hugging Face repo id with config_json"
    )
    config_json: str | None = Field(
        default=None,
        description="path of the model's config.json, relative to the inventory folder, "
        "for a model not in the catalogue",
    )
    served_name: str | None = Field(
        default=None, description="the name clients put in 'model'; defaults to the model name"
    )
    revision: str | None = Field(default=None, description="the Hugging Face revision to pin: a commit or tag")
    dtype: Literal["auto", "bfloat16", "float16"] = Field(
        default="auto", description="weight and activation dtype: auto, bfloat16 or float16"
    )
    quantization: Literal["awq", "gptq", "fp8"] | None = Field(
        default=None, description="weight quantization: awq or gptq (both INT4), fp8, or null for none"
    )
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        default="auto", description="KV cache dtype: auto for the model dtype, or an fp8 variant for half the bytes"
    )
    max_model_len: int = Field(ge=16, description="the longest context, prompt plus output, one request may use")
    rope_scaling: RopeScaling | None = Field(
        default=None, description="RoPE scaling, needed for a max_model_len above the model's native context"
    )


class Serving(Section):
    """Engine scheduler and memory settings; the capacity planner checks them."""

    gpu_memory_utilization: float = Field(
        gt=0, le=1, description="fraction of each GPU's memory the engine may use; the seed uses 0.95"
    )
    max_num_seqs: int = Field(ge=1, description="most sequences batched at once; the seed uses 256")
    max_num_batched_tokens: int | None = Field(
        default=None, ge=16,
        description="most tokens per scheduler step; null lets the planner choose vLLM's default for the GPU",
    )
    block_size: Literal[8, 16, 32] = Field(default=16, description="KV cache block size in tokens: 8, 16 or 32")
    enforce_eager: bool = Field(default=False, description="disable CUDA graphs: saves their memory, costs speed")


class Layout(Section):
    """How the host's GPUs are split into engine instances."""

    instances: int = Field(ge=1, description="engine instances on the host, e.g. 1, 2 or 4")
    tensor_parallel_size: int = Field(ge=1, description="GPUs per instance, e.g. 4, 2 or 1")
    gpu_indices: list[list[Annotated[int, Field(ge=0)]]] | None = Field(
        default=None,
        description="GPU indices of each instance, e.g. [[0, 1], [2, 3]]; null assigns consecutive GPUs",
    )

    @model_validator(mode="after")
    def _indices_match(self) -> Layout:
        if self.gpu_indices is None:
            return self
        n, tp = self.instances, self.tensor_parallel_size
        example = [list(range(i * tp, (i + 1) * tp)) for i in range(n)]
        fix = (
            f"list {n} instance{'s' if n != 1 else ''} of {tp} GPU{'s' if tp != 1 else ''} each, no GPU twice, "
            f"e.g. {example}, or set gpu_indices to null to assign consecutive GPUs"
        )
        if len(self.gpu_indices) != self.instances:
            raise Invalid(
                f"lists {len(self.gpu_indices)} instances but instances is {self.instances}", fix, "gpu_indices"
            )
        seen: dict[int, list[int]] = {}
        for group in self.gpu_indices:
            if len(group) != self.tensor_parallel_size:
                raise Invalid(
                    f"entry {group} has {len(group)} GPUs but tensor_parallel_size is {self.tensor_parallel_size}",
                    fix, "gpu_indices",
                )
            reused = sorted(set(seen).intersection(group))
            if reused:
                raise Invalid(
                    f"GPU {reused[0]} is given to two instances ({seen[reused[0]]} and {group})", fix, "gpu_indices"
                )
            seen.update(dict.fromkeys(group, group))
        return self

    def assigned_gpus(self) -> list[list[int]]:
        """The GPU indices of each instance, consecutive when not given."""
        if self.gpu_indices is not None:
            return [list(g) for g in self.gpu_indices]
        tp = self.tensor_parallel_size
        return [list(range(i * tp, (i + 1) * tp)) for i in range(self.instances)]


_CPUSET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


class Limits(Section):
    """cgroup limits of each engine container."""

    memory: Size = Field(description="memory limit per instance, e.g. '32g'; swap is set equal, so no swapping")
    cpus: float | None = Field(default=None, gt=0, description="CPU limit per instance, e.g. 8; or use cpuset")
    cpuset: Literal["auto"] | list[str] | None = Field(
        default=None,
        description="'auto' to split the host's cores across instances, or one cpuset per instance like '0-7'",
    )
    pids: int = Field(ge=64, description="most processes and threads per container, the pids-limit")
    shm_size: Size = Field(description="shared memory per instance, e.g. '8g', needed for tensor parallel")
    ipc_host: bool = Field(default=False, description="share the host's IPC namespace instead of shm_size")

    @field_validator("memory", "shm_size")
    @classmethod
    def _sizes(cls, value: str) -> str | None:
        return _check_size(value)

    @field_validator("cpuset")
    @classmethod
    def _cpusets(cls, value: object) -> object:
        if isinstance(value, list):
            for item in value:
                if not _CPUSET.match(item):
                    raise Invalid(f"{item!r} is not a cpuset", "write CPU lists like '0-7' or '0,2,4-6'")
        return value

    @model_validator(mode="after")
    def _one_cpu_limit(self) -> Limits:
        if self.cpus is not None and self.cpuset is not None:
            raise Invalid(
                f"is {self.cpuset!r} but limits.cpus is also set ({self.cpus:g}): use cpus or cpuset, not both",
                "to pin CPUs, also set limits.cpus: null (cpus may come from another file or the role defaults); "
                "to keep the cpus limit, remove limits.cpuset",
                "cpuset",
            )
        return self


class Gateway(Section):
    """The nginx gateway in front of the instances."""

    listen: str = Field(description="address:port the gateway listens on, e.g. '0.0.0.0:8080'")
    api_keys_file: str = Field(
        description="file of API keys, one 'name key' per line, mode 0600; relative to the inventory folder "
        "(create it with: gpufleet keys add INVENTORY NAME)"
    )
    rate_per_second: float = Field(gt=0, description="requests per second allowed per API key; the seed uses 2")
    burst: int = Field(ge=0, description="requests a key may send above its rate before 429; the seed uses 4")
    nodelay: bool = Field(default=True, description="serve burst requests at once instead of spacing them")
    max_conns_per_key: int = Field(ge=1, description="concurrent connections allowed per API key")
    unlimited_clients: list[str] = Field(
        default_factory=list,
        description="clients (names in the keys file) exempt from rate_per_second, burst and max_conns_per_key, "
        "e.g. the load test's own key; the gateway-wide max_concurrency still applies to them",
    )
    max_concurrency: int | None = Field(
        default=None, ge=1,
        description="requests in flight across the gateway before 429; null derives it from the capacity plan",
    )
    max_body_size: Size = Field(description="largest request body, e.g. '4m'")
    read_timeout_s: int = Field(ge=1, description="seconds a stream may stay silent before nginx gives up")
    backends: Literal["fleet", "local"] = Field(
        description="fleet: every GPU host's instances (their engine.listen_address must be reachable); "
        "local: only the instances of the gateway's own host, on loopback (a gateway on every GPU host)",
    )
    status_port: Port = Field(description="loopback port of nginx's stub_status, for the exporter")
    max_fails: int = Field(
        ge=1, description="failed requests (refused, reset, 502/503) that take an instance out of rotation"
    )
    fail_timeout_s: int = Field(ge=1, description="seconds an instance stays out of rotation after failing")

    @field_validator("max_body_size")
    @classmethod
    def _sizes(cls, value: str) -> str | None:
        return _check_size(value)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        try:
            parse_listen(value)
        except ValueError as exc:
            raise _split(exc) from None
        return value


class Slo(Section):
    """Service level objectives; alerts, the load-test gate and the report read them."""

    ttft_p99_ms: float = Field(gt=0, description="time to first token, 99th percentile, in milliseconds")
    itl_p99_ms: float = Field(gt=0, description="inter-token latency, 99th percentile, in milliseconds")
    tpot_p99_ms: float | None = Field(
        default=None, gt=0, description="time per output token, the mean per request, 99th percentile, in ms"
    )
    e2e_p99_ms: float | None = Field(default=None, gt=0, description="end-to-end request latency p99, in ms")
    max_error_rate: float = Field(ge=0, le=1, description="largest acceptable fraction of failed requests, e.g. 0.01")
    min_output_tokens_per_s: float = Field(
        ge=0, description="least aggregate output tokens/s the service must sustain at the tested load"
    )
    availability_target: float = Field(
        gt=0, lt=1, description="availability objective for burn-rate alerts, e.g. 0.999"
    )


class Receiver(Section):
    name: str = Field(min_length=1, description="receiver name used in Alertmanager routes")
    kind: Literal["webhook"] = Field(default="webhook", description="receiver type: webhook")
    url: str = Field(pattern=r"^https?://\S+$", description="the webhook URL, http:// or https://")


class MonitoringPorts(Section):
    prometheus: Port = Field(description="Prometheus port")
    alertmanager: Port = Field(description="Alertmanager port")
    grafana: Port = Field(description="Grafana port")
    node_exporter: Port = Field(description="node_exporter port on every host")
    gpu_exporter: Port = Field(description="gpufleet GPU exporter port on GPU hosts")
    nginx_exporter: Port = Field(description="nginx exporter port on gateway hosts")
    gateway_exporter: Port = Field(
        description="port of the gateway's access-log exporter (`gpufleet gateway-exporter`) on gateway hosts"
    )


class AlertThresholds(Section):
    """Alert thresholds beyond the SLOs (those come from `slo`); the rules are rendered from them."""

    gpu_memory_ratio: float = Field(
        gt=0, le=1, description="GPU memory in use above which GpuMemoryHigh fires; the seed's limit is 0.9"
    )
    gpu_memory_margin: float = Field(
        ge=0, lt=1, description="on hosts whose engines are planned above gpu_memory_ratio (vLLM takes its whole "
        "share at start-up), the limit is serving.gpu_memory_utilization plus this margin",
    )
    kv_cache_ratio: float = Field(gt=0, le=1, description="engine KV cache usage above which EngineKvCacheHigh fires")
    gpu_temperature_celsius: float = Field(
        gt=0, description="GPU core temperature above which GpuTemperatureHigh fires"
    )
    xid_recent_s: int = Field(ge=1, description="seconds an actionable XID keeps GpuXidError firing after it was seen")
    gateway_limited_ratio: float = Field(
        gt=0, le=1, description="share of gateway requests answered 429 above which GatewayRateLimitRatioHigh fires"
    )
    engine_down_for_s: int = Field(
        ge=1, description="seconds an engine's /metrics must fail before EngineDown pages; longer than a model load "
        "and a container restart"
    )
    host_memory_ratio: float = Field(gt=0, le=1, description="host memory in use above which HostMemoryHigh fires")
    disk_free_ratio: float = Field(
        gt=0, lt=1, description="free share of a filesystem below which HostDiskSpaceLow fires"
    )


class GrafanaSource(Section):
    """Grafana's apt repository (Grafana is not in Debian or Ubuntu); point it at a mirror where needed."""

    repo_url: str = Field(pattern=r"^https?://\S+$", description="apt repository base, e.g. https://apt.grafana.com")
    suite: str = Field(min_length=1, description="the repository's suite: stable (or beta)")
    gpg_key_url: str = Field(pattern=r"^https?://\S+$", description="URL of the repository's ASCII-armored signing key")
    version: str | None = Field(default=None, description="exact grafana package version to pin, e.g. '12.2.1'; "
                                "null: the newest in the repository")


class Monitoring(Section):
    """Prometheus, Alertmanager and Grafana on the monitoring hosts, and the exporters they scrape."""

    listen_address: str = Field(
        description="address Prometheus, Alertmanager and Grafana bind to on the monitoring hosts, e.g. 127.0.0.1"
    )
    exporter_address: str = Field(
        description="address this host's exporters (node, GPU, nginx, gateway log) bind to: 127.0.0.1 when "
        "Prometheus runs on the same host, else the host's private address, which Prometheus scrapes"
    )
    scrape_interval_s: int = Field(ge=1, le=300, description="Prometheus scrape interval in seconds")
    retention_days: int = Field(ge=1, description="days of metrics Prometheus keeps")
    receivers: list[Receiver] = Field(min_length=1, description="where alerts go; the first is the default route")
    ports: MonitoringPorts = Field(description="ports of the monitoring services and exporters")
    alerts: AlertThresholds = Field(description="alert thresholds beyond the SLOs")
    grafana: GrafanaSource = Field(description="where the monitoring hosts install Grafana from")
    runbook_base_url: str | None = Field(
        default=None, pattern=r"^https?://\S+$",
        description="where on-call engineers read the runbooks, e.g. your wiki's or repository's runbooks/ URL; "
        "every alert's runbook_url is <this>/<AlertName>.md. null: the repository path runbooks/",
    )

    @field_validator("listen_address", "exporter_address")
    @classmethod
    def _address(cls, value: str) -> str:
        return _check_ip(value, "Prometheus scrapes an address")


class GpuExporter(Section):
    """`gpufleet exporter` on the GPU hosts (roles/gpu_exporter)."""

    mode: Literal["auto", "nvml", "simulate"] = Field(
        description="nvml: read the GPUs through NVML; simulate: stand-in GPUs driven by the simulated engines "
        "(the test bed); auto: simulate where engine.kind is sim, else nvml"
    )
    interval_s: float = Field(gt=0, le=60, description="seconds between two samples of the GPUs")


class Preflight(Section):
    """What a GPU host must offer before anything is installed on it."""

    min_free_disk_gib: float = Field(
        ge=0, description="free GiB needed on / and on Docker's data folder (driver, CUDA, images, model cache)"
    )


class NvidiaDriver(Section):
    source: Literal["cuda_repo", "distro"] = Field(
        description="NVIDIA's CUDA repository or the distribution's packages"
    )
    branch: int = Field(ge=450, description="driver branch, e.g. 570")
    version: str | None = Field(default=None, description="exact driver version to pin, e.g. '570.133.20'")
    kernel_modules: Literal["auto", "open", "proprietary"] = Field(
        description="open or proprietary kernel modules; auto picks open for Turing and newer from R560"
    )
    reboot: Literal["auto", "never"] = Field(description="reboot when the loaded module differs: auto or never")
    repo_url: str = Field(
        description="CUDA repository base URL, where {distro} becomes e.g. ubuntu2204; set for a mirror"
    )
    keyring_url: str = Field(description="URL of the cuda-keyring package; set for a mirror")


class Cuda(Section):
    install: bool = Field(description="install the CUDA toolkit on the host; engines bring their own in the image")
    version: str = Field(pattern=r"^\d+\.\d+$", description="toolkit version, e.g. '12.8'")


class ContainerToolkit(Section):
    version: str = Field(description="nvidia-container-toolkit version for all four packages, e.g. '1.17.8-1'")
    repo_url: str = Field(description="NVIDIA container toolkit repository URL; set for a mirror")
    gpg_key_url: str = Field(description="URL of the repository's signing key; set for a mirror")
    check_image: str = Field(
        description="image the layered check runs `nvidia-smi -L` in with `--gpus all`; set for a private registry"
    )
    check_image_archive: str | None = Field(
        default=None,
        description="URL of a `docker save` archive of check_image, loaded when the image is missing "
        "(for fleets that reach no registry); null: pulled",
    )


class Docker(Section):
    source: Literal["docker_ce", "distro"] = Field(
        description="docker-ce from Docker's repository, or distro docker.io"
    )
    repo_url: str = Field(
        description="Docker's apt repository URL, where {distro_id} becomes ubuntu or debian; set for a mirror"
    )
    gpg_key_url: str = Field(description="URL of Docker's signing key; set for a mirror")
    log_max_size: Size = Field(description="json-file log rotation size per file, e.g. '100m'")
    log_max_file: int = Field(ge=1, description="rotated log files kept per container")
    live_restore: bool = Field(description="keep containers running while dockerd restarts")

    @field_validator("log_max_size")
    @classmethod
    def _sizes(cls, value: str) -> str | None:
        return _check_size(value)
