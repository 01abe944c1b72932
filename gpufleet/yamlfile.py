"""Strict YAML reading: duplicate keys are errors and every mapping remembers its key lines.

PyYAML silently keeps the last of two equal keys, which hides typos such as a host listed twice
under one group. Here a duplicate key is a `Problem`, and each mapping is a `LineDict` so later
errors can point at the line a value was written on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gpufleet.errors import ConfigError, Problem


class LineDict(dict):
    """A dict that knows the 1-based line each of its keys was written on."""

    key_lines: dict[Any, int]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.key_lines = {}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and records key lines."""

    source_name = "<yaml>"


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> LineDict:
    loader.flatten_mapping(node)
    mapping = LineDict()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise ConfigError(
                [
                    Problem(
                        file=loader.source_name,
                        line=key_node.start_mark.line + 1,
                        key="",
                        message="a mapping key must be a plain value, not a list or mapping",
                        fix="write the key as a plain word, e.g. 'gpu-01:'",
                    )
                ]
            ) from None
        if key in mapping:
            first = mapping.key_lines[key]
            raise ConfigError(
                [
                    Problem(
                        file=loader.source_name,
                        line=key_node.start_mark.line + 1,
                        key=str(key),
                        message=f"duplicate key {key!r} (first written on line {first})",
                        fix=f"keep one {key!r} entry in this mapping and merge the two",
                    )
                ]
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.key_lines[key] = key_node.start_mark.line + 1
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path, display: str | None = None) -> Any:
    """Load one YAML file strictly; syntax errors become a `ConfigError` with file and line."""
    shown = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            [Problem(file=shown, key="", message="is not UTF-8 text", fix="save the file as UTF-8")]
        ) from None
    except OSError as exc:
        raise ConfigError(
            [Problem(file=shown, key="", message=f"cannot be read: {exc.strerror}", fix="check the path and permissions")]
        ) from None
    loader = _StrictLoader(text)
    loader.source_name = shown
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(
            [
                Problem(
                    file=shown,
                    line=mark.line + 1 if mark else None,
                    key="",
                    message=f"is not valid YAML: {what}",
                    fix="correct the YAML syntax at that line (indentation, a missing ':' or an unclosed quote)",
                )
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            [Problem(file=shown, key="", message=f"is not valid YAML: {exc}", fix="correct the YAML syntax")]
        ) from None
    finally:
        loader.dispose()
