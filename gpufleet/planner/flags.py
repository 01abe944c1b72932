"""Engine command-line flags implied by a host's configuration and its capacity plan."""

from __future__ import annotations

import json

from gpufleet.planner.plan import PlanInput
from gpufleet.schema.sections import Model


def vllm_flags(spec: PlanInput, model: Model, served_name: str) -> list[str]:
    """`vllm serve` arguments (after the image's entrypoint)."""
    flags = [
        "--model", spec.model.hf_id,
        "--served-model-name", served_name,
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
        "--max-model-len", str(spec.max_model_len),
        "--max-num-seqs", str(spec.max_num_seqs),
        "--max-num-batched-tokens", str(spec.max_num_batched_tokens),
        "--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}",
        "--dtype", model.dtype,
        "--block-size", str(spec.block_size),
    ]
    if model.revision:
        flags += ["--revision", model.revision]
    if spec.quantization:
        flags += ["--quantization", spec.quantization]
    if model.kv_cache_dtype != "auto":
        flags += ["--kv-cache-dtype", model.kv_cache_dtype]
    if spec.enforce_eager:
        flags.append("--enforce-eager")
    if model.rope_scaling is not None:
        scaling = {
            "rope_type": model.rope_scaling.type,
            "factor": model.rope_scaling.factor,
            "original_max_position_embeddings": model.rope_scaling.original_max_position_embeddings,
        }
        flags += ["--hf-overrides", json.dumps({"rope_scaling": scaling}, separators=(",", ":"))]
    return flags


def tgi_flags(spec: PlanInput, model: Model, served_name: str) -> list[str]:
    """`text-generation-launcher` arguments: TGI's names for the same settings."""
    flags = [
        "--model-id", spec.model.hf_id,
        "--num-shard", str(spec.tensor_parallel_size),
        "--max-total-tokens", str(spec.max_model_len),
        "--max-input-tokens", str(spec.max_model_len - 1),
        "--max-batch-prefill-tokens", str(max(spec.max_num_batched_tokens, spec.max_model_len - 1)),
        "--max-concurrent-requests", str(spec.max_num_seqs),
        "--cuda-memory-fraction", f"{spec.gpu_memory_utilization:g}",
    ]
    if model.dtype != "auto" and not spec.quantization:
        flags += ["--dtype", model.dtype]
    if model.revision:
        flags += ["--revision", model.revision]
    if spec.quantization:
        flags += ["--quantize", spec.quantization]
    if model.kv_cache_dtype.startswith("fp8"):
        flags += ["--kv-cache-dtype", "fp8_e5m2" if model.kv_cache_dtype == "fp8_e5m2" else "fp8_e4m3fn"]
    if served_name != spec.model.hf_id:
        flags += ["--served-model-name", served_name]
    return flags


def engine_flags(kind: str, spec: PlanInput, model: Model, served_name: str) -> list[str]:
    # the simulator speaks vLLM's command line, so a sim fleet is deployed exactly like a vLLM one
    if kind == "tgi":
        return tgi_flags(spec, model, served_name)
    return vllm_flags(spec, model, served_name)
