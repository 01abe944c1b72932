"""Build one .deb from a catalogue entry with dpkg-deb: stage the files, write DEBIAN/, pack.

The debs are reproducible: every file gets the same fixed mtime and dpkg-deb gets
SOURCE_DATE_EPOCH, so a package whose contents did not change comes out byte-identical and keeps
its hashes in the indexes. Ownership is root:root without fakeroot (--root-owner-group).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from gpufleet.testbed.images import run_command
from gpufleet.testbed.standin.packages import LONG_DESCRIPTION, MAINTAINER, Package, StandinError

SOURCE_DATE_EPOCH = 1735689600  # 2025-01-01: every file's mtime, so identical inputs give identical debs
TOOL_TIMEOUT_S = 120


def run_tool(
    cmd: Sequence[str], *, what: str, timeout: float = TOOL_TIMEOUT_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a build tool, raising StandinError with the tail of its output (or how to install it)."""
    return run_command(cmd, what=what, error=StandinError, timeout=timeout, env=env,
                       missing_hint=" (scripts/bootstrap.sh installs it)")


def installed_size_kib(package: Package) -> int:
    """Installed-Size as dpkg-gencontrol counts it, near enough: KiB of file data, plus one."""
    return sum(-(-len(entry.data) // 1024) for entry in package.files if entry.link is None) + 1


def control_fields(package: Package) -> list[tuple[str, str]]:
    """The control paragraph, in the order dpkg and apt-ftparchive write it (Description last)."""
    fields = [
        ("Package", package.name),
        ("Version", package.version),
        ("Architecture", package.arch),
        ("Maintainer", MAINTAINER),
        ("Installed-Size", str(installed_size_kib(package))),
    ]
    for name, relations in (("Depends", package.depends), ("Conflicts", package.conflicts),
                            ("Replaces", package.replaces)):  # fmt: skip
        if relations:
            fields.append((name, ", ".join(relations)))
    fields += [("Section", package.section), ("Priority", "optional")]
    fields.append(("Description", "\n".join([package.description, *(f" {line}" for line in LONG_DESCRIPTION)])))
    return fields


def control_text(fields: Sequence[tuple[str, str]]) -> str:
    return "".join(f"{name}: {value}\n" for name, value in fields)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    path.write_bytes(data)
    os.chmod(path, mode)


def stage(package: Package, root: Path) -> None:
    """Lay out the package's tree under `root`: its files, then DEBIAN/ (control, md5sums, conffiles, scripts)."""
    md5sums = []
    for entry in package.files:
        target = root / entry.path.lstrip("/")
        if entry.link is not None:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            target.symlink_to(entry.link)
            continue
        _write(target, entry.data, entry.mode)
        if not entry.conffile:  # dh_md5sums leaves conffiles out: dpkg tracks those itself
            md5sums.append(f"{hashlib.md5(entry.data).hexdigest()}  {entry.path.lstrip('/')}\n")
    debian = root / "DEBIAN"
    _write(debian / "control", control_text(control_fields(package)).encode(), 0o644)
    if md5sums:
        _write(debian / "md5sums", "".join(sorted(md5sums)).encode(), 0o644)
    conffiles = [entry.path for entry in package.files if entry.conffile]
    if conffiles:
        _write(debian / "conffiles", "".join(f"{path}\n" for path in conffiles).encode(), 0o644)
    for name, text in package.scripts:
        _write(debian / name, text, 0o755)
    for path in [root, *root.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            os.chmod(path, 0o755)  # whatever the umask: installed folders must be world-readable
        os.utime(path, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH), follow_symlinks=False)


def build_deb(package: Package, dest: Path, scratch: Path) -> Path:
    """Build `package` into dest/<name>_<version>_<arch>.deb, staging under `scratch` (removed after)."""
    root = scratch / f"{package.name}_{package.version}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, mode=0o755)
    try:
        stage(package, root)
        out = dest / package.filename
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}
        run_tool(
            ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(out)],
            what=f"dpkg-deb --build {package.filename}",
            env=env,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out
