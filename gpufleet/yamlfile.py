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

    def __init__(self, stream: str):
        super().__init__(stream)
        # keys (and list indexes) from the document root to the value being built, so a
        # duplicate key is reported with its full dotted path (gpus.count, not count)
        self.key_path: list[str] = []


class _FastStrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The same loader on libyaml's parser, several times faster on large inventories.

    Its syntax error messages are terser than PyYAML's, so a file it rejects is parsed again
    with `_StrictLoader` to report the error.
    """

    source_name = "<yaml>"

    def __init__(self, stream: str):
        super().__init__(stream)
        self.key_path: list[str] = []


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> LineDict:
    # keys written in this mapping itself, as opposed to those a merge key (<<: *anchor) brings in,
    # which come first and which a written key may override
    written = {id(key_node) for key_node, _ in node.value}
    loader.flatten_mapping(node)
    mapping = LineDict()
    merged: set[Any] = set()
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
        line = key_node.start_mark.line + 1
        if id(key_node) not in written:
            merged.add(key)
        elif key in merged:
            merged.discard(key)  # a written key overrides a merged one, as YAML specifies
        elif key in mapping:
            first = mapping.key_lines[key]
            raise ConfigError(
                [
                    Problem(
                        file=loader.source_name,
                        line=line,
                        key=".".join([*loader.key_path, str(key)]),
                        message=f"duplicate key {key!r} (first written on line {first})",
                        fix=f"write {key!r} once here: delete the entry on line {line} or merge it into line {first}",
                    )
                ]
            )
        loader.key_path.append(str(key))
        try:
            mapping[key] = loader.construct_object(value_node, deep=True)
        finally:
            loader.key_path.pop()
        mapping.key_lines[key] = line
    return mapping


def _construct_sequence(loader: _StrictLoader, node: yaml.SequenceNode) -> list[Any]:
    items: list[Any] = []
    for index, child in enumerate(node.value):
        loader.key_path.append(str(index))
        try:
            items.append(loader.construct_object(child, deep=True))
        finally:
            loader.key_path.pop()
    return items


for _loader in (_StrictLoader, _FastStrictLoader):
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


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
            [
                Problem(
                    file=shown, key="", message=f"cannot be read: {exc.strerror}", fix="check the path and permissions"
                )
            ]
        ) from None
    fast = _FastStrictLoader(text)
    fast.source_name = shown
    try:
        return fast.get_single_data()
    except yaml.YAMLError:
        pass  # report it with PyYAML's clearer messages below
    finally:
        fast.dispose()
    loader = _StrictLoader(text)
    loader.source_name = shown
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        fix = "correct the YAML syntax at that line (indentation, a missing ':' or an unclosed quote)"
        if exc.problem and exc.context and exc.context_mark and mark and exc.context_mark.line != mark.line:
            # e.g. an unclosed quote or bracket is found lines later: name where it started
            start = exc.context_mark.line + 1
            what += f" ({exc.context} that starts on line {start})"
            fix = (f"correct the YAML syntax from line {start} to this line "
                   "(indentation, a missing ':' or an unclosed quote or bracket)")
        message = f"is not valid YAML: {what}"
        if exc.problem == "but found another document":
            message = "holds a second YAML document ('---'); gpufleet reads one document per file"
            fix = "remove the '---' and merge the two documents into one mapping"
        if "'\\t'" in what or "tab character" in what:
            message = "is not valid YAML: found a tab character; YAML indents with spaces only"
            fix = "replace the tab with spaces"
        raise ConfigError(
            [
                Problem(
                    file=shown,
                    line=mark.line + 1 if mark else None,
                    key="",
                    message=message,
                    fix=fix,
                )
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            [Problem(file=shown, key="", message=f"is not valid YAML: {exc}", fix="correct the YAML syntax")]
        ) from None
    finally:
        loader.dispose()
