"""`gpufleet sim serve`: run the engine simulator with vLLM's own command-line flags.

The serving role deploys the simulator with exactly the flags the capacity planner gives vLLM
(`--model`, `--max-model-len`, `--gpu-memory-utilization`, ...), so a simulated fleet is
configured like a real one. Settings not given come from the performance profile's `engine:`
layout, then from vLLM's defaults. The KV cache size (num_gpu_blocks) comes from
`--num-gpu-blocks-override`, else from the capacity planner for `--gpu`, else from the profile.

Bad flags or values exit 2 with argparse's `error:` line, before anything is started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from gpufleet.planner.catalogue import find_model, gpus
from gpufleet.planner.plan import PlanInput, Refusal, plan_instance
from gpufleet.sim.faults import DEFAULT_HANG_HEALTH_TIMEOUT_S, FaultSettings
from gpufleet.sim.types import SimConfig

DEFAULT_PROFILE = "rtx4090d-tp4-qwen2.5-7b"
DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
# vLLM's OpenAI-server defaults (V1): 256 sequences, 2048 batched tokens (8192 on >= 70 GiB GPUs)
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_BATCHED_TOKENS = 2048
DEFAULT_BLOCK_SIZE = 16
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
QUANTIZATIONS = ("awq", "awq_marlin", "gptq", "gptq_marlin", "fp8", "compressed-tensors", "bitsandbytes", "marlin")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)


def register(commands: Any) -> None:
    sim = commands.add_parser(
        "sim",
        help="run gpufleet's engine simulator (a labelled stand-in for vLLM/TGI on machines without GPUs)",
        description="gpufleet's engine simulator: speaks vLLM's or TGI's HTTP API and metrics with timing "
        "from a performance profile. It is a stand-in for tests and drills, never an inference engine.",
    )
    actions = sim.add_subparsers(dest="sim_command", metavar="ACTION", required=True)
    serve = actions.add_parser(
        "serve",
        help="serve the simulated engine on a port, configured with vLLM's flags",
        description="Serve the simulator. Takes vLLM's engine flags so it is deployed with the same spec as "
        "vLLM; the port refuses connections until the simulated model has loaded.",
    )
    _add_flags(serve)
    serve.set_defaults(handler=run, sim_parser=serve)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _utilization(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return value


def _add_flags(parser: argparse.ArgumentParser) -> None:
    vllm = parser.add_argument_group("vLLM engine and server flags (same names and meaning as `vllm serve`)")
    vllm.add_argument("--model", help=f"Hugging Face id of the model (nothing is downloaded); default: the "
                      f"profile's, else {DEFAULT_MODEL}")
    vllm.add_argument("--served-model-name", nargs="+", metavar="NAME",
                      help="names the API accepts as `model`; the first is the metrics' model_name")
    vllm.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, metavar="N")
    vllm.add_argument("--max-model-len", type=_positive_int, metavar="TOKENS")
    vllm.add_argument("--max-num-seqs", type=_positive_int, metavar="N")
    vllm.add_argument("--max-num-batched-tokens", type=_positive_int, metavar="TOKENS")
    vllm.add_argument("--gpu-memory-utilization", type=_utilization, metavar="FRACTION")
    vllm.add_argument("--block-size", type=int, choices=BLOCK_SIZES)
    vllm.add_argument("--dtype", choices=DTYPES, default="auto")
    vllm.add_argument("--quantization", "-q", choices=QUANTIZATIONS)
    vllm.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    vllm.add_argument("--hf-overrides", metavar="JSON", help="JSON object; its rope_scaling.factor feeds the planner")
    vllm.add_argument("--enforce-eager", action="store_true")
    vllm.add_argument("--revision", help="accepted for parity with vLLM; nothing is downloaded")
    vllm.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    vllm.add_argument("--port", type=_port, default=8000)
    vllm.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 (default: $VLLM_API_KEY); "
                      "prefer --api-key-file, which keeps the key out of the process list")
    vllm.add_argument("--api-key-file", type=Path, metavar="PATH", help="read the API key from this file")

    sim = parser.add_argument_group("simulator flags")
    sim.add_argument("--profile", default=DEFAULT_PROFILE,
                     help=f"performance profile name or YAML path (default: {DEFAULT_PROFILE})")
    sim.add_argument("--gpu", help="GPU catalogue id (e.g. rtx-4090d): size the KV cache with the capacity planner")
    sim.add_argument("--num-gpu-blocks-override", type=_positive_int, metavar="BLOCKS",
                     help="KV cache blocks per instance (as vLLM's flag of that name)")
    sim.add_argument("--seed", type=int, default=0, help="seed of the output text, lengths and injected errors")
    sim.add_argument("--api", choices=("vllm", "tgi"), default="vllm", help="which engine's HTTP API to speak")
    sim.add_argument("--max-concurrent-requests", type=_positive_int, default=128, metavar="N",
                     help="TGI: requests in flight before answering 429 (default: 128)")
    sim.add_argument("--token-log-tokens", type=_non_negative_int, default=200_000, metavar="N",
                     help="tokens of recent requests kept for GET /admin/token-log (0: off)")

    faults = parser.add_argument_group("fault injection (also settable at run time: POST /admin/faults)")
    faults.add_argument("--startup-delay", type=_non_negative_float, metavar="SECONDS",
                        help="simulated model load time before the port is bound (default: the profile's)")
    faults.add_argument("--crash-after-requests", type=_non_negative_int, metavar="N",
                        help="exit non-zero, dropping all connections, after answering N generation requests")
    faults.add_argument("--crash-after-seconds", type=_non_negative_float, metavar="SECONDS",
                        help="exit non-zero SECONDS after the port is bound")
    faults.add_argument("--added-latency-ms", type=_non_negative_float, default=0.0, metavar="MS",
                        help="added to every engine step, so to every token of every running request")
    faults.add_argument("--added-request-latency-ms", type=_non_negative_float, default=0.0, metavar="MS",
                        help="added once per request before it reaches the engine")
    faults.add_argument("--error-rate", type=_fraction, default=0.0, metavar="FRACTION",
                        help="fraction of generation requests answered with a 500 (seeded by --seed)")
    faults.add_argument("--hang-after-requests", type=_non_negative_int, metavar="N",
                        help="pause the engine after answering N generation requests")
    faults.add_argument("--hang-health-timeout", type=_non_negative_float, default=DEFAULT_HANG_HEALTH_TIMEOUT_S,
                        metavar="SECONDS", help="a hang this long makes /health 503, like vLLM's dead engine "
                        f"(default: {DEFAULT_HANG_HEALTH_TIMEOUT_S:g}; inf: never)")


def run(args: argparse.Namespace) -> int:
    from gpufleet.sim.server import serve

    parser: argparse.ArgumentParser = args.sim_parser
    try:
        options = build_options(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    return asyncio.run(serve(options))


def build_options(args: argparse.Namespace) -> Any:
    """Resolve the flags against the profile and the planner; ValueError for anything vLLM would refuse."""
    from gpufleet.sim.profile import load_profile
    from gpufleet.sim.server import ServeOptions

    profile = load_profile(args.profile)  # ConfigError (exit 2) for an unknown profile
    layout: dict[str, Any] = dict(profile.engine)
    model = args.model or layout.get("model") or DEFAULT_MODEL
    same_model = args.model is None or args.model == layout.get("model")
    if args.served_model_name:
        served = tuple(args.served_model_name)
    elif same_model and layout.get("served_model_name"):
        served = (layout["served_model_name"],)
    else:
        served = (model,)

    def pick(flag: Any, key: str, default: Any) -> Any:
        if flag is not None:
            return flag
        return layout.get(key, default) if same_model else default

    spec = find_model(model)
    tp = pick(args.tensor_parallel_size, "tensor_parallel_size", 1)
    max_model_len = pick(args.max_model_len, "max_model_len", spec.max_position_embeddings if spec else None)
    if max_model_len is None:
        raise ValueError(f"--max-model-len is required: {model} is not in the capacity planner's catalogue")
    max_num_seqs = pick(args.max_num_seqs, "max_num_seqs", DEFAULT_MAX_NUM_SEQS)
    gpu = _gpu(args.gpu)
    default_batched = max(8192 if gpu is not None and gpu.large_batch_defaults else DEFAULT_BATCHED_TOKENS,
                          max_num_seqs)
    batched = pick(args.max_num_batched_tokens, "max_num_batched_tokens", default_batched)
    if batched < max_num_seqs:
        raise ValueError(f"max_num_batched_tokens ({batched}) must be greater than or equal to max_num_seqs "
                         f"({max_num_seqs})")
    block_size = pick(args.block_size, "block_size", DEFAULT_BLOCK_SIZE)
    utilization = pick(args.gpu_memory_utilization, "gpu_memory_utilization", DEFAULT_GPU_MEMORY_UTILIZATION)
    rope_factor = _rope_factor(args.hf_overrides)

    if args.num_gpu_blocks_override is not None:
        blocks = args.num_gpu_blocks_override
    elif gpu is not None:
        blocks = _planned_blocks(args, model, gpu, tp, max_model_len, max_num_seqs, batched, block_size, utilization,
                                 rope_factor)
    elif "num_gpu_blocks" in layout:
        blocks = layout["num_gpu_blocks"]
    else:
        raise ValueError(f"cannot size the KV cache: profile {profile.name!r} gives no num_gpu_blocks; pass --gpu "
                         "(sized by the capacity planner) or --num-gpu-blocks-override")
    if blocks * block_size < max_model_len:
        raise ValueError(
            f"The model's max seq len ({max_model_len}) is larger than the maximum number of tokens that can be "
            f"stored in KV cache ({blocks * block_size}). Try increasing gpu_memory_utilization or decreasing "
            "max_model_len when initializing the engine."
        )
    config = SimConfig(
        model=model, served_model_name=served[0], max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=batched, block_size=block_size, num_gpu_blocks=blocks,
        gpu_memory_utilization=utilization, tensor_parallel_size=tp, seed=args.seed,
    )
    faults = FaultSettings(
        startup_delay_s=args.startup_delay,
        crash_after_requests=args.crash_after_requests,
        crash_after_seconds=args.crash_after_seconds,
        added_latency_ms=args.added_latency_ms,
        added_request_latency_ms=args.added_request_latency_ms,
        error_rate=args.error_rate,
        hang_after_requests=args.hang_after_requests,
        hang_health_timeout_s=args.hang_health_timeout,
    )
    return ServeOptions(
        config=config, profile=profile.name, served_names=served, api=args.api, host=args.host, port=args.port,
        api_key=_api_key(args), faults=faults, max_concurrent_requests=args.max_concurrent_requests,
        cache_dtype=args.kv_cache_dtype, num_gpu_blocks_override=args.num_gpu_blocks_override,
        token_log_tokens=args.token_log_tokens, profile_source=args.profile,
    )


def _gpu(gpu_id: str | None) -> Any:
    if gpu_id is None:
        return None
    catalogue = gpus()
    if gpu_id not in catalogue:
        raise ValueError(f"--gpu {gpu_id!r} is not in the GPU catalogue; known: {', '.join(sorted(catalogue))}")
    return catalogue[gpu_id]


def _rope_factor(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--hf-overrides is not valid JSON: {exc}") from None
    if not isinstance(overrides, dict):
        raise ValueError("--hf-overrides must be a JSON object")
    scaling = overrides.get("rope_scaling")
    if isinstance(scaling, dict) and isinstance(scaling.get("factor"), int | float):
        return float(scaling["factor"])
    return None


def _planned_blocks(args: argparse.Namespace, model: str, gpu: Any, tp: int, max_model_len: int, max_num_seqs: int,
                    batched: int, block_size: int, utilization: float, rope_factor: float | None) -> int:
    """num_gpu_blocks as the capacity planner computes it for this layout on `gpu`."""
    spec = find_model(model)
    if spec is None:
        raise ValueError(f"{model} is not in the capacity planner's catalogue, so --gpu cannot size its KV cache; "
                         "pass --num-gpu-blocks-override")
    quantization = (args.quantization or "").replace("_marlin", "") or spec.quantization
    if quantization not in (None, "awq", "gptq", "fp8"):
        raise ValueError(f"the capacity planner cannot size --quantization {args.quantization}; "
                         "pass --num-gpu-blocks-override")
    dtype = {"auto": spec.torch_dtype, "half": "float16", "float": "float32"}.get(args.dtype, args.dtype)
    try:
        plan = plan_instance(PlanInput(
            model=spec, gpu=gpu, tensor_parallel_size=tp, quantization=quantization, dtype=dtype,
            kv_cache_dtype=args.kv_cache_dtype, max_model_len=max_model_len, rope_factor=rope_factor,
            gpu_memory_utilization=utilization, max_num_seqs=max_num_seqs, max_num_batched_tokens=batched,
            block_size=block_size, enforce_eager=args.enforce_eager,
        ))
    except Refusal as refusal:
        raise ValueError(f"the capacity planner refuses this layout on {gpu.id}: {refusal.reason}") from None
    return plan.num_blocks


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"--api-key-file {args.api_key_file}: {exc.strerror or exc}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return args.api_key or os.environ.get("VLLM_API_KEY") or None
