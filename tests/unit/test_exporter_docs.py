"""docs/exporter.md's metrics table names every metric the exporter exposes, with its type and labels."""

from __future__ import annotations

import re
from pathlib import Path

from gpufleet.exporter.metrics import ALL_METRICS

DOC = Path(__file__).resolve().parents[2] / "docs" / "exporter.md"
ROW = re.compile(r"^\| `(?P<name>gpufleet_[a-z_]+)` \| (?P<kind>\w+) \|(?P<labels>[^|]*)\|")


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    section = DOC.read_text(encoding="utf-8").split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            labels = tuple(re.findall(r"`([a-z_]+)`", match["labels"]))
            rows[match["name"]] = (match["kind"], labels)
    return rows


def test_every_metric_is_documented_with_its_type_and_labels() -> None:
    expected = {m.name: (m.kind, m.labels) for m in ALL_METRICS}
    assert documented() == expected


def test_table_order_is_the_exposition_order() -> None:
    assert list(documented()) == [m.name for m in ALL_METRICS]
