"""Deep merge of variable layers that remembers which file set each value.

gpufleet merges mappings key by key (Ansible's `hash_behaviour=merge`) instead of Ansible's
default of replacing a whole top-level variable: its settings are grouped in sections, and a
group that changes `gateway.burst` should not have to restate the rest of `gateway`.
Lists and scalars replace.
"""

from __future__ import annotations

from typing import Any

from gpufleet.inventory.model import KeyPath, Origin
from gpufleet.yamlfile import LineDict


def merge_layer(
    target: dict[str, Any],
    origins: dict[KeyPath, Origin],
    layer: dict[str, Any],
    file: str,
    prefix: KeyPath = (),
) -> None:
    """Merge `layer` (read from `file`) into `target`, updating `origins` in place."""
    lines = layer.key_lines if isinstance(layer, LineDict) else {}
    for key, value in layer.items():
        path = (*prefix, str(key))
        origin = Origin(file, lines.get(key))
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            origins.setdefault(path, origin)
            merge_layer(current, origins, value, file, path)
            continue
        if isinstance(current, (dict, list)):
            _forget_below(origins, path)  # only containers have origins below them
        target[key] = _copy_with_origins(value, origins, file, path)
        origins[path] = origin


def _copy_with_origins(value: Any, origins: dict[KeyPath, Origin], file: str, path: KeyPath) -> Any:
    if isinstance(value, dict):
        lines = value.key_lines if isinstance(value, LineDict) else {}
        copy: dict[str, Any] = {}
        for key, item in value.items():
            sub = (*path, str(key))
            origins[sub] = Origin(file, lines.get(key))
            copy[key] = _copy_with_origins(item, origins, file, sub)
        return copy
    if isinstance(value, list):
        return [_copy_with_origins(item, origins, file, (*path, str(i))) for i, item in enumerate(value)]
    return value


def _forget_below(origins: dict[KeyPath, Origin], path: KeyPath) -> None:
    stale = [p for p in origins if len(p) > len(path) and p[: len(path)] == path]
    for p in stale:
        del origins[p]
