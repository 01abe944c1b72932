"""Where gpufleet's own files live, and how paths are shown to users."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
ROLES_DIR = REPO_ROOT / "roles"


def display_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when it is below it."""
    resolved = path.resolve() if not path.is_absolute() else path
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def default_report_dir(now: float | None = None) -> str:
    """Where a load test's report goes unless told: reports/loadtest-<UTC time> (ignored by git)."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"reports/loadtest-{stamp}"
