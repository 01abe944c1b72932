"""The test bed's package mirror: stand-ins for NVIDIA's and Grafana's packages, in repositories laid out as theirs.

On a machine with no GPU and no access to NVIDIA's or Grafana's repositories, the test bed runs
gpufleet's roles unchanged against Debian 12 containers; only the repository URLs point at this
mirror. Its packages carry the real names, versions and dependencies, and their programs
(nvidia-smi, nvidia-ctk, the container hook, grafana-server, ...) behave like the real ones for
what the roles use while saying plainly that they are stand-ins (see packages.py for the
catalogue, files/ for them).

`build_mirror(out)` writes the mirror into `out`, to be served as-is by any static HTTP server at
a base URL B (MirrorInfo's *_url methods give the roles' URLs under B):

- B/cuda/repos/{debian12,ubuntu2204,ubuntu2404}/x86_64/  flat, with cuda-keyring_1.1-1_all.deb
- B/libnvidia-container/stable/deb/amd64/                 flat; B/libnvidia-container/gpgkey
- B/testbed/debian/                                      flat; B/testbed/keyring.gpg
- B/grafana/deb  stable main (dists/, pool/)             as apt.grafana.com; B/grafana/gpg.key

All are signed by one throwaway key (repo.py). A build is cached by a hash of its inputs (this
package's code and files, the kernel release, the key): an unchanged call returns in
milliseconds; `python -m gpufleet.testbed.standin build OUT` does the same from a shell.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gpufleet.testbed.images import ContentDigest, cache_dir, cache_lock, log
from gpufleet.testbed.standin import packages as catalogue
from gpufleet.testbed.standin.debs import build_deb
from gpufleet.testbed.standin.packages import Package, Repository, StandinError, check_kernel_release
from gpufleet.testbed.standin.repo import SigningKey, ensure_key, stop_agent, write_repository

__all__ = ["MirrorInfo", "StandinError", "build_mirror", "content_hash"]

PACKAGE_DIR = Path(__file__).resolve().parent
STAMP = ".gpufleet-standin.json"  # in the mirror's root: the content hash it was built from
OWNED = ("cuda", "libnvidia-container", "testbed", "grafana")  # what a build replaces in the mirror's root
GNUPG_DIR = "standin-gnupg"
LOCK = "standin.lock"
FORMAT = "1"  # bump to rebuild every mirror when the layout changes in a way the sources do not show


@dataclass(frozen=True)
class MirrorInfo:
    """A built mirror: where it is, what it was built from, and the URLs the roles need under a base URL."""

    out: Path
    content_hash: str
    key_fingerprint: str
    kernel_release: str
    built: bool  # False when the mirror was already up to date

    @property
    def keyring(self) -> Path:
        """The signing key, binary (for signed-by= and gpgv --keyring)."""
        return self.out / "testbed" / "keyring.gpg"

    @property
    def armored_key(self) -> Path:
        return self.out / "libnvidia-container" / "gpgkey"

    def cuda_repo_url(self, base: str, distro: str = "debian12") -> str:
        return f"{base.rstrip('/')}/cuda/repos/{distro}/x86_64/"

    def cuda_keyring_url(self, base: str, distro: str = "debian12") -> str:
        return self.cuda_repo_url(base, distro) + f"cuda-keyring_{catalogue.KEYRING_VERSION}_all.deb"

    def toolkit_repo_url(self, base: str) -> str:
        return f"{base.rstrip('/')}/libnvidia-container/stable/deb/amd64"

    def toolkit_gpgkey_url(self, base: str) -> str:
        return f"{base.rstrip('/')}/libnvidia-container/gpgkey"

    def testbed_repo_url(self, base: str) -> str:
        return f"{base.rstrip('/')}/testbed/debian/"

    def testbed_keyring_url(self, base: str) -> str:
        return f"{base.rstrip('/')}/testbed/keyring.gpg"

    def grafana_repo_url(self, base: str) -> str:
        """For `deb [signed-by=...] URL stable main`, as https://apt.grafana.com is."""
        return f"{base.rstrip('/')}/{catalogue.GRAFANA_REPO}"

    def grafana_gpgkey_url(self, base: str) -> str:
        """The signing key, ASCII-armored, as https://apt.grafana.com/gpg.key."""
        return f"{base.rstrip('/')}/{catalogue.GRAFANA_KEY}"


def _input_files() -> list[Path]:
    """This package's code and stand-in files: whatever changes the debs or the repositories."""
    sources = list(PACKAGE_DIR.glob("*.py"))
    files = [path for path in catalogue.FILES_DIR.rglob("*") if path.is_file() and "__pycache__" not in path.parts]
    return sorted(sources) + sorted(files)


def content_hash(kernel_release: str, key_fingerprint: str) -> str:
    """A hash of everything a mirror is built from (the Release dates aside)."""
    digest = ContentDigest()
    add = digest.add

    add("format", FORMAT.encode())
    add("kernel_release", kernel_release.encode())
    add("key", key_fingerprint.encode())
    for path in _input_files():
        add(path.name if path.suffix == ".py" else f"files/{path.relative_to(catalogue.FILES_DIR)}", path.read_bytes())
    return digest.hexdigest()


def _stamp(out: Path) -> dict:
    try:
        return json.loads((out / STAMP).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}


def _up_to_date(out: Path, digest: str) -> bool:
    return _stamp(out).get("content_hash") == digest and all((out / name).is_dir() for name in OWNED)


def _check_ours(out: Path) -> None:
    """Refuse to replace folders a build did not make (OUTDIR pointed at the wrong place)."""
    foreign = [name for name in OWNED if (out / name).exists()]
    if foreign and not (out / STAMP).is_file():
        raise StandinError(
            f"{out} already has {', '.join(foreign)} but no {STAMP}: it was not made by the stand-in build; "
            "pick an empty or new folder for the mirror, or remove those"
        )


def _build_debs(stage: Path, repositories: tuple[Repository, ...]) -> None:
    """Each distinct package built once (in parallel: dpkg-deb is the cold build's cost), linked into its repos."""
    unique: list[Package] = list(dict.fromkeys(p for repo in repositories for p in repo.packages))
    pool = stage / ".pool"
    scratch = stage / ".scratch"
    dests = [pool / str(number) for number in range(len(unique))]  # one folder each: names repeat (cuda-keyring)
    for dest in dests:
        dest.mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 2)) as executor:
        jobs = executor.map(lambda p, d: build_deb(p, d, scratch / d.name), unique, dests)
        built = dict(zip(unique, jobs, strict=True))
    for repo in repositories:
        for package in repo.packages:
            target = stage / repo.path / repo.deb_path(package)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(built[package], target)
    shutil.rmtree(pool)
    shutil.rmtree(scratch, ignore_errors=True)


def _build_tree(stage: Path, key: SigningKey, kernel_release: str) -> None:
    repositories = catalogue.repositories(key.public, kernel_release)
    _build_debs(stage, repositories)
    for repo in repositories:
        write_repository(stage / repo.path, repo, key)
    (stage / "libnvidia-container" / "gpgkey").write_bytes(key.armored)
    (stage / catalogue.GRAFANA_KEY).write_bytes(key.armored)
    (stage / "testbed" / "keyring.gpg").write_bytes(key.public)


def _swap_in(out: Path, stage: Path) -> None:
    """Replace the mirror's folders with the staged ones, one rename each.

    `out` itself stays (only its entries move), so a server or a bind mount holding it keeps working.
    """
    (out / STAMP).unlink(missing_ok=True)
    trash = out / f".old-{os.getpid()}"
    trash.mkdir()
    for name in OWNED:
        if (out / name).exists():
            (out / name).rename(trash / name)
        (stage / name).rename(out / name)
    shutil.rmtree(trash)


def build_mirror(out: Path, kernel_release: str | None = None) -> MirrorInfo:
    """Build the stand-in mirror into `out` unless it is up to date; `kernel_release` defaults to `uname -r`."""
    release = check_kernel_release(kernel_release or platform.uname().release)
    out = Path(out).absolute()
    with cache_lock(LOCK):  # one build at a time: the key is made once, mirrors are swapped whole
        key = ensure_key(cache_dir() / GNUPG_DIR)
        digest = content_hash(release, key.fingerprint)
        if _up_to_date(out, digest):
            return MirrorInfo(out, digest, key.fingerprint, release, built=False)
        _check_ours(out)
        started = time.monotonic()
        log(f"building the stand-in package mirror in {out} (kernel {release})")
        out.mkdir(parents=True, exist_ok=True)
        for leftover in [*out.glob(".staging-*"), *out.glob(".old-*")]:  # from a build that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        stage = out / f".staging-{os.getpid()}"
        try:
            _build_tree(stage, key, release)
            _swap_in(out, stage)
        finally:
            stop_agent(key.home)
            shutil.rmtree(stage, ignore_errors=True)
        stamp = {"content_hash": digest, "key_fingerprint": key.fingerprint, "kernel_release": release}
        (out / f"{STAMP}.tmp").write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        os.replace(out / f"{STAMP}.tmp", out / STAMP)
        log(f"built the stand-in mirror in {time.monotonic() - started:.1f}s")
    return MirrorInfo(out, digest, key.fingerprint, release, built=True)
