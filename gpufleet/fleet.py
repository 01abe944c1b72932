"""Load a fleet: read the inventory, validate every host, plan every GPU host.

This is the single way configuration enters gpufleet: the CLI, the pyinfra inventory adapter
and the roles, the gateway, monitoring and load tests all start from `load_fleet`. It
either returns a fully validated, planned fleet or raises one `ConfigError` listing every
problem, before any host is contacted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from gpufleet.apikeys import ApiKey, read_api_keys
from gpufleet.errors import ConfigError, Problem
from gpufleet.inventory import Inventory, InventoryHost, Origin, load_inventory
from gpufleet.monitoring.targets import target_problems
from gpufleet.paths import ROLES_DIR, display_path
from gpufleet.planner.gateway import GatewayPlan, api_key_problems, plan_gateways
from gpufleet.planner.host import HostPlan, HostRefusal, plan_host
from gpufleet.schema.host import REQUIRED_BY_GROUP, ROLE_GROUPS, HostVars
from gpufleet.schema.validate import validate_host
from gpufleet.secretfiles import with_hf_tokens


@dataclass(frozen=True)
class FleetHost:
    name: str
    groups: tuple[str, ...]
    config: HostVars
    plan: HostPlan | None  # GPU hosts only
    source: InventoryHost
    gateway: GatewayPlan | None = None  # gateway hosts only
    api_keys: tuple[ApiKey, ...] = field(default=(), repr=False)  # gateway hosts only (when secrets are read)
    hf_token: str | None = field(default=None, repr=False)  # engine.hf_token_file's token (when secrets are read)

    def in_group(self, group: str) -> bool:
        return group in self.groups

    def to_json(self) -> dict:
        """What `pyinfra INVENTORY debug-inventory` prints for `host.data.gpufleet`."""
        from gpufleet.manifest import manifest

        return manifest(self)


@dataclass(frozen=True)
class Fleet:
    inventory: Inventory
    hosts: tuple[FleetHost, ...]
    api_keys: tuple[ApiKey, ...]

    @property
    def root(self) -> Path:
        return self.inventory.root

    def in_group(self, group: str) -> list[FleetHost]:
        return [h for h in self.hosts if h.in_group(group)]

    def host(self, name: str) -> FleetHost:
        return next(h for h in self.hosts if h.name == name)

    def to_json(self) -> dict:
        """What `pyinfra INVENTORY debug-inventory` prints for `host.data.gpufleet_fleet`."""
        return {"inventory": str(self.root), "hosts": [h.name for h in self.hosts]}


def load_fleet(path: Path, check_secrets: bool = True, roles_dir: Path = ROLES_DIR) -> Fleet:
    """Load and validate the inventory at `path`; raise `ConfigError` with every problem found.

    `check_secrets=False` skips reading secret files (the API keys, the Hugging Face token); the
    capacity planner does not need them, so `gpufleet plan` works on a checkout that has no secrets yet.
    """
    inventory = load_inventory(Path(path), roles_dir)
    problems: list[Problem] = []
    hosts: list[FleetHost] = []
    unset: Unset = {}
    for source in inventory.hosts.values():
        host, found = _load_host(inventory, source, unset)
        problems.extend(found)
        if host is not None:
            hosts.append(host)
    problems.extend(_unset_problems(unset))
    problems.extend(_cross_host_problems(hosts))
    if not problems:
        gateways, found = plan_gateways(hosts)
        problems.extend(found)
        problems.extend(target_problems(hosts))
        hosts = [replace(h, gateway=gateways[h.name]) if h.name in gateways else h for h in hosts]
    keys: dict[Path, list[ApiKey]] = {}
    if check_secrets and not problems:
        keys = _read_keys(inventory, hosts, problems)
        hosts = with_hf_tokens(inventory.root, hosts, problems)
        hosts = [replace(h, api_keys=tuple(keys[_keys_path(inventory, h)])) if h.gateway else h for h in hosts]
        problems.extend(_unlimited_client_problems(inventory, hosts, keys))
    if problems:
        raise ConfigError(problems)
    return Fleet(inventory=inventory, hosts=tuple(hosts), api_keys=tuple(k for found in keys.values() for k in found))


# (role group, section, where it was set to null or None when never set) -> hosts lacking it
Unset = dict[tuple[str, str, Origin | None], list[InventoryHost]]


def _load_host(
    inventory: Inventory, source: InventoryHost, unset: Unset
) -> tuple[FleetHost | None, list[Problem]]:
    roles = [g for g in ROLE_GROUPS if g in source.groups]
    if not roles:
        origin = source.defined_at
        others = [g for g in source.groups if g != "all"]
        where = (
            f"only in group{'s' if len(others) > 1 else ''} {', '.join(repr(g) for g in others)}" if others
            else "in no group"
        )
        also = f", or make {others[0]!r} a child group of one" if others else ""
        return None, [
            Problem(
                file=origin.file, line=origin.line, key=source.name,
                message=f"host {source.name!r} is {where}, so no gpufleet role would run on it",
                fix=f"list it under one of the groups {', '.join(ROLE_GROUPS)}{also}",
            )
        ]
    config, problems = validate_host(source)
    if config is None:
        return None, problems
    lacking = False
    for section in dict.fromkeys(s for role in roles for s in REQUIRED_BY_GROUP[role]):
        if getattr(config, section) is None:
            role = next(r for r in roles if section in REQUIRED_BY_GROUP[r])
            nulled = source.origin_of((section,)) if section in source.vars else None
            unset.setdefault((role, section, nulled), []).append(source)
            lacking = True
    if problems or lacking:
        return None, problems
    plan = None
    if "gpu" in roles:
        try:
            plan = plan_host(source.name, config, inventory.root)
        except HostRefusal as refusal:
            origin = source.origin_of(tuple(refusal.key.split("."))) or source.defined_at
            fix = refusal.nearest or "change the layout, model or serving settings"
            return None, [
                Problem(file=origin.file, line=origin.line, key=refusal.key, host=source.name,
                        message=refusal.reason, fix=fix)
            ]
        except ConfigError as exc:  # e.g. an unreadable model.config_json
            return None, exc.problems
    return FleetHost(source.name, tuple(source.groups), config, plan, source), []


def _unset_problems(unset: Unset) -> list[Problem]:
    """A required section missing on several hosts of a group is one problem, naming the hosts."""
    problems: list[Problem] = []
    for (role, section, nulled), sources in unset.items():
        names = [s.name for s in sources]
        who = f"host {names[0]}" if len(names) == 1 else f"hosts {', '.join(names)}"
        if nulled is not None:
            problems.append(
                Problem(
                    file=nulled.file, line=nulled.line, key=section,
                    message=f"is empty (null), but hosts in group {role!r} need it ({who})",
                    fix=f"write the {section} settings under '{section}:' (see inventories/example)",
                )
            )
            continue
        where = f"host_vars/{names[0]}.yml" if len(names) == 1 else "host_vars/<host>.yml"
        origin = sources[0].defined_at
        problems.append(
            Problem(
                file=origin.file, line=origin.line, key=section,
                message=f"is required for hosts in group {role!r} but not set ({who})",
                fix=f"set {section} in group_vars/{role}.yml or {where} (see inventories/example)",
            )
        )
    return problems


def _cross_host_problems(hosts: list[FleetHost]) -> list[Problem]:
    """Two inventory names for one SSH endpoint would deploy conflicting settings to one machine."""
    problems: list[Problem] = []
    seen: dict[tuple[str, int], FleetHost] = {}
    for host in hosts:
        if host.config.ansible_connection in ("local", "docker"):
            continue
        address = (host.config.ansible_host or host.name, host.config.ansible_port or 22)
        other = seen.get(address)
        if other is None:
            seen[address] = host
            continue
        origin = host.source.origin_of(("ansible_host",)) or host.source.defined_at
        problems.append(
            Problem(
                file=origin.file, line=origin.line, key="ansible_host", host=host.name,
                message=f"hosts {other.name!r} and {host.name!r} both point at {address[0]}:{address[1]}",
                fix="give each host its own ansible_host (or ansible_port), or remove the duplicate entry",
            )
        )
    return problems


def _keys_path(inventory: Inventory, host: FleetHost) -> Path:
    return (inventory.root / host.config.gateway.api_keys_file).resolve()


def _unlimited_client_problems(inventory: Inventory, hosts: list[FleetHost],
                                keys: dict[Path, list[ApiKey]]) -> list[Problem]:
    """gateway.unlimited_clients must name clients of the keys file: a typo would leave the load test limited."""
    problems = []
    for host in hosts:
        if host.gateway is None or host.config.gateway is None:
            continue
        path = _keys_path(inventory, host)
        if path not in keys:  # the file itself is already reported
            continue
        known = {key.name for key in keys[path]}
        for name in host.config.gateway.unlimited_clients:
            if name not in known:
                origin = host.source.origin_of(("gateway", "unlimited_clients")) or host.source.defined_at
                problems.append(Problem(
                    file=origin.file, line=origin.line, key="gateway.unlimited_clients", host=host.name,
                    message=f"client {name!r} has no key in {display_path(path)}",
                    fix=f"add one: gpufleet keys add {display_path(inventory.root)} {name} (or correct the name)",
                ))
    return problems


def _read_keys(inventory: Inventory, hosts: list[FleetHost], problems: list[Problem]) -> dict[Path, list[ApiKey]]:
    """Each gateway keys file's keys (read once however many hosts share it)."""
    keys: dict[Path, list[ApiKey]] = {}
    for host in hosts:
        if not host.in_group("gateway") or host.config.gateway is None:
            continue
        path = _keys_path(inventory, host)
        if path in keys:
            continue
        keys[path] = []
        if not path.is_file():
            origin = host.source.origin_of(("gateway", "api_keys_file")) or host.source.defined_at
            what = "is not a file" if path.exists() else "does not exist"
            problems.append(
                Problem(
                    file=origin.file, line=origin.line, key="gateway.api_keys_file", host=host.name,
                    message=f"the API keys file {display_path(path)} {what}",
                    fix=f"create it with: gpufleet keys add {display_path(inventory.root)} <client-name>",
                )
            )
            continue
        try:
            found = read_api_keys(path)
            problems.extend(api_key_problems(found, display_path(path)))
            keys[path] = found
        except ConfigError as exc:
            problems.extend(exc.problems)
    return keys
