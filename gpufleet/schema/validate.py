"""Turn pydantic's validation errors into `Problem`s that name file, key, value and fix."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from gpufleet.errors import Problem, show_value
from gpufleet.inventory.model import InventoryHost, Origin
from gpufleet.schema.host import HostVars
from gpufleet.schema.sections import Invalid
from gpufleet.suggest import did_you_mean, hint

_TYPE_WORDS = {
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "int_parsing": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "text",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}

_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def validate_host(host: InventoryHost) -> tuple[HostVars | None, list[Problem]]:
    """Validate one host's merged variables; return the model or the problems found."""
    try:
        return HostVars.model_validate(host.vars), []
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        return None, [_problem(host, err) for err in errors if not _misspelt(err, errors)]


def _misspelt(err: ErrorDetails, errors: list[ErrorDetails]) -> bool:
    """A missing key whose misspelling sits beside it (cont: for count:) is reported once, as the typo."""
    if err["type"] != "missing":
        return False
    loc = tuple(str(part) for part in err["loc"])
    for other in errors:
        other_loc = tuple(str(part) for part in other["loc"])
        if (
            other["type"] == "extra_forbidden"
            and other_loc[:-1] == loc[:-1]
            and did_you_mean(other_loc[-1], _fields_at(loc[:-1])) == loc[-1]
        ):
            return True
    return False


def _problem(host: InventoryHost, err: ErrorDetails) -> Problem:
    loc = tuple(str(part) for part in err["loc"])
    key = ".".join(loc)
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    error = ctx.get("error")
    if kind == "value_error" and isinstance(error, Invalid) and error.field:
        # a check across a section's fields names the one at fault
        value = value.get(error.field) if isinstance(value, dict) else value
        loc = (*loc, error.field)
        key = ".".join(loc)
    origin = host.origin_of(loc) or host.defined_at
    description = _description(loc)
    if kind == "invalid_key":
        # YAML reads keys such as 5: or true: as a number or a boolean, never as a variable name
        parent = loc[:-1]
        key = ".".join((*parent, show_value(value)))
        origin = host.origin_of((*parent, str(value))) or host.defined_at
        parent_fields = _fields_at(parent)
        what = (
            "true/false" if isinstance(value, bool) else "a number" if isinstance(value, (int, float))
            else "null" if value is None else "a value"
        )
        message = f"unknown key {show_value(value)} (YAML reads it as {what}, not a name)"
        fix = f"use one of the valid keys: {', '.join(sorted(parent_fields))}" if parent_fields else "remove it"
    elif kind == "extra_forbidden":
        parent_fields = _fields_at(loc[:-1])
        message = f"unknown key {loc[-1]!r}"
        fix = hint(loc[-1], parent_fields, "key") if parent_fields else "remove it"
    elif kind == "missing":
        # the value is absent, so point at the enclosing section (or the host) instead
        origin = host.origin_of(loc[:-1]) if len(loc) > 1 else None
        origin = origin or host.defined_at
        message = "is required but not set"
        fix = f"add {key}: {description}" if description else f"add {key}"
    elif kind in _BOUNDS:
        bound = ctx.get(kind.replace("greater_than_equal", "ge").replace("less_than_equal", "le")
                        .replace("greater_than", "gt").replace("less_than", "lt"))
        bound = _number(bound)
        message = f"must be {_BOUNDS[kind]} {bound}, got {show_value(value)}"
        fix = _set(key, f"a value {_BOUNDS[kind]} {bound}", description)
    elif kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",") if c.strip()]
        message = f"must be one of {', '.join(choices)}, got {show_value(value)}"
        fix = (
            hint(str(value), choices, "value") if isinstance(value, str)
            else _set(key, f"one of {', '.join(choices)}", description)
        )
    elif kind in _TYPE_WORDS:
        word = _TYPE_WORDS[kind]
        message = f"must be {word}, got {show_value(value)}"
        fix = _set(key, word, description)
    elif kind in ("too_short", "too_long"):
        limit = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        actual = ctx.get("actual_length")
        most = "at least" if kind == "too_short" else "at most"
        noun = "text" if isinstance(value, str) else "list"
        unit = "character" if noun == "text" else "item"
        message = f"must have {most} {limit} {unit}{'s' if limit != 1 else ''}, got {actual}"
        fix = _set(key, f"a {noun} of {most} {limit} {unit}{'s' if limit != 1 else ''}", description)
    elif kind == "string_pattern_mismatch":
        message = f"has the wrong form, got {show_value(value)}"
        fix = _set(key, "a value of the right form", description)
    elif kind == "value_error":
        message = str(error or err["msg"])
        if isinstance(error, Invalid) and error.fix:
            fix = error.fix
        else:
            fix = f"{key} is {description}" if description else "correct the value"
    else:
        message = f"{err['msg']}, got {show_value(value)}"
        fix = _set(key, "a valid value", description)
    return Problem(
        file=origin.file,
        line=origin.line,
        key=key,
        message=message,
        fix=fix,
        value=value if not isinstance(value, (dict, list)) else show_value(value),
    )


def _number(value: Any) -> Any:
    """0.0 -> 0: a bound as the user would write it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _set(key: str, expected: str, description: str | None) -> str:
    text = f"set {key} to {expected}"
    return f"{text} ({description})" if description else text


def _model_at(path: tuple[str, ...]) -> type[BaseModel] | None:
    model: Any = HostVars
    for part in path:
        if part.isdigit():
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = _unwrap(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """The BaseModel inside Optional[...] / list[...], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def _fields_at(path: tuple[str, ...]) -> list[str]:
    model = _model_at(path)
    return list(model.model_fields) if model else []


def _description(loc: tuple[str, ...]) -> str | None:
    fields = [p for p in loc if not p.isdigit()]
    if not fields:
        return None
    model = _model_at(tuple(fields[:-1]))
    if model is None:
        return None
    field = model.model_fields.get(fields[-1])
    return field.description if field else None


__all__ = ["Origin", "validate_host"]
