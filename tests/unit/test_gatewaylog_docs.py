"""docs/gateway-exporter.md names every metric and flag of the gateway exporter, with types and labels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpufleet.gatewaylog import cli
from gpufleet.gatewaylog.metrics import ALL_METRICS

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[2] / "docs" / "gateway-exporter.md"
ROW = re.compile(r"^\| `(?P<name>gpufleet_[a-z_]+)` \| (?P<kind>\w+) \|(?P<labels>[^|]*)\|")


def section(title: str) -> str:
    return DOC.read_text(encoding="utf-8").split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    rows = {}
    for line in section("Metrics").splitlines():
        match = ROW.match(line)
        if match:
            rows[match["name"]] = (match["kind"], tuple(re.findall(r"`([a-z_]+)`", match["labels"])))
    return rows


def test_every_metric_is_documented_in_exposition_order_with_its_type_and_labels() -> None:
    assert documented() == {d.name: (d.kind, d.labels) for d in ALL_METRICS}
    assert list(documented()) == [d.name for d in ALL_METRICS]


def test_every_flag_is_documented_with_its_default() -> None:
    text = DOC.read_text(encoding="utf-8")
    flags = [a.option_strings[0] for a in cli.build_parser()._actions if a.option_strings[0] != "-h"]
    assert flags == ["--log", "--listen", "--model-name", "--log-level"]
    for flag in flags:
        assert f"| `{flag} " in text or f"| `{flag}` |" in text, flag
    assert f"default `{cli.DEFAULT_LOG}`" in text
    assert f"default `{cli.DEFAULT_LISTEN}`" in text
