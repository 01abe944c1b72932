"""Write (or check) the monitoring files rendered from an inventory.

    python -m gpufleet.monitoring.render inventories/example monitoring
    python -m gpufleet.monitoring.render inventories/example monitoring --check

writes <folder>/rules/gpufleet.rules.yml, <folder>/alertmanager.yml and Grafana's files under
<folder>/grafana/: provisioning/datasources/gpufleet.yml (the Prometheus data source),
provisioning/dashboards/gpufleet.yml (the dashboard provider) and dashboards/<uid>.json (the four
dashboards). `--check` writes nothing and exits 1 naming the files that differ from the rendering.
`--runbook-base URL` makes every alert's runbook_url `URL/<AlertName>.md` (default: `runbooks`, the
pages' path in this repository). Exit 2 with the problems listed when the inventory is invalid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpufleet.errors import EXIT_CONFIG_ERROR, ConfigError
from gpufleet.fleet import load_fleet
from gpufleet.monitoring.alertmanager import render_alertmanager
from gpufleet.monitoring.grafana import render_grafana
from gpufleet.monitoring.rules import RUNBOOK_BASE, render_rules
from gpufleet.paths import REPO_ROOT

RULES_FILE = Path("rules") / "gpufleet.rules.yml"
ALERTMANAGER_FILE = Path("alertmanager.yml")
GRAFANA_DIR = Path("grafana")


def source_name(inventory: Path) -> str:
    """The inventory as the files' headers name it: relative to the repository when inside it."""
    resolved = inventory.resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return str(inventory)


def render_files(inventory: Path, runbook_base: str = RUNBOOK_BASE) -> dict[Path, str]:
    """{path relative to the output folder: text}; raises ConfigError for an invalid inventory."""
    fleet = load_fleet(inventory, check_secrets=False)
    source = source_name(inventory)
    return {
        RULES_FILE: render_rules(fleet, runbook_base=runbook_base, source=source),
        ALERTMANAGER_FILE: render_alertmanager(fleet, source=source),
        **{GRAFANA_DIR / rel: text for rel, text in render_grafana(fleet, source=source).items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpufleet.monitoring.render", description=__doc__.split("\n")[0])
    parser.add_argument("inventory", type=Path, help="the inventory folder, e.g. inventories/example")
    parser.add_argument("folder", type=Path,
                        help="where to write rules/, alertmanager.yml and grafana/, e.g. monitoring")
    parser.add_argument("--runbook-base", default=RUNBOOK_BASE, help="runbook_url prefix (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files differ")
    args = parser.parse_args(argv)
    try:
        files = render_files(args.inventory, args.runbook_base)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    stale = []
    for rel, text in files.items():
        path = args.folder / rel
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if args.check:
        for path in stale:
            print(f"{path}: differs from the rendering of {args.inventory}", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
