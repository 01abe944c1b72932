"""Properties of the capacity planner over catalogue models, catalogue GPUs and random serving settings."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gpufleet.planner import memory
from gpufleet.planner.catalogue import ModelSpec, gpus, models
from gpufleet.planner.plan import TP_SIZES, InstancePlan, PlanInput, Refusal, plan_instance

KNOWN_KEYS = {"layout.tensor_parallel_size", "model.max_model_len", "serving.max_num_batched_tokens"}
FULL_PRECISION = sorted(m.id for m in models().values() if m.quantization is None)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


def valid_tps(model: ModelSpec) -> list[int]:
    return [tp for tp in TP_SIZES if model.num_attention_heads % tp == 0]


def try_plan(spec: PlanInput) -> InstancePlan | None:
    try:
        return plan_instance(spec)
    except Refusal:
        return None


@st.composite
def plan_inputs(draw: st.DrawFn, tp_must_divide_heads: bool = True) -> PlanInput:
    base = models()[draw(st.sampled_from(FULL_PRECISION), label="model")]
    quant = draw(st.sampled_from([None, "awq", "gptq"]), label="quantization")
    model = base
    if quant is not None:
        model = next(m for m in models().values() if m.base_id == base.id and m.quantization == quant)
    tp = draw(st.sampled_from(valid_tps(model) if tp_must_divide_heads else list(TP_SIZES)), label="tp")
    return PlanInput(
        model=model,
        gpu=gpus()[draw(st.sampled_from(sorted(gpus())), label="gpu")],
        tensor_parallel_size=tp,
        quantization=quant,
        dtype=draw(st.sampled_from(["bfloat16", "float16"])),
        kv_cache_dtype=draw(st.sampled_from(["auto", "fp8"]), label="kv_cache_dtype"),
        max_model_len=draw(st.integers(1024, model.max_position_embeddings), label="max_model_len"),
        rope_factor=None,
        gpu_memory_utilization=draw(st.floats(0.5, 0.98), label="utilization"),
        max_num_seqs=draw(st.integers(1, 1024), label="max_num_seqs"),
        max_num_batched_tokens=draw(st.integers(512, 16384), label="max_num_batched_tokens"),
        block_size=draw(st.sampled_from([8, 16, 32]), label="block_size"),
        enforce_eager=draw(st.booleans(), label="enforce_eager"),
    )


def kv_dtype_bytes(spec: PlanInput) -> int:
    return 1 if spec.kv_cache_dtype.startswith("fp8") else memory.DTYPE_BYTES[spec.dtype]


# More memory never hurts --------------------------------------------------------------------------


@SETTINGS
@given(spec=plan_inputs(), extra_mib=st.integers(1, 64 * 1024))
def test_more_gpu_memory_never_lowers_capacity(spec: PlanInput, extra_mib: int):
    small = try_plan(spec)
    bigger = replace(spec, gpu=replace(spec.gpu, memory_mib=spec.gpu.memory_mib + extra_mib))
    large = try_plan(bigger)
    if small is None:
        return
    assert large is not None, "fits with less memory but is refused with more"
    assert large.kv_tokens >= small.kv_tokens
    assert large.num_blocks >= small.num_blocks
    assert large.concurrency >= small.concurrency


@SETTINGS
@given(spec=plan_inputs(), step=st.floats(0.0, 0.48))
def test_higher_utilization_never_lowers_capacity(spec: PlanInput, step: float):
    higher = min(0.98, spec.gpu_memory_utilization + step)
    low = try_plan(spec)
    high = try_plan(replace(spec, gpu_memory_utilization=higher))
    if low is None:
        return
    assert high is not None, "fits at the lower utilization but is refused at the higher one"
    assert high.kv_tokens >= low.kv_tokens
    assert high.concurrency >= low.concurrency


# Tensor parallelism splits the weights ------------------------------------------------------------


@SETTINGS
@given(spec=plan_inputs())
def test_tp_splits_weights(spec: PlanInput):
    model, tp = spec.model, spec.tensor_parallel_size
    dtype_bytes = memory.DTYPE_BYTES[spec.dtype]
    per_gpu = memory.weight_bytes(model, tp, spec.quantization, dtype_bytes)
    whole = memory.weight_bytes(model, 1, spec.quantization, dtype_bytes)
    if 2 * tp in valid_tps(model):
        assert memory.weight_bytes(model, 2 * tp, spec.quantization, dtype_bytes) <= per_gpu
    # replicated norms and (past the KV head count) replicated k/v projections add a little
    assert whole <= per_gpu * tp + tp  # floor division of odd shards may lose a byte per GPU
    assert per_gpu * tp <= whole * 1.05
    plan = try_plan(spec)
    if plan is not None:
        assert plan.weight_bytes_per_gpu == per_gpu
        assert plan.model_weight_bytes == whole


# KV cache bytes per token -------------------------------------------------------------------------


@SETTINGS
@given(spec=plan_inputs())
def test_kv_bytes_per_token_bounds(spec: PlanInput):
    model, tp = spec.model, spec.tensor_parallel_size
    dtype = kv_dtype_bytes(spec)
    per_gpu = memory.kv_bytes_per_token(model, tp, dtype)
    one_head = 2 * model.num_hidden_layers * model.head_size * dtype
    raw = one_head * model.num_key_value_heads
    assert per_gpu >= one_head
    assert per_gpu * tp >= raw
    if tp <= model.num_key_value_heads:
        assert per_gpu * tp == raw  # split evenly, nothing replicated
    else:
        assert per_gpu == one_head  # one replicated head per GPU
    plan = try_plan(spec)
    if plan is not None:
        assert plan.kv_bytes_per_token_per_gpu == per_gpu
        assert plan.kv_bytes_per_token == per_gpu * tp


# Concurrency and blocks -------------------------------------------------------------------------


@SETTINGS
@given(spec=plan_inputs(), contexts=st.lists(st.integers(1, 262_144), min_size=2, max_size=6))
def test_concurrency_is_monotone_and_capped(spec: PlanInput, contexts: list[int]):
    plan = try_plan(spec)
    assume(plan is not None)
    assert plan is not None
    assert plan.kv_tokens % spec.block_size == 0
    assert plan.kv_tokens >= spec.max_model_len
    assert 1 <= plan.concurrency <= spec.max_num_seqs
    previous = None
    for context in sorted(contexts):
        now = plan.concurrency_at(context)
        assert 0 <= now <= spec.max_num_seqs
        if previous is not None:
            assert now <= previous
        previous = now
    assert plan.concurrency_at(1) == min(spec.max_num_seqs, plan.num_blocks)


# The budget adds up -----------------------------------------------------------------------------


@SETTINGS
@given(spec=plan_inputs())
def test_memory_budget_adds_up(spec: PlanInput):
    plan = try_plan(spec)
    assume(plan is not None)
    assert plan is not None
    assert plan.requested_bytes == int(spec.gpu.memory_bytes * spec.gpu_memory_utilization)
    assert plan.requested_bytes <= plan.gpu_total_bytes
    assert (
        plan.weight_bytes_per_gpu + plan.activation_bytes + plan.overhead_bytes + plan.kv_cache_bytes_per_gpu
        == plan.requested_bytes
    )
    assert plan.kv_cache_bytes_per_gpu > 0
    # the blocks fit in the KV budget, and the leftover is less than one more block
    block_bytes = plan.kv_bytes_per_token_per_gpu * plan.block_size
    assert plan.num_blocks * block_bytes <= plan.kv_cache_bytes_per_gpu < (plan.num_blocks + 1) * block_bytes


# Refusals ---------------------------------------------------------------------------------------


@SETTINGS
@given(
    spec=plan_inputs(tp_must_divide_heads=False),
    stretch=st.integers(0, 200_000),
    rope=st.sampled_from([None, 2.0, 4.0]),
)
def test_refusals_name_a_known_key(spec: PlanInput, stretch: int, rope: float | None):
    spec = replace(spec, max_model_len=spec.max_model_len + stretch, rope_factor=rope)
    try:
        plan = plan_instance(spec)
    except Refusal as refusal:
        assert refusal.key in KNOWN_KEYS
        assert refusal.reason
        assert str(refusal) == refusal.reason
        return
    assert spec.model.num_attention_heads % spec.tensor_parallel_size == 0
    limit = spec.model.max_position_embeddings * (rope or 1)
    assert spec.max_model_len <= limit
    assert plan.kv_tokens >= spec.max_model_len
