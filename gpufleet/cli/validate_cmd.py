"""`gpufleet validate`: load, validate and plan the whole inventory, secrets included."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gpufleet.cli.main import console, inventory_argument
from gpufleet.fleet import Fleet, load_fleet


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "validate",
        help="check an inventory: schema, capacity plan and secrets, before any host is contacted",
        description="Check every host's merged variables against the schema, plan every GPU host, and "
        "check the gateway's API keys file. Exit 0 when valid, 2 with every problem listed when not.",
    )
    inventory_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.inventory)
    if args.json:
        print(json.dumps(summary(fleet), indent=2))
        return 0
    out = console()
    out.print(f"[green]valid[/green]: {fleet.inventory.hosts_file} — {len(fleet.hosts)} hosts, "
              f"{len(fleet.api_keys)} API keys")
    for host in fleet.hosts:
        roles = ", ".join(g for g in host.groups if g in ("gpu", "gateway", "monitoring"))
        line = f"  {host.name:<16} {roles:<22}"
        if host.plan is not None:
            plan = host.plan
            first = plan.instances[0].plan
            line += (f"{len(plan.instances)} x TP{plan.spec.tensor_parallel_size} {plan.model.hf_id} on "
                     f"{plan.gpu_count} x {plan.gpu.id}: {first.kv_tokens:,} KV tokens, "
                     f"{first.concurrency} concurrent at {first.max_model_len:,} per instance")
        out.print(line)
    return 0


def summary(fleet: Fleet) -> dict[str, Any]:
    return {
        "ok": True,
        "inventory": fleet.inventory.hosts_file,
        "hosts": [
            {"name": h.name, "groups": list(h.groups), "gpu_host": h.plan is not None} for h in fleet.hosts
        ],
        "api_keys": len(fleet.api_keys),
    }
