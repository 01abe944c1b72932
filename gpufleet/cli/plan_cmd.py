"""`gpufleet plan`: the capacity plan of every GPU host, and the layouts it could use instead."""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.table import Table

from gpufleet.cli.main import console
from gpufleet.fleet import FleetHost, load_fleet
from gpufleet.planner import memory
from gpufleet.planner.catalogue import gpus, models
from gpufleet.planner.host import HostPlan, LayoutOption, layout_options
from gpufleet.planner.plan import InstancePlan
from gpufleet.suggest import hint


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "plan",
        help="show the capacity plan: memory per GPU, KV cache, concurrency and engine flags",
        description="Plan every GPU host of an inventory as vLLM would size it: weights per GPU, "
        "activation peak and runtime overhead, the KV cache left at gpu_memory_utilization, how many "
        "requests fit at max_model_len, and the engine flags. A layout that cannot work is refused "
        "with its reason and the nearest layout that does (exit 2).",
    )
    parser.add_argument("inventory", type=Path, nargs="?", help="inventory folder, e.g. inventories/example")
    parser.add_argument("--host", help="plan only this host")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (sizes in bytes)")
    parser.add_argument("--catalogue", action="store_true", help="list the models and GPUs the planner knows")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.catalogue:
        return _show_catalogue(args.json)
    if args.inventory is None:
        console().print("error: give an inventory folder (e.g. inventories/example) or --catalogue")
        return 2
    fleet = load_fleet(args.inventory, check_secrets=False)
    hosts = [h for h in fleet.hosts if h.plan is not None]
    if args.host:
        names = [h.name for h in hosts]
        if args.host not in names:
            console().print(f"error: {args.host!r} is not a GPU host of {fleet.inventory.hosts_file}\n"
                            f"  fix: {hint(args.host, names, 'GPU host')}")
            return 2
        hosts = [h for h in hosts if h.name == args.host]
    if args.json:
        print(json.dumps({"inventory": fleet.inventory.hosts_file,
                          "hosts": [_host_json(h, fleet.root) for h in hosts]}, indent=2))
        return 0
    out = console()
    out.print(f"Capacity plan for {fleet.inventory.hosts_file}")
    if not hosts:
        out.print("no host is in the 'gpu' group: nothing to plan")
    for names, host in _group_same(hosts):
        _print_host(out, names, host, fleet.root)
    return 0


def _group_same(hosts: list[FleetHost]) -> list[tuple[list[str], FleetHost]]:
    """Hosts whose plans are identical are shown once."""
    groups: list[tuple[list[str], FleetHost]] = []
    for host in hosts:
        for names, first in groups:
            if first.plan == _same_plan(host.plan, first.plan):
                names.append(host.name)
                break
        else:
            groups.append(([host.name], host))
    return groups


def _same_plan(plan: HostPlan | None, other: HostPlan | None) -> HostPlan | None:
    if plan is None or other is None:
        return plan
    return replace(plan, host=other.host)


def _gib(value: float) -> str:
    return f"{value / memory.GIB:.2f}"


def _print_host(out: Any, names: list[str], host: FleetHost, root: Path) -> None:
    plan = host.plan
    assert plan is not None
    spec, first = plan.spec, plan.instances[0].plan
    precision = spec.quantization.upper() if spec.quantization else spec.dtype
    out.print()
    out.print(f"[bold]{', '.join(names)}[/bold]: {plan.gpu_count} x {plan.gpu.name} ({_gib(first.gpu_total_bytes)} GiB)"
              f" · {plan.engine} · {spec.model.hf_id} ({precision})")
    kv_heads = memory.kv_heads_per_gpu(spec.model, spec.tensor_parallel_size)
    kv_dtype = first.kv_bytes_per_token_per_gpu // (2 * spec.model.num_hidden_layers * kv_heads * spec.model.head_size)
    out.print(f"  model weights: {first.model_weight_bytes / 1e9:.2f} GB ({_gib(first.model_weight_bytes)} GiB)")
    out.print(f"  KV cache per token: {first.kv_bytes_per_token:,} B across the instance; "
              f"{first.kv_bytes_per_token_per_gpu:,} B per GPU = 2 (K,V) x {spec.model.num_hidden_layers} layers x "
              f"{kv_heads} KV head{'s' if kv_heads > 1 else ''} x {spec.model.head_size} x {kv_dtype} B")
    out.print(f"  per GPU (GiB): {_gib(first.requested_bytes)} usable ({spec.gpu_memory_utilization:g} x "
              f"{_gib(first.gpu_total_bytes)}) = weights {_gib(first.weight_bytes_per_gpu)} + activations "
              f"{_gib(first.activation_bytes)} + runtime {_gib(first.overhead_bytes)} + KV cache "
              f"{_gib(first.kv_cache_bytes_per_gpu)}")
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 2))
    for column in ("instance", "GPUs", "port", "TP", "KV blocks", "KV tokens", f"concurrent @ {spec.max_model_len:,}"):
        table.add_column(column, justify="right" if column not in ("GPUs",) else "left")
    for inst in plan.instances:
        table.add_row(str(inst.index), ",".join(map(str, inst.gpus)), str(inst.port), str(spec.tensor_parallel_size),
                      f"{inst.plan.num_blocks:,}", f"{inst.plan.kv_tokens:,}", str(inst.plan.concurrency))
    out.print(table)
    contexts = sorted({c for c in (4096, 8192, 32768) if c < spec.max_model_len} | {spec.max_model_len})
    out.print("  concurrency per instance by context: "
              + ", ".join(f"{first.concurrency_at(c)} @ {c:,}" for c in contexts)
              + f" (max_num_seqs {spec.max_num_seqs})")
    command = "vllm serve" if plan.engine != "tgi" else "text-generation-launcher"
    out.print(f"  engine flags: {command} {shlex.join(plan.instances[0].flags)}", soft_wrap=True)
    for note in plan.notes:
        out.print(f"  [yellow]note[/yellow]: {note}")
    _print_layouts(out, layout_options(host.name, host.config, root), spec.max_model_len)


def _print_layouts(out: Any, options: list[LayoutOption], max_len: int) -> None:
    out.print(f"  layouts for this host at max_model_len {max_len:,} (* = configured):")
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 4))
    for column in ("layout", "weights", "weights/GPU GiB", "KV/GPU GiB", "KV tokens", "concurrent", "verdict"):
        table.add_column(column, justify="left" if column in ("layout", "weights", "verdict") else "right")
    for opt in options:
        label = f"{'*' if opt.configured else ' '}{opt.instances} x TP{opt.tensor_parallel_size}"
        precision = (opt.model.quantization or "bf16").upper() if opt.model.quantization else "bf16"
        if opt.plan is None:
            table.add_row(label, precision, "", "", "", "", f"[red]refused[/red]: {opt.refusal}")
        else:
            p = opt.plan
            table.add_row(label, precision, _gib(p.weight_bytes_per_gpu), _gib(p.kv_cache_bytes_per_gpu),
                          f"{p.kv_tokens:,}", f"{p.concurrency} x {opt.instances}", "fits")
    out.print(table)


def _instance_json(plan: InstancePlan) -> dict[str, Any]:
    return {
        "tensor_parallel_size": plan.tensor_parallel_size,
        "gpu_total_bytes": plan.gpu_total_bytes,
        "usable_bytes_per_gpu": plan.requested_bytes,
        "model_weight_bytes": plan.model_weight_bytes,
        "weight_bytes_per_gpu": plan.weight_bytes_per_gpu,
        "activation_bytes_per_gpu": plan.activation_bytes,
        "runtime_overhead_bytes_per_gpu": plan.overhead_bytes,
        "kv_cache_bytes_per_gpu": plan.kv_cache_bytes_per_gpu,
        "kv_bytes_per_token_per_gpu": plan.kv_bytes_per_token_per_gpu,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "kv_blocks": plan.num_blocks,
        "kv_tokens": plan.kv_tokens,
        "concurrency_at_max_model_len": plan.concurrency,
    }


def _host_json(host: FleetHost, root: Path) -> dict[str, Any]:
    plan = host.plan
    assert plan is not None
    spec = plan.spec
    return {
        "host": host.name,
        "gpu": {"model": plan.gpu.id, "name": plan.gpu.name, "count": plan.gpu_count,
                "memory_bytes": plan.gpu.memory_bytes},
        "engine": plan.engine,
        "model": {"name": spec.model.hf_id, "served_name": plan.served_name, "dtype": spec.dtype,
                  "quantization": spec.quantization, "kv_cache_dtype": spec.kv_cache_dtype},
        "engine_settings": {
            "tensor_parallel_size": spec.tensor_parallel_size,
            "max_model_len": spec.max_model_len,
            "max_num_seqs": spec.max_num_seqs,
            "max_num_batched_tokens": spec.max_num_batched_tokens,
            "gpu_memory_utilization": spec.gpu_memory_utilization,
            "block_size": spec.block_size,
        },
        "instances": [
            {"index": inst.index, "gpus": list(inst.gpus), "port": inst.port, "flags": list(inst.flags),
             **_instance_json(inst.plan)}
            for inst in plan.instances
        ],
        "notes": list(plan.notes),
        "layouts": [
            {"instances": o.instances, "tensor_parallel_size": o.tensor_parallel_size, "model": o.model.hf_id,
             "quantization": o.model.quantization, "configured": o.configured, "refused": o.refusal,
             **(_instance_json(o.plan) if o.plan else {})}
            for o in layout_options(host.name, host.config, root)
        ],
    }


def _show_catalogue(as_json: bool) -> int:
    if as_json:
        print(json.dumps({
            "models": {k: {"hf_id": m.hf_id, "quantization": m.quantization, "layers": m.num_hidden_layers,
                           "attention_heads": m.num_attention_heads, "kv_heads": m.num_key_value_heads,
                           "max_position_embeddings": m.max_position_embeddings,
                           "parameters": memory.param_counts(m).total} for k, m in models().items()},
            "gpus": {k: {"name": g.name, "memory_mib": g.memory_mib, "architecture": g.architecture}
                     for k, g in gpus().items()},
        }, indent=2))
        return 0
    out = console()
    table = Table(title="models")
    for column in ("id", "Hugging Face repo", "params", "weights", "layers", "heads/KV", "context"):
        table.add_column(column)
    for key, m in models().items():
        params = memory.param_counts(m)
        size = memory.weight_bytes(m, 1, m.quantization, 2)
        table.add_row(key, m.hf_id, f"{params.total / 1e9:.2f}B", f"{size / 1e9:.1f} GB",
                      str(m.num_hidden_layers), f"{m.num_attention_heads}/{m.num_key_value_heads}",
                      f"{m.max_position_embeddings:,}")
    out.print(table)
    gtable = Table(title="GPUs")
    for column in ("id", "name", "memory", "architecture", "bandwidth"):
        gtable.add_column(column)
    for key, g in gpus().items():
        gtable.add_row(key, g.name, f"{g.memory_mib:,} MiB", g.architecture, f"{g.memory_bandwidth_gb_s:g} GB/s")
    out.print(gtable)
    return 0
