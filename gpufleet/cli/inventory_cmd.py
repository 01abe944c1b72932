"""`gpufleet inventory`: show hosts, groups and a host's merged variables with where each came from."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gpufleet.cli.main import console, inventory_argument
from gpufleet.inventory import InventoryHost, load_inventory
from gpufleet.suggest import hint


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "inventory",
        help="show groups and hosts, or one host's merged variables and their origins",
        description="Like ansible-inventory: list groups and hosts, or with --host show the host's "
        "merged variables, each with the file and line that set it.",
    )
    inventory_argument(parser)
    parser.add_argument("--host", help="show this host's merged variables")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    if args.host is None:
        groups = {name: [h.name for h in inventory.hosts_in(name)] for name in inventory.groups}
        if args.json:
            print(json.dumps(groups, indent=2))
        else:
            for name, members in groups.items():
                console().print(f"{name}: {', '.join(members) or '-'}")
        return 0
    host = inventory.hosts.get(args.host)
    if host is None:
        console().print(f"error: no host {args.host!r} in {inventory.hosts_file}\n"
                        f"  fix: {hint(args.host, inventory.hosts, 'host')}")
        return 2
    if args.json:
        print(json.dumps({"groups": host.groups, "vars": host.vars, "origins": _origins(host)}, indent=2))
        return 0
    out = console()
    out.print(f"{host.name} (groups: {', '.join(host.groups)})")
    for path, value, origin in _leaves(host):
        out.print(f"  {path} = {json.dumps(value)}  [dim]# {origin}[/dim]")
    return 0


def _origins(host: InventoryHost) -> dict[str, str]:
    return {".".join(path): f"{o.file}:{o.line}" if o.line else o.file for path, o in host.origins.items()}


def _leaves(host: InventoryHost, value: Any = None, path: tuple[str, ...] = ()):
    value = host.vars if not path else value
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(host, item, (*path, str(key)))
        return
    origin = host.origin_of(path)
    where = (f"{origin.file}:{origin.line}" if origin.line else origin.file) if origin else "?"
    yield ".".join(path), value, where
