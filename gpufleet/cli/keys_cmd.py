"""`gpufleet keys`: issue gateway API keys into the inventory's keys file (mode 0600)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gpufleet.apikeys import add_api_key, read_api_keys
from gpufleet.cli.main import inventory_argument
from gpufleet.fleet import load_fleet


def register(commands: Any) -> None:
    parser = commands.add_parser("keys", help="manage the gateway's API keys",
                                 description="Manage the API keys clients send to the gateway.")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="issue a key for a client and print it once",
                         description="Append a new random key for CLIENT to the file named by "
                         "gateway.api_keys_file (created with mode 0600) and print the key.")
    inventory_argument(add)
    add.add_argument("client", help="a name for the client, one word, e.g. web-frontend")
    add.add_argument("--replace", action="store_true", help="replace the client's existing key")
    add.set_defaults(handler=run_add)
    listing = sub.add_parser("list", help="list the client names that have keys (never the keys)")
    inventory_argument(listing)
    listing.set_defaults(handler=run_list)


def _keys_path(args: argparse.Namespace):
    fleet = load_fleet(args.inventory, check_secrets=False)
    gateways = [h for h in fleet.in_group("gateway") if h.config.gateway is not None]
    if not gateways:
        print(f"error: {fleet.inventory.hosts_file}: no host is in the 'gateway' group, so there is no "
              "API keys file\n  fix: add a gateway host to hosts.yml", file=sys.stderr)
        return None
    assert gateways[0].config.gateway is not None
    return (fleet.root / gateways[0].config.gateway.api_keys_file).resolve()


def run_add(args: argparse.Namespace) -> int:
    path = _keys_path(args)
    if path is None:
        return 2
    try:
        key = add_api_key(path, args.client, replace=args.replace)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"added a key for {args.client} to {path} (mode 0600); it is shown only now:", file=sys.stderr)
    print(key)
    return 0


def run_list(args: argparse.Namespace) -> int:
    path = _keys_path(args)
    if path is None:
        return 2
    for key in read_api_keys(path):
        print(key.name)
    return 0
