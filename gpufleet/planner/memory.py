"""GPU memory arithmetic for one engine instance, following how vLLM sizes its KV cache.

vLLM reserves `gpu_memory_utilization x total` on every GPU of an instance, loads its shard of
the weights, runs a profiling forward pass of `max_num_batched_tokens` tokens to measure the
activation peak, and gives what is left after weights, activations and non-torch memory (CUDA
context, NCCL, CUDA graphs) to the KV cache, in blocks of `block_size` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.planner.catalogue import ModelSpec

MIB = 1024 * 1024
GIB = 1024 * MIB

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}
# INT4 with group size 128: 4 bits per weight plus an fp16 scale and a 4-bit zero point per group
INT4_BYTES_PER_PARAM = 0.5 + 2 / 128 + 0.5 / 128
FP8_BYTES_PER_PARAM = 1.0

# Non-torch memory per GPU, as vLLM's profiler reports it for 7B-70B models (estimates: measure
# your own with the engine's startup log and adjust; see docs/capacity-planning.md).
CUDA_CONTEXT_BYTES = 512 * MIB
NCCL_BYTES = 256 * MIB  # communicator buffers and custom all-reduce, only with tensor parallelism
CUDA_GRAPH_BYTES = 512 * MIB  # captured decode graphs, unless enforce_eager


@dataclass(frozen=True)
class ParamCounts:
    """Parameters split by how they are stored: quantizable linear layers, and the rest."""

    linear: int
    other: int

    @property
    def total(self) -> int:
        return self.linear + self.other


def kv_heads_per_gpu(model: ModelSpec, tp: int) -> int:
    """KV heads each GPU holds: they are split across GPUs, and replicated once TP exceeds them."""
    return max(1, model.num_key_value_heads // tp)


def param_counts(model: ModelSpec, tp: int = 1) -> ParamCounts:
    """Parameters held by one GPU of a `tp`-way tensor-parallel instance (tp=1: the whole model)."""
    h, d, L = model.hidden_size, model.head_size, model.num_hidden_layers
    q_heads = model.num_attention_heads // tp
    kv_heads = kv_heads_per_gpu(model, tp)
    attention = h * q_heads * d + 2 * h * kv_heads * d + q_heads * d * h
    mlp = 3 * h * model.intermediate_size // tp
    linear = L * (attention + mlp)
    embeddings = model.vocab_size * h // tp * (1 if model.tie_word_embeddings else 2)
    biases = (q_heads + 2 * kv_heads) * d if model.attention_bias else 0
    norms = 2 * h
    other = embeddings + L * (biases + norms) + h
    return ParamCounts(linear=linear, other=other)


def linear_bytes_per_param(quantization: str | None, dtype_bytes: int) -> float:
    if quantization in ("awq", "gptq"):
        return INT4_BYTES_PER_PARAM
    if quantization == "fp8":
        return FP8_BYTES_PER_PARAM
    return float(dtype_bytes)


def weight_bytes(model: ModelSpec, tp: int, quantization: str | None, dtype_bytes: int) -> int:
    """Bytes of weights on one GPU of the instance (embeddings and norms stay in the model dtype)."""
    counts = param_counts(model, tp)
    return int(counts.linear * linear_bytes_per_param(quantization, dtype_bytes) + counts.other * dtype_bytes)


def kv_bytes_per_token(model: ModelSpec, tp: int, kv_dtype_bytes: int) -> int:
    """KV cache bytes one token takes on one GPU: 2 (K and V) x layers x KV heads x head size x dtype."""
    return 2 * model.num_hidden_layers * kv_heads_per_gpu(model, tp) * model.head_size * kv_dtype_bytes


def activation_peak_bytes(
    model: ModelSpec, tp: int, dtype_bytes: int, max_num_batched_tokens: int, max_num_seqs: int
) -> int:
    """Peak activation memory of vLLM's profiling run on one GPU.

    The profile run pushes `max_num_batched_tokens` tokens through one layer at a time: the
    residual stream and its normalised copy, the q/k/v projections and the MLP's gate/up output
    are alive together. The sampler then holds fp32 logits (and a softmax copy) over the full
    vocabulary for each of up to `max_num_seqs` requests.
    """
    h, d = model.hidden_size, model.head_size
    per_token = 2 * h + (model.num_attention_heads // tp + 2 * kv_heads_per_gpu(model, tp)) * d
    per_token += 3 * model.intermediate_size // tp
    layer_peak = max_num_batched_tokens * per_token * dtype_bytes
    requests = min(max_num_seqs, max_num_batched_tokens)
    logits = requests * model.vocab_size * 4 * 2
    return layer_peak + logits


def runtime_overhead_bytes(tp: int, enforce_eager: bool) -> int:
    """Memory outside torch's allocator: CUDA context, NCCL buffers, CUDA graphs."""
    total = CUDA_CONTEXT_BYTES
    if tp > 1:
        total += NCCL_BYTES
    if not enforce_eager:
        total += CUDA_GRAPH_BYTES
    return total
