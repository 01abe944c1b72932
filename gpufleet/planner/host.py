"""Plan a whole host from its validated variables: resolve the catalogue, size each instance."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from gpufleet.paths import display_path
from gpufleet.planner.catalogue import (
    GpuSpec,
    ModelSpec,
    find_model,
    gpus,
    model_from_config_json,
    models,
    variant_of,
)
from gpufleet.planner.flags import engine_flags
from gpufleet.planner.plan import (
    TP_SIZES,
    Candidate,
    InstancePlan,
    PlanInput,
    Refusal,
    native_context,
    nearest_working,
    plan_instance,
)
from gpufleet.schema.host import HostVars
from gpufleet.suggest import did_you_mean

# vLLM's OpenAI-server defaults when max_num_batched_tokens is not set
SMALL_GPU_BATCHED_TOKENS = 2048
LARGE_GPU_BATCHED_TOKENS = 8192


@dataclass(frozen=True)
class HostRefusal(Exception):
    """The host's configuration cannot work; `nearest` describes the closest layout that does."""

    key: str
    reason: str
    nearest: str | None = None


@dataclass(frozen=True)
class InstanceSpec:
    """One engine container of the host."""

    index: int
    gpus: tuple[int, ...]
    port: int
    flags: tuple[str, ...]
    plan: InstancePlan


@dataclass(frozen=True)
class HostPlan:
    host: str
    gpu: GpuSpec
    gpu_count: int
    engine: str
    served_name: str
    spec: PlanInput
    instances: tuple[InstanceSpec, ...]
    notes: tuple[str, ...]

    @property
    def model(self) -> ModelSpec:
        return self.spec.model


@dataclass(frozen=True)
class LayoutOption:
    """One row of the what-if table: a layout, and its plan or the reason it cannot work."""

    instances: int
    tensor_parallel_size: int
    model: ModelSpec
    plan: InstancePlan | None
    refusal: str | None
    configured: bool


def resolve_gpu(config: HostVars) -> GpuSpec:
    assert config.gpus is not None
    known = gpus()
    spec = known.get(config.gpus.model.lower())
    if spec is None:
        if config.gpus.memory_mib is None:
            guess = did_you_mean(config.gpus.model, known)
            extra = f"did you mean {guess!r}? " if guess else ""
            raise HostRefusal(
                "gpus.model",
                f"GPU {config.gpus.model!r} is not in the catalogue",
                f"{extra}catalogue GPUs: {', '.join(known)}; for another GPU also set gpus.memory_mib",
            )
        spec = GpuSpec(
            id=config.gpus.model, name=config.gpus.model, memory_mib=config.gpus.memory_mib,
            architecture="unknown", compute_capability="unknown", memory_bandwidth_gb_s=0.0,
            fp8=False, large_batch_defaults=config.gpus.memory_mib >= 70 * 1024,
        )
    elif config.gpus.memory_mib is not None:
        spec = replace(spec, memory_mib=config.gpus.memory_mib)
    return spec


def resolve_model(config: HostVars, inventory_root: Path) -> tuple[ModelSpec, str | None]:
    """The model's architecture and the effective weight quantization."""
    assert config.model is not None
    setting = config.model
    if setting.config_json:
        path = (inventory_root / setting.config_json).resolve()
        if not path.is_file():
            raise HostRefusal(
                "model.config_json",
                f"{display_path(path)} does not exist",
                "download the model's config.json from its Hugging Face repository to that path, or correct "
                "model.config_json (it is relative to the inventory folder)",
            )
        spec = model_from_config_json(path, display_path(path), setting.name)
    else:
        spec = find_model(setting.name)
        if spec is None:
            guess = did_you_mean(setting.name, [m.hf_id for m in models().values()] + list(models()))
            listed = "gpufleet plan --catalogue lists the catalogue"
            raise HostRefusal(
                "model.name",
                f"model {setting.name!r} is not in the catalogue",
                f"did you mean {guess!r}? For a model outside the catalogue set model.config_json to its "
                f"config.json ({listed})" if guess
                else f"use a catalogue model ({listed}), or set model.config_json to the model's config.json",
            )
    wanted = setting.quantization
    if wanted is None or wanted == spec.quantization:
        return spec, spec.quantization
    if spec.quantization is not None:
        variant = variant_of(spec, wanted)
        other = f"set model.name to {variant.hf_id}" if variant else f"use {_a(wanted)} checkpoint"
        raise HostRefusal(
            "model.quantization",
            f"{spec.hf_id} is {_a(spec.quantization)} checkpoint, but model.quantization is {wanted!r}",
            f"set model.quantization to {spec.quantization!r} or null, or {other}",
        )
    if wanted == "fp8":
        return spec, "fp8"  # vLLM quantizes full-precision weights to FP8 at load time
    variant = variant_of(spec, wanted)
    use = f"set model.name to {variant.hf_id}" if variant else f"use {_a(wanted)} checkpoint of this model"
    raise HostRefusal(
        "model.quantization",
        f"{spec.hf_id} holds full-precision weights; {wanted.upper()} needs a quantized checkpoint",
        f"{use}, or set model.quantization to null to serve the full-precision weights",
    )


def _a(quantization: str) -> str:
    """'an AWQ', 'a GPTQ', 'an FP8'."""
    name = quantization.upper()
    return f"{'an' if name[0] in 'AEFHILMNORSX' else 'a'} {name}"


def plan_input(config: HostVars, gpu: GpuSpec, model: ModelSpec, quantization: str | None) -> PlanInput:
    assert config.model and config.serving and config.layout
    serving = config.serving
    # unset: vLLM's default for the GPU, raised to max_num_seqs as vLLM's scheduler requires
    batched = serving.max_num_batched_tokens or max(
        LARGE_GPU_BATCHED_TOKENS if gpu.large_batch_defaults else SMALL_GPU_BATCHED_TOKENS, serving.max_num_seqs
    )
    dtype = config.model.dtype if config.model.dtype != "auto" else model.torch_dtype
    rope = config.model.rope_scaling
    return PlanInput(
        model=model,
        gpu=gpu,
        tensor_parallel_size=config.layout.tensor_parallel_size,
        quantization=quantization,
        dtype=dtype if dtype in ("bfloat16", "float16") else "bfloat16",
        kv_cache_dtype=config.model.kv_cache_dtype,
        max_model_len=config.model.max_model_len,
        rope_factor=rope.factor if rope else None,
        gpu_memory_utilization=serving.gpu_memory_utilization,
        max_num_seqs=serving.max_num_seqs,
        max_num_batched_tokens=batched,
        block_size=serving.block_size,
        enforce_eager=serving.enforce_eager,
    )


def plan_host(name: str, config: HostVars, inventory_root: Path) -> HostPlan:
    """Plan every instance of a GPU host, or raise `HostRefusal`."""
    assert config.gpus and config.layout and config.engine and config.model
    gpu = resolve_gpu(config)
    model, quantization = resolve_model(config, inventory_root)
    spec = plan_input(config, gpu, model, quantization)
    layout, count = config.layout, config.gpus.count
    tp = layout.tensor_parallel_size
    needed = layout.instances * tp
    if needed > count:
        fit = count // tp
        raise HostRefusal(
            "layout.instances" if fit else "layout.tensor_parallel_size",
            f"the layout needs {needed} GPUs ({layout.instances} x TP{tp}) but the host has {count} (gpus.count)",
            f"set layout.instances to {fit} ({fit} x TP{tp} uses {fit * tp} of the {count} GPUs)" if fit
            else f"set layout.tensor_parallel_size to {count} or less",
        )
    for group in layout.gpu_indices or []:
        missing = [i for i in group if i >= count]
        if missing:
            raise HostRefusal(
                "layout.gpu_indices",
                f"GPU index {missing[0]} does not exist on a host with {count} GPUs (0-{count - 1})",
                f"use GPU indices 0 to {count - 1}, or set layout.gpu_indices to null to assign consecutive GPUs",
            )
    try:
        instance_plan = plan_instance(spec)
    except Refusal as refusal:
        raise HostRefusal(refusal.key, refusal.reason, _refusal_fix(refusal, spec, config, gpu)) from None
    served = config.model.served_name or config.model.name
    flags = tuple(engine_flags(config.engine.kind, spec, config.model, served))
    instances = tuple(
        InstanceSpec(index=i, gpus=tuple(g), port=config.engine.port + i, flags=flags, plan=instance_plan)
        for i, g in enumerate(layout.assigned_gpus())
    )
    return HostPlan(
        host=name, gpu=gpu, gpu_count=count, engine=config.engine.kind, served_name=served,
        spec=spec, instances=instances, notes=tuple(_notes(spec, instance_plan, count, needed)),
    )


def _refusal_fix(refusal: Refusal, spec: PlanInput, config: HostVars, gpu: GpuSpec) -> str | None:
    """What to change: the context limit, the nearest layout that works, or the fewest GPUs that would."""
    assert config.layout and config.gpus
    layout, count = config.layout, config.gpus.count
    base = spec.model.max_position_embeddings
    if refusal.key == "model.max_model_len" and spec.max_model_len > native_context(spec):
        factor = float(-(-spec.max_model_len // base))
        if spec.rope_factor:
            return (
                f"lower model.max_model_len to {native_context(spec)} or less, "
                f"or raise model.rope_scaling.factor to {factor:g}"
            )
        return (
            f"lower model.max_model_len to {base} or less, or add model.rope_scaling: "
            f"{{type: yarn, factor: {factor:.1f}, original_max_position_embeddings: {base}}}"
        )
    nearest = nearest_working(spec, layout.instances, count)
    if nearest is not None:
        return f"nearest layout that works: {nearest.describe()}"
    bigger = _fewest_gpus(spec)
    if bigger is None:
        return f"no layout of this model fits {gpu.id} GPUs: use a smaller model or larger GPUs"
    return (
        f"no layout fits on {count} x {gpu.id}; with more GPUs the smallest that works is {bigger.describe()}; "
        f"use a host with {bigger.spec.tensor_parallel_size} x {gpu.id}, larger GPUs, or a smaller model"
    )


def _fewest_gpus(spec: PlanInput) -> Candidate | None:
    """One instance on the fewest GPUs that works, however many the host has (bf16 before INT4)."""
    choices = [(spec.model, spec.quantization)]
    int4 = variant_of(spec.model, "awq") if spec.quantization is None else None
    if int4 is not None:
        choices.append((int4, "awq"))
    for tp in TP_SIZES:
        for model, quantization in choices:
            trial = replace(spec, model=model, quantization=quantization, tensor_parallel_size=tp)
            try:
                return Candidate(1, trial, plan_instance(trial))
            except Refusal:
                continue
    return None


def _notes(spec: PlanInput, plan: InstancePlan, count: int, used: int) -> list[str]:
    notes = []
    if used < count:
        notes.append(f"{count - used} of {count} GPUs are not used by any instance")
    if plan.concurrency < spec.max_num_seqs:
        notes.append(
            f"max_num_seqs {spec.max_num_seqs} exceeds the {plan.concurrency} requests of "
            f"{spec.max_model_len:,} tokens the KV cache holds; more long requests queue or are preempted"
        )
    return notes


def layout_options(name: str, config: HostVars, inventory_root: Path) -> list[LayoutOption]:
    """The what-if table: every even split of the host's GPUs, in the configured precision and INT4."""
    assert config.gpus and config.layout
    gpu = resolve_gpu(config)
    model, quantization = resolve_model(config, inventory_root)
    base = plan_input(config, gpu, model, quantization)
    count = config.gpus.count
    choices: list[tuple[ModelSpec, str | None]] = [(model, quantization)]
    if quantization is None:
        int4 = variant_of(model, "awq")
        if int4 is not None:
            choices.append((int4, "awq"))
    rows: list[LayoutOption] = []
    for candidate, quant in choices:
        for tp in TP_SIZES:
            if tp > count:
                continue
            instances = count // tp
            spec = replace(base, model=candidate, quantization=quant, tensor_parallel_size=tp)
            try:
                plan, refusal = plan_instance(spec), None
            except Refusal as exc:
                plan, refusal = None, exc.reason
            configured = (
                candidate is model and tp == config.layout.tensor_parallel_size
                and instances == config.layout.instances
            )
            rows.append(LayoutOption(instances, tp, candidate, plan, refusal, configured))
    return rows
