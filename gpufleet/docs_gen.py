"""Generate docs/configuration.md from the schema and the role defaults, so the reference cannot drift.

    python -m gpufleet.docs_gen > docs/configuration.md
"""

from __future__ import annotations

import sys
import typing
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gpufleet.paths import ROLES_DIR
from gpufleet.schema.host import REQUIRED_BY_GROUP, ROLE_GROUPS, HostVars


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in rest) + " \\| null"
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if args and origin is not None and str(origin) == "typing.Union":
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None and args:
        return " \\| ".join(_type_name(a) for a in args)
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "mapping"
        return {"int": "integer", "float": "number", "str": "text", "bool": "true/false"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def _section_model(info: FieldInfo) -> type[BaseModel] | None:
    stack = [info.annotation]
    while stack:
        item = stack.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
        stack.extend(typing.get_args(item))
    return None


def _is_text(annotation: Any) -> bool:
    """str, or str | None: a text field, whatever its constraints."""
    return annotation is str or (typing.get_origin(annotation) not in (list, tuple)
                                 and str in typing.get_args(annotation))


def _constraints(info: FieldInfo) -> str:
    parts = []
    # min_length bounds a text's characters or a list's items alike
    sized = "min length" if _is_text(info.annotation) else "min items"
    for meta in info.metadata:
        for name, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", sized)):
            value = getattr(meta, name, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _defaults() -> dict[str, tuple[str, Any]]:
    found: dict[str, tuple[str, Any]] = {}
    for path in sorted(ROLES_DIR.glob("*/defaults.yml")):
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            found[key] = (f"roles/{path.parent.name}/defaults.yml", value)
    return found


def _rows(model: type[BaseModel], prefix: str, defaults: Any, out: list[str]) -> None:
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        sub = _section_model(info)
        default = defaults.get(name, "") if isinstance(defaults, dict) else ""
        if sub is not None and typing.get_origin(info.annotation) is not list:
            _rows(sub, key, default if isinstance(default, dict) else {}, out)
            continue
        has_role_default = isinstance(defaults, dict) and name in defaults
        if has_role_default:
            shown_default = _yaml_inline(default)
        elif not info.is_required():
            factory = info.default_factory
            shown_default = _yaml_inline(factory() if factory else info.default)  # type: ignore[call-arg]
        else:
            shown_default = ""
        required = "yes" if info.is_required() and not has_role_default else ""
        limits = _constraints(info)
        text = (info.description or "") + (f" ({limits})" if limits else "")
        default_cell = f"`{shown_default}`" if shown_default else ""
        out.append(f"| `{key}` | {_type_name(info.annotation)} | {required} | {default_cell} | {text} |")


def _yaml_inline(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def render() -> str:
    defaults = _defaults()
    lines = [
        "# Configuration reference",
        "",
        "Generated from the schema (`gpufleet/schema/`) and the role defaults (`roles/*/defaults.yml`) by",
        "`make docs`; do not edit by hand.",
        "",
        "Every variable below may be set in `group_vars/<group>.yml`, `group_vars/<group>/*.yml`,",
        "`host_vars/<host>.yml` or inline in `hosts.yml`. Precedence, lowest first: role defaults, `all`,",
        "parent groups, child groups (siblings alphabetically), the host. Mappings merge key by key;",
        "lists and values replace. Unknown keys are errors.",
        "",
        "Roles follow groups: " + "; ".join(
            f"`{g}` hosts need {', '.join(f'`{s}`' for s in REQUIRED_BY_GROUP[g])}" for g in ROLE_GROUPS) + ".",
        "",
    ]
    for name, info in HostVars.model_fields.items():
        sub = _section_model(info)
        if sub is None:
            continue
        owner, values = defaults.get(name, ("", {}))
        lines += [f"## `{name}`", "", (sub.__doc__ or info.description or "").strip().splitlines()[0], ""]
        if owner:
            lines += [f"Defaults: `{owner}`.", ""]
        lines += ["| key | type | required | default | meaning |", "|---|---|---|---|---|"]
        _rows(sub, name, values, lines)
        lines.append("")
    lines += ["## Connection variables", "", "| key | type | meaning |", "|---|---|---|"]
    for name, info in HostVars.model_fields.items():
        if name.startswith("ansible_"):
            lines.append(f"| `{name}` | {_type_name(info.annotation)} | {info.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
