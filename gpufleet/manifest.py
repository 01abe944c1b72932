"""The manifest gpufleet leaves on each host: what it was configured and planned to run.

On-call engineers read /etc/gpufleet/host.json to see a host's intended engine flags, layout and
limits without the inventory at hand; it is rendered deterministically so an unchanged
configuration leaves the file, and the deploy, unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from gpufleet import __version__
from gpufleet.fleet import FleetHost

MANIFEST_PATH = "/etc/gpufleet/host.json"


def manifest(host: FleetHost) -> dict[str, Any]:
    data: dict[str, Any] = {
        "gpufleet_version": __version__,
        "host": host.name,
        "groups": [g for g in host.groups if g != "all"],
        "config": host.config.model_dump(mode="json", exclude_none=True),
    }
    if host.plan is not None:
        data["instances"] = [
            {
                "index": inst.index,
                "gpus": list(inst.gpus),
                "port": inst.port,
                "engine": host.plan.engine,
                "flags": list(inst.flags),
                "kv_tokens": inst.plan.kv_tokens,
                "concurrency_at_max_model_len": inst.plan.concurrency,
            }
            for inst in host.plan.instances
        ]
    return data


def render_manifest(host: FleetHost) -> str:
    return json.dumps(manifest(host), indent=2, sort_keys=True) + "\n"
