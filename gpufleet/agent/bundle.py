"""Build the agent zipapp: gpufleet's own modules plus the pure-Python dependencies the host commands use.

The archive is reproducible (sorted entries, fixed timestamps, no bytecode), so its checksum changes
only when the code does: the roles upload it by checksum and restart the services only then.

    python -m gpufleet.agent.bundle [OUT]      # default: .cache/agent/gpufleet-agent.pyz
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from gpufleet.paths import REPO_ROOT

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # gpufleet/
DEFAULT_OUT = REPO_ROOT / ".cache" / "agent" / "gpufleet-agent.pyz"
# import name -> what to take from its installation; PyYAML's C extension is left out (pure Python fallback)
DEPENDENCIES = ("prometheus_client", "pynvml", "yaml")
DATA_SUFFIXES = (".py", ".yml", ".yaml", ".json")
EPOCH = (2025, 1, 1, 0, 0, 0)
MAIN = "import sys\nfrom gpufleet.agent.main import main\nsys.exit(main())\n"


def _files(root: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in DATA_SUFFIXES and "__pycache__" not in path.parts:
            yield f"{prefix}/{path.relative_to(root).as_posix()}", path


def _dependency(name: str) -> Iterator[tuple[str, Path]]:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{name} is not installed in this Python ({sys.executable}): run make setup")
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package
        yield from _files(origin.parent, name)
    else:
        yield origin.name, origin


def entries() -> list[tuple[str, Path]]:
    """(archive name, source file) of everything the agent carries, sorted."""
    found = list(_files(PACKAGE_DIR, "gpufleet"))
    for name in DEPENDENCIES:
        found.extend(_dependency(name))
    return sorted(found)


def build(out: Path = DEFAULT_OUT) -> Path:
    """Write the zipapp to `out` (atomically) unless an identical one is there; return its path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("__main__.py", EPOCH), MAIN)
        for name, path in entries():
            info = zipfile.ZipInfo(name, EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())
    if out.exists() and _sha256(out) == _sha256(tmp):
        tmp.unlink()
    else:
        tmp.replace(out)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
