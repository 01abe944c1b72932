"""The promtool tests cover every alert: a case where it fires (with its labels and annotations) and
one where it stays quiet; and they test the committed rules file, by alert names it has."""

from __future__ import annotations

from pathlib import Path

import yaml

from gpufleet.monitoring.render import RULES_FILE

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "monitoring" / "tests"
RULES = REPO / "monitoring" / RULES_FILE


def alert_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def cases() -> list[tuple[Path, str, dict]]:
    found = []
    for path in sorted(TESTS.glob("*.test.yml")):
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                found.append((path, group["name"], case))
    return found


def test_test_files_load_the_committed_rules() -> None:
    files = sorted(TESTS.glob("*.test.yml"))
    assert files
    for path in files:
        doc = yaml.safe_load(path.read_text())
        assert [(path.parent / f).resolve() for f in doc["rule_files"]] == [RULES.resolve()], path.name
        assert all(group.get("name") for group in doc["tests"]), f"{path.name}: a test group without a name"


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path, group, case in cases():
        expected = case.get("exp_alerts") or []
        if not expected:
            quiet.add(case["alertname"])
            continue
        firing.add(case["alertname"])
        for alert in expected:
            annotations = alert.get("exp_annotations", {})
            assert {"summary", "description", "runbook_url"} <= set(annotations), f"{path.name}: {group}"
            assert {"severity", "component"} <= set(alert.get("exp_labels", {})), f"{path.name}: {group}"
    names = alert_names()
    assert names - firing == set(), f"alerts never tested firing: {sorted(names - firing)}"
    assert names - quiet == set(), f"alerts never tested quiet: {sorted(names - quiet)}"


def test_cases_name_only_alerts_that_exist() -> None:
    # promtool passes a quiet case for an alert name the rules do not have: a typo would go unnoticed
    names = alert_names()
    unknown = {case["alertname"] for _, _, case in cases()} - names
    assert unknown == set(), f"promtool cases for alerts the rules do not have: {sorted(unknown)}"
