"""Plan one host: size every instance of its layout, refuse what cannot work, and say what would.

`plan_instance` is the arithmetic for one tensor-parallel group of GPUs; `plan_host` applies it to
a host's layout; `nearest_working` searches the layouts around a refused one so the refusal can
name the closest configuration that fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gpufleet.planner import memory
from gpufleet.planner.catalogue import GpuSpec, ModelSpec, variant_of

TP_SIZES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class PlanInput:
    """Everything the arithmetic needs for one instance."""

    model: ModelSpec
    gpu: GpuSpec
    tensor_parallel_size: int
    quantization: str | None  # effective: the checkpoint's or a dynamic fp8
    dtype: str  # effective weight dtype (auto resolved)
    kv_cache_dtype: str
    max_model_len: int
    rope_factor: float | None
    gpu_memory_utilization: float
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    enforce_eager: bool


@dataclass(frozen=True)
class Refusal(Exception):
    """A configuration that cannot work: why, and which inventory key to change."""

    key: str
    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class InstancePlan:
    """Memory per GPU (bytes) and the KV capacity of one instance."""

    tensor_parallel_size: int
    gpu_total_bytes: int
    requested_bytes: int  # gpu_memory_utilization x total: what the engine may use
    weight_bytes_per_gpu: int
    model_weight_bytes: int  # the whole model's weights, one copy
    activation_bytes: int
    overhead_bytes: int
    kv_cache_bytes_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    num_blocks: int
    block_size: int
    max_model_len: int
    max_num_seqs: int

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token across the instance (all its GPUs)."""
        return self.kv_bytes_per_token_per_gpu * self.tensor_parallel_size

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def concurrency_at(self, context_tokens: int) -> int:
        """Requests of `context_tokens` each that fit in the KV cache at once, capped by max_num_seqs."""
        blocks_each = -(-context_tokens // self.block_size)
        return min(self.max_num_seqs, self.num_blocks // blocks_each)

    @property
    def concurrency(self) -> int:
        """Requests at the full max_model_len that fit at once."""
        return self.concurrency_at(self.max_model_len)


def plan_instance(spec: PlanInput) -> InstancePlan:
    """Size one instance, or raise `Refusal` naming the key at fault."""
    model, tp = spec.model, spec.tensor_parallel_size
    _check_parallelism(model, tp)
    _check_quantization_groups(model, tp, spec.quantization)
    _check_context(spec)
    if spec.max_num_batched_tokens < spec.max_num_seqs:
        # vLLM's scheduler config refuses this at start-up: a step must fit one token per sequence
        raise Refusal(
            "serving.max_num_batched_tokens",
            f"max_num_batched_tokens {spec.max_num_batched_tokens:,} is below max_num_seqs {spec.max_num_seqs:,}; "
            "vLLM needs room for one token of every running sequence in a step",
        )
    dtype_bytes = memory.DTYPE_BYTES[spec.dtype]
    kv_dtype_bytes = 1 if spec.kv_cache_dtype.startswith("fp8") else dtype_bytes
    total = spec.gpu.memory_bytes
    requested = int(total * spec.gpu_memory_utilization)
    weights = memory.weight_bytes(model, tp, spec.quantization, dtype_bytes)
    activations = memory.activation_peak_bytes(model, tp, dtype_bytes, spec.max_num_batched_tokens, spec.max_num_seqs)
    overhead = memory.runtime_overhead_bytes(tp, spec.enforce_eager)
    kv_budget = requested - weights - activations - overhead
    if weights + overhead >= requested:
        raise Refusal(
            "layout.tensor_parallel_size",
            f"weights do not fit: {_gib(weights)} of weights per GPU at TP{tp} plus {_gib(overhead)} runtime "
            f"exceed the {_gib(requested)} the engine may use ({spec.gpu_memory_utilization:g} x {_gib(total)})",
        )
    if kv_budget <= 0:
        raise Refusal(
            "serving.max_num_batched_tokens",
            f"no memory left for the KV cache: weights {_gib(weights)} + activations {_gib(activations)} "
            f"+ runtime {_gib(overhead)} per GPU use all of the {_gib(requested)} the engine may use",
        )
    per_token = memory.kv_bytes_per_token(model, tp, kv_dtype_bytes)
    num_blocks = kv_budget // (per_token * spec.block_size)
    plan = InstancePlan(
        tensor_parallel_size=tp,
        gpu_total_bytes=total,
        requested_bytes=requested,
        weight_bytes_per_gpu=weights,
        model_weight_bytes=memory.weight_bytes(model, 1, spec.quantization, dtype_bytes),
        activation_bytes=activations,
        overhead_bytes=overhead,
        kv_cache_bytes_per_gpu=kv_budget,
        kv_bytes_per_token_per_gpu=per_token,
        num_blocks=num_blocks,
        block_size=spec.block_size,
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs,
    )
    if plan.kv_tokens < spec.max_model_len:
        raise Refusal(
            "model.max_model_len",
            f"the KV cache holds {plan.kv_tokens:,} tokens per instance at TP{tp}, fewer than one "
            f"{spec.max_model_len:,}-token request (max_model_len)",
        )
    return plan


def _check_parallelism(model: ModelSpec, tp: int) -> None:
    heads, kv_heads = model.num_attention_heads, model.num_key_value_heads
    if heads % tp:
        raise Refusal(
            "layout.tensor_parallel_size",
            f"tensor_parallel_size {tp} does not divide the model's {heads} attention heads",
        )
    if (tp > kv_heads and tp % kv_heads) or (tp <= kv_heads and kv_heads % tp):
        raise Refusal(
            "layout.tensor_parallel_size",
            f"tensor_parallel_size {tp} cannot split or replicate the model's {kv_heads} KV heads evenly",
        )


# AWQ and GPTQ store one scale per 128 consecutive input weights of a row-parallel layer, so each
# GPU's slice of those inputs must be whole groups
INT4_GROUP_SIZE = 128


def _check_quantization_groups(model: ModelSpec, tp: int, quantization: str | None) -> None:
    if quantization not in ("awq", "gptq"):
        return
    for what, inputs in (("MLP", model.intermediate_size), ("attention output", model.num_attention_heads
                                                              * model.head_size)):
        if (inputs // tp) % INT4_GROUP_SIZE:
            raise Refusal(
                "layout.tensor_parallel_size",
                f"tensor_parallel_size {tp} gives each GPU {inputs // tp:,} {what} inputs, not whole "
                f"{INT4_GROUP_SIZE}-wide {quantization.upper()} groups",
            )


def native_context(spec: PlanInput) -> int:
    base = spec.model.max_position_embeddings
    return int(base * spec.rope_factor) if spec.rope_factor else base


def _check_context(spec: PlanInput) -> None:
    limit = native_context(spec)
    if spec.max_model_len <= limit:
        return
    if spec.rope_factor:
        reason = (
            f"max_model_len {spec.max_model_len:,} exceeds the {limit:,} tokens the model reaches with "
            f"rope_scaling factor {spec.rope_factor:g}"
        )
    else:
        reason = (
            f"max_model_len {spec.max_model_len:,} exceeds the model's {spec.model.max_position_embeddings:,}-token "
            "context; longer contexts need model.rope_scaling"
        )
    raise Refusal("model.max_model_len", reason)


# The nearest layout that works -----------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    instances: int
    spec: PlanInput
    plan: InstancePlan = field(compare=False)

    def describe(self) -> str:
        s = self.spec
        quant = f" {s.quantization.upper()}" if s.quantization in ("awq", "gptq") else ""
        return (
            f"{self.instances} x TP{s.tensor_parallel_size}{quant} ({s.model.hf_id}, max_model_len "
            f"{s.max_model_len:,}): {self.plan.kv_tokens:,} KV tokens per instance, "
            f"{self.plan.concurrency} concurrent at {s.max_model_len:,} tokens"
        )


def nearest_working(spec: PlanInput, instances: int, gpu_count: int) -> Candidate | None:
    """The working layout closest to the asked one.

    Closeness, in order: keep the model and its precision, keep max_model_len, use the same
    number of GPUs, stay near the asked tensor parallel size, prefer more instances.
    """
    asked_gpus = instances * spec.tensor_parallel_size
    models = [spec.model]
    if spec.quantization is None:
        int4 = variant_of(spec.model, "awq")
        if int4 is not None:
            models.append(int4)
    found: list[tuple[tuple[int, ...], Candidate]] = []
    for model in models:
        for tp in TP_SIZES:
            if tp > gpu_count:
                continue
            for count in {min(instances, gpu_count // tp), gpu_count // tp}:
                if count < 1:
                    continue
                quantization = spec.quantization if model is spec.model else model.quantization
                trial = replace(spec, model=model, tensor_parallel_size=tp, quantization=quantization)
                candidate = _try(trial, count) or _try_shorter(trial, count)
                if candidate is None:
                    continue
                key = (
                    int(model is not spec.model),
                    int(candidate.spec.max_model_len != spec.max_model_len),
                    int(count * tp != asked_gpus),
                    abs(tp - spec.tensor_parallel_size),
                    -count,
                )
                found.append((key, candidate))
    if not found:
        return None
    found.sort(key=lambda item: item[0])
    best = found[0][1]
    if best.spec == spec and best.instances == instances:
        return None
    return best


def _try(spec: PlanInput, instances: int) -> Candidate | None:
    try:
        return Candidate(instances, spec, plan_instance(spec))
    except Refusal:
        return None


def _try_shorter(spec: PlanInput, instances: int) -> Candidate | None:
    """The same layout with the longest max_model_len (a multiple of 1024) that fits."""
    roomy = replace(spec, max_model_len=min(spec.max_model_len, 1024))
    try:
        plan = plan_instance(roomy)
    except Refusal:
        return None
    fit = min(plan.kv_tokens, native_context(spec), spec.max_model_len) // 1024 * 1024
    if fit < 1024:
        return None
    return _try(replace(spec, max_model_len=fit), instances)


def _gib(value: int) -> str:
    return f"{value / memory.GIB:.2f} GiB"
