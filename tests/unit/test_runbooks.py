"""One runbook per alert, and one alert per runbook, each with the sections on-call needs; the index lists them."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gpufleet.monitoring.render import RULES_FILE
from gpufleet.monitoring.rules import GATEWAY_REQUESTS

REPO = Path(__file__).resolve().parents[2]
RUNBOOKS = REPO / "runbooks"
SECTIONS = ["Meaning", "Impact", "Diagnosis", "Mitigation", "Escalation"]


def alerts() -> dict[str, list[dict]]:
    """Each alert's rules (an alert may have several: one per burn-rate window pair, per host group)."""
    groups = yaml.safe_load((REPO / "monitoring" / RULES_FILE).read_text())["groups"]
    found: dict[str, list[dict]] = {}
    for group in groups:
        for rule in group["rules"]:
            if "alert" in rule:
                found.setdefault(rule["alert"], []).append(rule)
    return found


def runbook_pages() -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in RUNBOOKS.glob("*.md") if p.name != "README.md"}


def test_every_alert_has_a_runbook_and_every_runbook_an_alert() -> None:
    names, pages = set(alerts()), set(runbook_pages())
    assert names - pages == set(), f"alerts without a runbook: {sorted(names - pages)}"
    assert pages - names == set(), f"runbooks without an alert: {sorted(pages - names)}"


def test_every_runbook_has_its_sections_in_order_and_exact_commands() -> None:
    for name, text in runbook_pages().items():
        assert text.startswith(f"# {name}\n"), name
        headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
        assert headings == SECTIONS, f"{name}: sections {headings}, want {SECTIONS}"
        diagnosis = text.split("## Diagnosis", 1)[1].split("## Mitigation", 1)[0]
        assert "```sh\n" in diagnosis, f"{name}: Diagnosis has no commands block"
        for heading in SECTIONS:
            body = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
            assert len(body.strip()) > 40, f"{name}: section {heading} is empty"


def test_runbooks_state_the_alerts_severity() -> None:
    pages = runbook_pages()
    for name, rules in alerts().items():
        severities = {rule["labels"]["severity"] for rule in rules}
        header = pages[name].split("\n## ", 1)[0]
        for severity in ("page", "ticket"):
            assert (f"**{severity}**" in header) == (severity in severities), f"{name}: {severity}"


def test_alerts_on_the_gateway_log_name_the_exporter_that_feeds_them() -> None:
    pages = runbook_pages()
    for name, rules in alerts().items():
        reads_gateway_log = any(GATEWAY_REQUESTS in rule["expr"] for rule in rules)
        reads_it_via_slo = name == "SloAvailabilityBurnRate"
        named = "`gpufleet gateway-exporter`" in pages[name] and "job `gpufleet-gateway`" in pages[name]
        assert named == (reads_gateway_log or reads_it_via_slo), name
        assert "not yet exported" not in pages[name].lower(), name


def test_the_index_lists_exactly_the_alerts_with_their_severities() -> None:
    index = (RUNBOOKS / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| \[(\w+)\]\((\w+)\.md\) \| ([a-z, ]+) \|", index, re.MULTILINE)
    listed = {name: severity for name, _, severity in rows}
    assert all(name == link for name, link, _ in rows)
    found = alerts()
    assert set(listed) == set(found)
    for name, rules in found.items():
        want = ", ".join(s for s in ("page", "ticket") if s in {r["labels"]["severity"] for r in rules})
        assert listed[name] == want, name
