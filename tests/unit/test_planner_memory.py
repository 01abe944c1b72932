"""Exact numbers of the capacity planner, checked against published model facts and vLLM's formulas.

KV cache bytes per token per GPU (vLLM): 2 (K and V) x layers x max(1, kv_heads // tp) x head_dim x
kv dtype bytes. Parameter counts are the ones the model cards publish; weight bytes are the size
of the published safetensors checkpoints.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpufleet.planner import memory
from gpufleet.planner.catalogue import GpuSpec, ModelSpec, gpus, models
from gpufleet.planner.flags import tgi_flags, vllm_flags
from gpufleet.planner.plan import InstancePlan, PlanInput, Refusal, nearest_working, plan_instance
from gpufleet.schema.sections import Model, RopeScaling

QWEN7B = "qwen2.5-7b-instruct"


def model(model_id: str) -> ModelSpec:
    return models()[model_id]


def gpu(gpu_id: str) -> GpuSpec:
    return gpus()[gpu_id]


def make_input(
    model_id: str = QWEN7B,
    gpu_id: str = "rtx-4090d",
    tp: int = 1,
    **changes: object,
) -> PlanInput:
    """A PlanInput filled the way host.plan_input fills it for the seed serving settings."""
    spec = model(model_id)
    card = gpu(gpu_id)
    base = PlanInput(
        model=spec,
        gpu=card,
        tensor_parallel_size=tp,
        quantization=spec.quantization,
        dtype="bfloat16",
        kv_cache_dtype="auto",
        max_model_len=32768,
        rope_factor=None,
        gpu_memory_utilization=0.95,
        max_num_seqs=256,
        max_num_batched_tokens=8192 if card.large_batch_defaults else 2048,
        block_size=16,
        enforce_eager=False,
    )
    return replace(base, **changes)


def refusal_of(spec: PlanInput) -> Refusal:
    with pytest.raises(Refusal) as caught:
        plan_instance(spec)
    return caught.value


# KV cache bytes per token --------------------------------------------------------------------


def test_qwen7b_kv_bytes_per_token_at_tp4():
    # 28 layers x 4 KV heads x 128 head_dim x 2 (K, V) x 2 bytes (bf16)
    assert 28 * 4 * 128 * 2 * 2 == 57_344
    plan = plan_instance(make_input(tp=4))
    assert plan.kv_bytes_per_token == 57_344
    assert plan.kv_bytes_per_token_per_gpu == 14_336
    assert memory.kv_bytes_per_token(model(QWEN7B), 4, 2) == 14_336


def test_qwen7b_kv_bytes_per_token_at_tp1():
    plan = plan_instance(make_input(tp=1))
    assert plan.kv_bytes_per_token_per_gpu == 57_344
    assert plan.kv_bytes_per_token == 57_344


def test_qwen7b_kv_bytes_per_token_tp2():
    assert memory.kv_bytes_per_token(model(QWEN7B), 2, 2) == 28_672


def test_kv_heads_are_replicated_once_tp_exceeds_them():
    qwen = model(QWEN7B)  # 4 KV heads
    assert qwen.num_key_value_heads == 4
    assert memory.kv_heads_per_gpu(qwen, 4) == 1
    assert memory.kv_heads_per_gpu(qwen, 8) == 1  # not 0: each GPU keeps a replica of one KV head
    per_gpu_tp4 = memory.kv_bytes_per_token(qwen, 4, 2)
    per_gpu_tp8 = memory.kv_bytes_per_token(qwen, 8, 2)
    assert per_gpu_tp8 == per_gpu_tp4 == 14_336
    # across the instance: 8 GPUs each holding one replicated head is twice the 4-GPU instance
    assert per_gpu_tp8 * 8 == 2 * (per_gpu_tp4 * 4) == 114_688


def test_kv_head_replication_in_a_plan():
    # Qwen2.5-7B cannot run at TP8 (28 heads), so check replication through a plan with Llama-3.1-70B
    # (64 heads, 8 KV heads) at TP16: one KV head per GPU, twice the instance's bytes at TP8.
    tp8 = plan_instance(make_input("llama-3.1-70b-instruct", "h100-80gb", tp=8))
    tp16 = plan_instance(make_input("llama-3.1-70b-instruct", "h100-80gb", tp=16))
    assert tp8.kv_bytes_per_token_per_gpu == tp16.kv_bytes_per_token_per_gpu == 2 * 80 * 1 * 128 * 2
    assert tp16.kv_bytes_per_token == 2 * tp8.kv_bytes_per_token
    assert tp8.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2  # 327,680: the model's own per-token KV


def test_fp8_kv_cache_halves_bytes_per_token():
    auto = plan_instance(make_input(tp=4))
    fp8 = plan_instance(make_input(tp=4, kv_cache_dtype="fp8"))
    assert fp8.kv_bytes_per_token_per_gpu * 2 == auto.kv_bytes_per_token_per_gpu
    assert fp8.kv_bytes_per_token == 28_672
    # the same memory budget holds (about) twice the tokens
    assert fp8.kv_cache_bytes_per_gpu == auto.kv_cache_bytes_per_gpu
    assert abs(fp8.kv_tokens - 2 * auto.kv_tokens) <= 2 * auto.block_size
    for name in ("fp8_e4m3", "fp8_e5m2"):
        assert plan_instance(make_input(tp=4, kv_cache_dtype=name)).kv_bytes_per_token_per_gpu == 7_168


# Parameters and weights ------------------------------------------------------------------------


def test_qwen7b_parameter_count_and_weights():
    qwen = model(QWEN7B)
    params = memory.param_counts(qwen).total
    assert 7.55e9 < params < 7.65e9  # published: 7.61B
    assert abs(params - 7.61e9) / 7.61e9 < 0.005
    weights = memory.weight_bytes(qwen, 1, None, 2)
    # the published bf16 safetensors hold 15,230,967,808 bytes
    assert 15.1e9 < weights < 15.3e9
    assert abs(weights - 15_230_967_808) / 15_230_967_808 < 0.001
    plan = plan_instance(make_input(tp=4))
    assert plan.model_weight_bytes == weights
    assert 15.1e9 < plan.model_weight_bytes < 15.3e9


@pytest.mark.parametrize(
    ("model_id", "published"),
    [
        ("qwen2.5-7b-instruct", 7.61e9),
        ("qwen2.5-14b-instruct", 14.7e9),
        ("qwen2.5-32b-instruct", 32.8e9),
        ("qwen2.5-72b-instruct", 72.7e9),
        ("llama-3.1-8b-instruct", 8.03e9),
        ("llama-3.1-70b-instruct", 70.6e9),
        ("mistral-7b-instruct-v0.3", 7.25e9),
    ],
)
def test_published_parameter_counts(model_id: str, published: float):
    params = memory.param_counts(model(model_id)).total
    assert abs(params - published) / published < 0.015, f"{model_id}: {params / 1e9:.3f}B vs {published / 1e9}B"


@pytest.mark.parametrize("quant", ["awq", "gptq"])
def test_int4_qwen7b_weights(quant: str):
    variant_id = f"{QWEN7B}-{'awq' if quant == 'awq' else 'gptq-int4'}"
    variant = model(variant_id)
    assert variant.quantization == quant
    weights = memory.weight_bytes(variant, 1, quant, 2)
    assert 5.5e9 < weights < 5.7e9  # published AWQ checkpoint: about 5.58 GB
    plan = plan_instance(make_input(variant_id, tp=1))
    assert plan.model_weight_bytes == weights
    assert plan.weight_bytes_per_gpu == weights


def test_int4_keeps_embeddings_in_model_dtype():
    qwen = model(QWEN7B)
    counts = memory.param_counts(qwen)
    int4 = memory.weight_bytes(qwen, 1, "awq", 2)
    assert int4 == int(counts.linear * memory.INT4_BYTES_PER_PARAM + counts.other * 2)
    # the 2 x 152064 x 3584 embedding + lm_head stay bf16: about 2.18 GB of the 5.57 GB
    assert counts.other * 2 > 2.1e9


def test_fp8_weights_are_about_half_of_bf16():
    qwen = model(QWEN7B)
    bf16 = memory.weight_bytes(qwen, 1, None, 2)
    fp8 = memory.weight_bytes(qwen, 1, "fp8", 2)
    assert 0.5 * bf16 < fp8 < 0.65 * bf16


def test_tp_splits_the_weights():
    qwen = model(QWEN7B)
    whole = memory.weight_bytes(qwen, 1, None, 2)
    per_gpu = memory.weight_bytes(qwen, 4, None, 2)
    assert per_gpu * 4 >= whole  # norms are replicated, so never less
    assert per_gpu * 4 < whole * 1.01
    assert plan_instance(make_input(tp=4)).weight_bytes_per_gpu == per_gpu


# The memory budget ------------------------------------------------------------------------------


def test_budget_adds_up_for_qwen7b_on_4090d_tp4():
    spec = make_input(tp=4)
    plan = plan_instance(spec)
    total = 24564 * 1024 * 1024
    assert plan.gpu_total_bytes == total
    assert plan.requested_bytes == int(0.95 * total)
    assert plan.overhead_bytes == memory.CUDA_CONTEXT_BYTES + memory.NCCL_BYTES + memory.CUDA_GRAPH_BYTES
    assert (
        plan.weight_bytes_per_gpu + plan.activation_bytes + plan.overhead_bytes + plan.kv_cache_bytes_per_gpu
        == plan.requested_bytes
    )
    assert plan.num_blocks == plan.kv_cache_bytes_per_gpu // (16 * 14_336)
    assert plan.kv_tokens == plan.num_blocks * 16
    # about 18.5 GiB of KV cache per GPU: over a million tokens per instance
    assert 1_000_000 < plan.kv_tokens < 1_500_000
    assert plan.concurrency == min(256, plan.num_blocks // (32768 // 16))


def test_overhead_depends_on_tp_and_eager():
    assert memory.runtime_overhead_bytes(1, True) == memory.CUDA_CONTEXT_BYTES
    assert memory.runtime_overhead_bytes(1, False) == memory.CUDA_CONTEXT_BYTES + memory.CUDA_GRAPH_BYTES
    assert memory.runtime_overhead_bytes(2, True) == memory.CUDA_CONTEXT_BYTES + memory.NCCL_BYTES
    eager = plan_instance(make_input(tp=4, enforce_eager=True))
    graphs = plan_instance(make_input(tp=4))
    assert eager.kv_cache_bytes_per_gpu - graphs.kv_cache_bytes_per_gpu == memory.CUDA_GRAPH_BYTES


def test_activation_peak_grows_with_batched_tokens():
    small = plan_instance(make_input(tp=4, max_num_batched_tokens=2048))
    large = plan_instance(make_input(tp=4, max_num_batched_tokens=8192))
    assert large.activation_bytes > small.activation_bytes
    assert large.kv_cache_bytes_per_gpu < small.kv_cache_bytes_per_gpu


def test_concurrency_at_counts_whole_blocks():
    plan = InstancePlan(
        tensor_parallel_size=1, gpu_total_bytes=0, requested_bytes=0, weight_bytes_per_gpu=0,
        model_weight_bytes=0, activation_bytes=0, overhead_bytes=0, kv_cache_bytes_per_gpu=0,
        kv_bytes_per_token_per_gpu=1, num_blocks=100, block_size=16, max_model_len=4096, max_num_seqs=256,
    )
    assert plan.kv_tokens == 1600
    assert plan.concurrency_at(16) == 100
    assert plan.concurrency_at(17) == 50  # a 17-token request takes two blocks
    assert plan.concurrency_at(1600) == 1
    assert plan.concurrency_at(1601) == 0
    assert plan.concurrency == 0
    assert replace(plan, num_blocks=10_000, max_num_seqs=8).concurrency_at(16) == 8


# Refusals ---------------------------------------------------------------------------------------


def test_tp_that_does_not_divide_heads_is_refused():
    refusal = refusal_of(make_input(tp=8, gpu_id="h100-80gb"))  # 28 heads
    assert refusal.key == "layout.tensor_parallel_size"
    assert "28" in refusal.reason
    refusal = refusal_of(make_input("qwen2.5-14b-instruct", "h100-80gb", tp=16))  # 40 heads
    assert refusal.key == "layout.tensor_parallel_size"


def test_context_beyond_native_needs_rope_scaling():
    refusal = refusal_of(make_input(tp=4, max_model_len=32769))
    assert refusal.key == "model.max_model_len"
    assert "rope_scaling" in refusal.reason
    assert plan_instance(make_input(tp=4, max_model_len=32768)).max_model_len == 32768


def test_yarn_factor_4_allows_131072():
    plan = plan_instance(make_input(tp=4, max_model_len=131072, rope_factor=4.0))
    assert plan.max_model_len == 131072
    assert plan.kv_tokens >= 131072
    assert plan.concurrency >= 1
    refusal = refusal_of(make_input(tp=4, max_model_len=131073, rope_factor=4.0))
    assert refusal.key == "model.max_model_len"
    assert "131,072" in refusal.reason


def test_weights_that_do_not_fit_are_refused():
    refusal = refusal_of(make_input("qwen2.5-72b-instruct", "rtx-4090d", tp=1))
    assert refusal.key == "layout.tensor_parallel_size"
    assert "weights do not fit" in refusal.reason
    # 72B bf16 is still too big at TP4 on 24 GB cards (about 34 GiB per GPU)
    assert refusal_of(make_input("qwen2.5-72b-instruct", "rtx-4090d", tp=4)).key == "layout.tensor_parallel_size"


def test_kv_cache_smaller_than_one_request_is_refused():
    # Qwen2.5-32B AWQ (about 19.3 GB) on one 24 GB card leaves room for about 12.7k tokens
    refusal = refusal_of(make_input("qwen2.5-32b-instruct-awq", "rtx-4090d", tp=1, max_model_len=32768))
    assert refusal.key == "model.max_model_len"
    assert "32,768" in refusal.reason
    plan = plan_instance(make_input("qwen2.5-32b-instruct-awq", "rtx-4090d", tp=1, max_model_len=8192))
    assert 8192 <= plan.kv_tokens < 32768


def test_activations_that_use_the_kv_budget_are_refused():
    # weights fit, but a huge profiling batch leaves nothing for the KV cache
    refusal = refusal_of(make_input("qwen2.5-32b-instruct-awq", "rtx-4090d", tp=1, max_num_batched_tokens=65536))
    assert refusal.key == "serving.max_num_batched_tokens"


# nearest_working --------------------------------------------------------------------------------


def test_nearest_working_for_tp_not_dividing_heads():
    spec = make_input(tp=8, gpu_id="rtx-4090d")
    nearest = nearest_working(spec, instances=1, gpu_count=8)
    assert nearest is not None
    assert nearest.spec.tensor_parallel_size == 4
    assert nearest.instances == 2  # keeps using all 8 GPUs
    assert nearest.spec.model == spec.model
    plan_instance(nearest.spec)  # works
    text = nearest.describe()
    assert "2 x TP4" in text
    assert "Qwen/Qwen2.5-7B-Instruct" in text


def test_nearest_working_for_weights_that_do_not_fit_suggests_int4():
    spec = make_input("qwen2.5-72b-instruct", "rtx-4090d", tp=4)
    nearest = nearest_working(spec, instances=1, gpu_count=4)
    assert nearest is not None
    assert nearest.spec.quantization == "awq"
    assert nearest.spec.tensor_parallel_size == 4
    assert nearest.plan.kv_tokens >= spec.max_model_len
    assert "TP4 AWQ" in nearest.describe()


def test_nearest_working_for_too_long_context_shortens_it():
    spec = make_input("qwen2.5-32b-instruct-awq", "rtx-4090d", tp=1)
    nearest = nearest_working(spec, instances=1, gpu_count=1)
    assert nearest is not None
    assert nearest.spec.max_model_len < spec.max_model_len
    assert nearest.spec.max_model_len % 1024 == 0
    assert nearest.plan.kv_tokens >= nearest.spec.max_model_len
    assert f"max_model_len {nearest.spec.max_model_len:,}" in nearest.describe()
    assert "TP1" in nearest.describe()


def test_nearest_working_is_none_or_different_for_a_working_layout():
    for spec, instances, count in [
        (make_input(tp=4), 1, 4),
        (make_input(tp=4), 1, 8),
        (make_input(tp=1), 4, 4),
        (make_input("llama-3.1-70b-instruct", "h100-80gb", tp=8), 1, 8),
    ]:
        plan_instance(spec)
        nearest = nearest_working(spec, instances, count)
        assert nearest is None or (nearest.spec, nearest.instances) != (spec, instances)


def test_nearest_working_is_none_when_nothing_fits():
    # neither 72B bf16 nor its AWQ checkpoint fits on a single 24 GB card
    assert nearest_working(make_input("qwen2.5-72b-instruct", "rtx-4090d", tp=1), 1, 1) is None


# Engine flags -----------------------------------------------------------------------------------


def flag_value(flags: list[str], name: str) -> str:
    assert flags.count(name) == 1, f"{name} appears {flags.count(name)} times in {flags}"
    return flags[flags.index(name) + 1]


def test_vllm_flags_carry_the_plan():
    spec = make_input(tp=4, max_model_len=16384, max_num_seqs=64, max_num_batched_tokens=4096,
                      gpu_memory_utilization=0.9)
    plan = plan_instance(spec)
    setting = Model(name="Qwen/Qwen2.5-7B-Instruct", max_model_len=16384)
    flags = vllm_flags(spec, setting, "qwen7b")
    assert flag_value(flags, "--model") == "Qwen/Qwen2.5-7B-Instruct"
    assert flag_value(flags, "--served-model-name") == "qwen7b"
    assert flag_value(flags, "--tensor-parallel-size") == str(plan.tensor_parallel_size) == "4"
    assert flag_value(flags, "--max-model-len") == str(plan.max_model_len) == "16384"
    assert flag_value(flags, "--max-num-seqs") == str(plan.max_num_seqs) == "64"
    assert flag_value(flags, "--max-num-batched-tokens") == "4096"
    assert flag_value(flags, "--gpu-memory-utilization") == "0.9"
    assert flag_value(flags, "--block-size") == "16"
    assert "--quantization" not in flags
    assert "--kv-cache-dtype" not in flags
    assert "--enforce-eager" not in flags


def test_vllm_flags_for_awq_fp8_kv_eager_and_yarn():
    spec = make_input(f"{QWEN7B}-awq", tp=2, kv_cache_dtype="fp8", enforce_eager=True,
                      max_model_len=131072, rope_factor=4.0, gpu_id="h100-80gb")
    plan_instance(spec)
    setting = Model(
        name="Qwen/Qwen2.5-7B-Instruct-AWQ", max_model_len=131072, kv_cache_dtype="fp8",
        rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=32768),
    )
    flags = vllm_flags(spec, setting, "qwen")
    assert flag_value(flags, "--quantization") == "awq"
    assert flag_value(flags, "--kv-cache-dtype") == "fp8"
    assert "--enforce-eager" in flags
    overrides = flag_value(flags, "--hf-overrides")
    assert '"rope_type":"yarn"' in overrides
    assert '"factor":4.0' in overrides
    assert '"original_max_position_embeddings":32768' in overrides


def test_tgi_flags_carry_the_plan():
    spec = make_input(f"{QWEN7B}-awq", tp=2, max_model_len=16384, max_num_seqs=64, max_num_batched_tokens=4096)
    plan_instance(spec)
    setting = Model(name="Qwen/Qwen2.5-7B-Instruct-AWQ", max_model_len=16384)
    flags = tgi_flags(spec, setting, "qwen")
    assert flag_value(flags, "--model-id") == "Qwen/Qwen2.5-7B-Instruct-AWQ"
    assert flag_value(flags, "--num-shard") == "2"
    total = int(flag_value(flags, "--max-total-tokens"))
    max_input = int(flag_value(flags, "--max-input-tokens"))
    assert total == 16384
    assert 0 < max_input < total
    assert int(flag_value(flags, "--max-batch-prefill-tokens")) >= max_input
    assert flag_value(flags, "--max-concurrent-requests") == "64"
    assert flag_value(flags, "--quantize") == "awq"
    assert flag_value(flags, "--served-model-name") == "qwen"
    assert "--dtype" not in flags  # a quantized checkpoint chooses its own dtype


def test_tgi_flags_without_quantization():
    spec = make_input(tp=4)
    flags = tgi_flags(spec, Model(name="Qwen/Qwen2.5-7B-Instruct", max_model_len=32768, dtype="bfloat16"),
                      "Qwen/Qwen2.5-7B-Instruct")
    assert flag_value(flags, "--num-shard") == "4"
    assert "--quantize" not in flags
    assert flag_value(flags, "--dtype") == "bfloat16"
    assert "--served-model-name" not in flags  # same as the model id


# Configurations vLLM refuses at start-up ------------------------------------------------------


def test_batched_tokens_below_max_num_seqs_is_refused():
    refusal = refusal_of(make_input(tp=4, max_num_seqs=4096, max_num_batched_tokens=2048))
    assert refusal.key in ("serving.max_num_batched_tokens", "serving.max_num_seqs")


def test_int4_tp_that_splits_a_quantization_group_is_refused():
    refusal = refusal_of(make_input("qwen2.5-14b-instruct-awq", "rtx-4090d", tp=8))
    assert refusal.key == "layout.tensor_parallel_size"
