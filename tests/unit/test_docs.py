"""The configuration reference is generated from the schema; the committed copy must match it."""

from pathlib import Path

from gpufleet.docs_gen import render

REPO = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_up_to_date():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == render(), "docs/configuration.md is stale: run `make docs`"


def test_reference_lists_every_role_default_with_its_value():
    text = render()
    assert "| `gateway.burst` | integer |  | `4` |" in text
    assert "| `serving.max_num_seqs` | integer |  | `256` |" in text
    assert "Defaults: `roles/inference/defaults.yml`." in text
