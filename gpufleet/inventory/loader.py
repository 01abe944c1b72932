"""Read an Ansible-style inventory folder into hosts with merged variables.

Layout (as Ansible): `hosts.yml` with groups under `all:` / `children:`, each with `hosts:` and
`vars:`; `group_vars/<group>.yml` or `group_vars/<group>/*.yml`; `host_vars/<host>.yml`.

Precedence, lowest first: role defaults (`roles/*/defaults.yml`), `all`, then groups by depth
and name (parents before children, siblings alphabetically, as Ansible orders them), then the
host. Within one level a `group_vars`/`host_vars` file beats the inline `vars:` of hosts.yml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpufleet.errors import ConfigError, Problem, show_value
from gpufleet.inventory.merge import merge_layer
from gpufleet.inventory.model import Group, Inventory, InventoryHost, KeyPath, Origin
from gpufleet.paths import ROLES_DIR, display_path
from gpufleet.suggest import hint
from gpufleet.yamlfile import LineDict, load_yaml

GROUP_KEYS = ("children", "hosts", "vars")
YAML_SUFFIXES = (".yml", ".yaml")


def load_inventory(root: Path, roles_dir: Path = ROLES_DIR) -> Inventory:
    """Load `root` (an inventory folder, or its hosts.yml) and merge every host's variables."""
    root = Path(root)
    if root.is_file():
        root = root.parent
    hosts_path = _find_hosts_file(root)
    shown = display_path(hosts_path)
    document = load_yaml(hosts_path, shown)
    groups, host_entries, edge_lines = _read_groups(document, shown)
    _set_depths(groups, shown, edge_lines)

    problems: list[Problem] = []
    group_files = _group_var_files(root, groups, problems)
    host_files = _host_var_files(root, host_entries, problems)
    if problems:
        raise ConfigError(problems)

    defaults = _role_defaults(roles_dir)
    ordered = sorted(groups.values(), key=lambda g: (g.depth, g.name))
    hosts: dict[str, InventoryHost] = {}
    for name, entries in host_entries.items():
        member_of = _ancestors(groups, [g for g, _, _ in entries])
        values: dict[str, Any] = {}
        origins: dict[KeyPath, Origin] = {}
        for file, layer in defaults:
            merge_layer(values, origins, layer, file)
        for group in ordered:
            if group.name not in member_of:
                continue
            for file, layer in group_files.get(group.name, []):
                merge_layer(values, origins, layer, file)
        for _, inline, _ in sorted(entries, key=lambda e: (groups[e[0]].depth, e[0])):
            if inline:
                merge_layer(values, origins, inline, shown)
        for file, layer in host_files.get(name, []):
            merge_layer(values, origins, layer, file)
        first_line = min(line for _, _, line in entries)
        hosts[name] = InventoryHost(
            name=name,
            groups=[g.name for g in ordered if g.name in member_of],
            vars=values,
            origins=origins,
            defined_at=Origin(shown, first_line),
        )
    return Inventory(root=root, hosts_file=shown, groups=groups, hosts=hosts)


def _find_hosts_file(root: Path) -> Path:
    for suffix in YAML_SUFFIXES:
        candidate = root / f"hosts{suffix}"
        if candidate.is_file():
            return candidate
    if not root.exists():
        fix = "pass the path of an inventory folder, e.g. inventories/example"
        raise ConfigError([Problem(file=display_path(root), key="", message="does not exist", fix=fix)])
    raise ConfigError(
        [
            Problem(
                file=display_path(root / "hosts.yml"),
                key="",
                message="is missing: an inventory folder needs a hosts.yml",
                fix="create hosts.yml with your groups under 'all: children:' (see inventories/example/hosts.yml)",
            )
        ]
    )


# hosts.yml ----------------------------------------------------------------------------------

HostEntry = tuple[str, dict[str, Any] | None, int]  # (group, inline vars, line)
EdgeLines = dict[tuple[str, str], int]  # (parent, child) -> line the child is written on


def _read_groups(
    document: Any, shown: str
) -> tuple[dict[str, Group], dict[str, list[HostEntry]], EdgeLines]:
    if document is None:
        raise ConfigError(
            [Problem(file=shown, key="", message="is empty, so the inventory has no hosts", fix=_ALL_FIX)]
        )
    if not isinstance(document, dict):
        raise ConfigError(
            [
                Problem(
                    file=shown, key="",
                    message=f"must be a mapping of groups starting with 'all:', got {show_value(document)}",
                    fix=_ALL_FIX,
                )
            ]
        )
    groups: dict[str, Group] = {"all": Group("all")}
    host_entries: dict[str, list[HostEntry]] = {}
    edge_lines: EdgeLines = {}
    problems: list[Problem] = []
    lines = document.key_lines if isinstance(document, LineDict) else {}
    for name, body in document.items():
        if name != "all":
            # Ansible treats a top-level group other than `all` as a child of `all`.
            groups["all"].children.append(str(name))
        _read_group(str(name), body, "all" if name != "all" else None, groups, host_entries, shown,
                    lines.get(name), problems, (str(name),), edge_lines)
    if not host_entries and not problems:
        problems.append(_empty_hosts(shown))
    if problems:
        raise ConfigError(problems)
    return groups, host_entries, edge_lines


_ALL_FIX = "start the file with 'all:' and put groups under 'children:' (see inventories/example/hosts.yml)"


def _empty_hosts(shown: str) -> Problem:
    return Problem(file=shown, key="all", message="defines no hosts", fix=_ALL_FIX)


def _read_group(
    name: str,
    body: Any,
    parent: str | None,
    groups: dict[str, Group],
    host_entries: dict[str, list[HostEntry]],
    shown: str,
    line: int | None,
    problems: list[Problem],
    path: tuple[str, ...],
    edge_lines: EdgeLines,
) -> None:
    key = ".".join(path)
    if not _valid_group_name(name):
        problems.append(
            Problem(
                file=shown, line=line, key=key,
                message=f"group name {name!r} has characters Ansible does not allow",
                fix="use letters, digits and underscores only, e.g. 'gpu_servers'",
            )
        )
        return
    group = groups.setdefault(name, Group(name))
    if parent is not None and line is not None:
        edge_lines.setdefault((parent, name), line)
    if parent is not None and parent not in group.parents:
        group.parents.append(parent)
        if name not in groups[parent].children:
            groups[parent].children.append(name)
    if body is None:
        return
    if not isinstance(body, dict):
        problems.append(
            Problem(
                file=shown, line=line, key=key,
                message=f"a group must be a mapping with hosts:, children: or vars:, got {type(body).__name__}",
                fix=f"write '{name}:' followed by indented 'hosts:' and/or 'children:'",
            )
        )
        return
    body_lines = body.key_lines if isinstance(body, LineDict) else {}
    for sub in body:
        if sub not in GROUP_KEYS:
            problems.append(
                Problem(
                    file=shown, line=body_lines.get(sub), key=f"{key}.{sub}",
                    message=f"unknown group key {sub!r}",
                    fix=hint(str(sub), GROUP_KEYS, "group key")
                    + "; hosts go under 'hosts:' and sub-groups under 'children:'",
                )
            )
    hosts = body.get("hosts")
    if hosts is not None:
        _read_hosts(name, hosts, host_entries, shown, body_lines.get("hosts"), problems, f"{key}.hosts")
    variables = body.get("vars")
    if variables is not None and not isinstance(variables, dict):
        problems.append(
            Problem(
                file=shown, line=body_lines.get("vars"), key=f"{key}.vars",
                message="vars must be a mapping of variable names to values",
                fix="indent 'name: value' pairs under 'vars:'",
            )
        )
    elif variables:
        group.inline_vars.append(variables)
    children = body.get("children")
    if children is None:
        return
    if not isinstance(children, dict):
        problems.append(
            Problem(
                file=shown, line=body_lines.get("children"), key=f"{key}.children",
                message="children must be a mapping of group names",
                fix="write each child group as 'name:' under 'children:'",
            )
        )
        return
    child_lines = children.key_lines if isinstance(children, LineDict) else {}
    for child, child_body in children.items():
        _read_group(str(child), child_body, name, groups, host_entries, shown, child_lines.get(child),
                    problems, (*path, "children", str(child)), edge_lines)


def _read_hosts(
    group: str,
    hosts: Any,
    host_entries: dict[str, list[HostEntry]],
    shown: str,
    line: int | None,
    problems: list[Problem],
    key: str,
) -> None:
    if not isinstance(hosts, dict):
        problems.append(
            Problem(
                file=shown, line=line, key=key,
                message="hosts must be a mapping of host names (each with its variables or nothing)",
                fix="write each host as 'name:' on its own line under 'hosts:'",
            )
        )
        return
    host_lines = hosts.key_lines if isinstance(hosts, LineDict) else {}
    for host, inline in hosts.items():
        host_line = host_lines.get(host, line or 0)
        if inline is not None and not isinstance(inline, dict):
            problems.append(
                Problem(
                    file=shown, line=host_line, key=f"{key}.{host}",
                    message=f"host variables must be a mapping, got {type(inline).__name__}",
                    fix=f"write '{host}:' alone, or with indented 'name: value' variables below it",
                )
            )
            continue
        entries = host_entries.setdefault(str(host), [])
        if any(g == group for g, _, _ in entries):
            first = next(ln for g, _, ln in entries if g == group)
            problems.append(
                Problem(
                    file=shown, line=host_line, key=f"{key}.{host}",
                    message=f"host {host!r} is listed twice in group {group!r} (first on line {first})",
                    fix=f"list {host!r} once in group {group!r}: remove this entry or the one on line {first}",
                )
            )
            continue
        if inline and any(existing for _, existing, _ in entries):
            first = next(ln for _, existing, ln in entries if existing)
            problems.append(
                Problem(
                    file=shown, line=host_line, key=f"{key}.{host}",
                    message=f"host {host!r} is defined with variables twice (first on line {first})",
                    fix=f"give {host!r} its variables in one place: one group's entry or host_vars/{host}.yml",
                )
            )
            continue
        entries.append((group, inline, host_line))


def _valid_group_name(name: str) -> bool:
    return bool(name) and name.replace("_", "a").isalnum() and name.isascii() and not name[0].isdigit()


def _set_depths(groups: dict[str, Group], shown: str, edge_lines: EdgeLines | None = None) -> None:
    """Depth = longest path from `all`; a cycle among children is an error."""

    def visit(name: str, trail: tuple[str, ...]) -> None:
        for child in groups[name].children:
            if child in trail:
                cycle = " -> ".join((*trail, child))
                raise ConfigError(
                    [
                        Problem(
                            file=shown, line=(edge_lines or {}).get((name, child)),
                            key=".children.".join((*trail, child)),
                            message=f"group cycle: {cycle}",
                            fix=f"remove {child!r} from the children of {name!r}",
                        )
                    ]
                )
            groups[child].depth = max(groups[child].depth, len(trail))
            visit(child, (*trail, child))

    visit("all", ("all",))


def _ancestors(groups: dict[str, Group], direct: list[str]) -> set[str]:
    seen: set[str] = set()
    stack = list(direct)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(groups[name].parents)
    seen.add("all")
    return seen


# group_vars / host_vars ---------------------------------------------------------------------

Layer = tuple[str, dict[str, Any]]


def _group_var_files(root: Path, groups: dict[str, Group], problems: list[Problem]) -> dict[str, list[Layer]]:
    layers: dict[str, list[Layer]] = {}
    hosts_file = display_path(_find_hosts_file(root))
    for group in groups.values():
        for inline in group.inline_vars:
            layers.setdefault(group.name, []).append((hosts_file, inline))
    for name, files in _var_files(root / "group_vars"):
        if name not in groups:
            problems.append(
                Problem(
                    file=display_path(files[0]), key="",
                    message=f"is for group {name!r}, which hosts.yml does not define",
                    fix=hint(name, groups, "group") + "; rename the file or add the group to hosts.yml",
                )
            )
            continue
        layers.setdefault(name, []).extend(_read_var_files(files, problems))
    return layers


def _host_var_files(
    root: Path, host_entries: dict[str, list[HostEntry]], problems: list[Problem]
) -> dict[str, list[Layer]]:
    layers: dict[str, list[Layer]] = {}
    for name, files in _var_files(root / "host_vars"):
        if name not in host_entries:
            problems.append(
                Problem(
                    file=display_path(files[0]), key="",
                    message=f"is for host {name!r}, which hosts.yml does not list",
                    fix=hint(name, host_entries, "host") + "; rename the file or add the host to a group in hosts.yml",
                )
            )
            continue
        layers[name] = _read_var_files(files, problems)
    return layers


def _var_files(folder: Path) -> list[tuple[str, list[Path]]]:
    """(name, files) for `folder/<name>.yml` and `folder/<name>/*.yml`, files in lexical order."""
    if not folder.is_dir():
        return []
    found: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = sorted(p for p in entry.iterdir() if p.suffix in YAML_SUFFIXES and p.is_file())
            if files:  # a folder without YAML files (a README, or empty) sets nothing
                found.setdefault(entry.name, []).extend(files)
        elif entry.suffix in YAML_SUFFIXES:
            found.setdefault(entry.stem, []).insert(0, entry)
    return sorted(found.items())


def _read_var_files(files: list[Path], problems: list[Problem]) -> list[Layer]:
    layers: list[Layer] = []
    for path in files:
        shown = display_path(path)
        try:
            data = load_yaml(path, shown)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if data is None:
            continue
        if not isinstance(data, dict):
            problems.append(
                Problem(
                    file=shown, key="",
                    message=f"must be a mapping of variable names to values, got {type(data).__name__}",
                    fix="write one 'name: value' per line at the top level of the file",
                )
            )
            continue
        layers.append((shown, data))
    return layers


def _role_defaults(roles_dir: Path) -> list[Layer]:
    """Each role's `defaults.yml`, the lowest layer; a key belongs to exactly one role."""
    layers: list[Layer] = []
    owner: dict[str, str] = {}
    problems: list[Problem] = []
    for path in sorted(roles_dir.glob("*/defaults.yml")):
        shown = display_path(path)
        data = load_yaml(path, shown) or {}
        for key in data:
            if key in owner:
                problems.append(
                    Problem(
                        file=shown, key=str(key),
                        message=f"is also a default of {owner[key]}",
                        fix="give each top-level key one owning role",
                    )
                )
            owner[key] = shown
        layers.append((shown, data))
    if problems:
        raise ConfigError(problems)
    return layers
