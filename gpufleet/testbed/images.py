"""Build the test bed's container images on this machine, each only when missing or out of date.

No registry is involved anywhere: test machines often cannot reach Docker Hub, and an air-gapped
fleet cannot either. The two images:

- `gpufleet/debian:bookworm` (BASE_IMAGE): debootstrap from the machine's own Debian mirror, then
  `docker import` (scripts/build-base-image.sh). Built once; `force=True` rebuilds it.
- `gpufleet/sim:<version>` (SIM_IMAGE): gpufleet's engine simulator (gpufleet/sim/image/Dockerfile)
  on that base. Everything it installs is fetched on the host first (Debian's python3 debs, the
  simulator's dependency wheels, a gpufleet wheel) and the build runs with `--network none`.
  It is also tagged `gpufleet/sim:<version>-<content hash>`; the hash covers the package source,
  pyproject.toml, the pinned dependencies and the base image, so any change to the package makes
  a new image and an unchanged tree reuses the old one in well under a second.

Used by tests/e2e (fixtures build on demand) and `make images`; `python -m gpufleet.testbed.images`
does the same from a shell.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata as metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from gpufleet import __version__
from gpufleet.paths import PACKAGE_DIR, REPO_ROOT

BASE_IMAGE = "gpufleet/debian:bookworm"
BASE_SUITE = "bookworm"
SIM_REPOSITORY = "gpufleet/sim"
SIM_IMAGE = f"{SIM_REPOSITORY}:{__version__}"
CONTENT_HASH_LABEL = "io.gpufleet.content-hash"
MIRROR_LABEL = "io.gpufleet.debian.mirror"  # set by scripts/build-base-image.sh

IMAGE_DIR = PACKAGE_DIR / "sim" / "image"
SCRIPTS_DIR = REPO_ROOT / "scripts"
# Bookworm's python3 is 3.11 with glibc 2.36: the wheels downloaded for the image must fit both.
IMAGE_PYTHON = "3.11"
IMAGE_GLIBC = (2, 36)
DEBIAN_PACKAGES = ("python3", "python3-venv")
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
APT_LISTS_MAX_AGE_S = 24 * 3600  # refresh the private apt lists at most daily: old lists point at removed debs

DOCKER_TIMEOUT_S = 900
KEEP_SIM_IMAGES = 3  # content-hash tags kept (several trees or branches on one machine each keep theirs)
HASH_LEN = 12


class ImageError(RuntimeError):
    """An image could not be checked or built; the message says what failed and what to do."""


def log(message: str) -> None:
    print(f"gpufleet.testbed: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where downloads and build contexts go: $GPUFLEET_CACHE, else .cache/testbed (git-ignored)."""
    return Path(os.environ.get("GPUFLEET_CACHE") or REPO_ROOT / ".cache" / "testbed").resolve()


def run_command(
    cmd: Sequence[str],
    *,
    what: str,
    error: type[Exception] = ImageError,
    timeout: float = DOCKER_TIMEOUT_S,
    env: dict[str, str] | None = None,
    missing_hint: str = "",
) -> subprocess.CompletedProcess[str]:
    """Run a tool, raising `error` with the tail of its output (or what is missing) when it fails."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError as exc:
        raise error(f"{what}: {cmd[0]} is not installed{missing_hint}") from exc
    except subprocess.TimeoutExpired as exc:
        raise error(f"{what}: no result after {timeout:.0f}s: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise error(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


_run = run_command


def _reuse(tagged: str, moving_tag: str) -> bool:
    """True when the content-tagged image exists; `moving_tag` is pointed at it then."""
    if not image_id(tagged):
        return False
    if image_id(moving_tag) != image_id(tagged):
        _run(["docker", "tag", tagged, moving_tag], what=f"tagging {moving_tag}")
    return True


class ContentDigest:
    """A sha256 over named parts, each framed by its name and length (no two inputs collide)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add(self, name: str, data: bytes) -> None:
        self._digest.update(f"{name}\0{len(data)}\0".encode())
        self._digest.update(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Serialise builds across processes: several test runs may share one machine and one tree."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- Docker ----------------------------------------------------------------------------------


def docker_answers() -> bool:
    """True when a `docker` client is installed and a daemon answers it."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_docker() -> None:
    """Make a Docker daemon answer, installing/starting it with scripts/docker.sh when needed."""
    if docker_answers():
        return
    script = SCRIPTS_DIR / "docker.sh"
    if not script.is_file():
        raise ImageError("no Docker daemon answers and scripts/docker.sh is not here (needs a gpufleet checkout)")
    log("no Docker daemon answers; running scripts/docker.sh")
    _run([str(script)], what="scripts/docker.sh (install/start Docker)")
    if not docker_answers():
        raise ImageError("scripts/docker.sh finished but `docker info` still fails; see /var/log/gpufleet-dockerd.log")


def image_id(ref: str) -> str | None:
    """The image's ID, or None when there is no such image locally."""
    proc = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True, text=True, timeout=60
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_labels(ref: str) -> dict[str, str]:
    proc = _run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", ref], what=f"inspect {ref}")
    return json.loads(proc.stdout) or {}


# --- base image ------------------------------------------------------------------------------


def ensure_base_image(*, force: bool = False) -> str:
    """Build BASE_IMAGE with scripts/build-base-image.sh unless it exists; return its tag.

    Needs root the first time (debootstrap). Takes about 45 s on a 2-core machine.
    """
    ensure_docker()
    if not force and image_id(BASE_IMAGE):
        return BASE_IMAGE
    script = SCRIPTS_DIR / "build-base-image.sh"
    if not script.is_file():
        raise ImageError(f"{BASE_IMAGE} is missing and scripts/build-base-image.sh is not here (needs a checkout)")
    log(f"building {BASE_IMAGE} (debootstrap; about a minute)")
    env = {**os.environ, "GPUFLEET_CACHE": str(cache_dir()), "GPUFLEET_BASE_IMAGE": BASE_IMAGE}
    proc = _run([str(script), *(["--force"] if force else [])], what=f"building {BASE_IMAGE}", env=env)
    sys.stderr.write(proc.stderr)
    if not image_id(BASE_IMAGE):
        raise ImageError(f"scripts/build-base-image.sh succeeded but there is no {BASE_IMAGE}")
    return BASE_IMAGE


# --- simulator image: inputs and content hash ------------------------------------------------

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sim_requirements() -> list[str]:
    """The simulator's runtime dependencies by name (gpufleet/sim/image/requirements.txt)."""
    names = []
    for line in (IMAGE_DIR / "requirements.txt").read_text(encoding="utf-8").splitlines():
        match = _NAME.match(line.split("#", 1)[0])
        if match:
            names.append(match.group(1))
    return names


def _installed_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError as exc:
        raise ImageError(
            f"{name} (a simulator dependency) is not installed in {sys.prefix}; run `make setup` first: "
            "the image gets the versions installed here"
        ) from exc


def pinned_requirements() -> tuple[list[str], list[str]]:
    """(top-level pins, pins of their whole dependency closure), at this environment's versions.

    Pinning to what is installed here makes the image run exactly what the host's tests ran, and
    makes the pins part of the content hash. The closure ignores markers other than extras: a pin
    too many is harmless as a pip constraint.
    """
    top = [f"{name}=={_installed_version(name)}" for name in sim_requirements()]
    seen: dict[str, str] = {}
    todo = list(sim_requirements())
    while todo:
        name = todo.pop()
        key = _canonical(name)
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. a dependency for another Python): pip picks it
        seen[key] = f"{dist.metadata['Name']}=={dist.version}"
        for requirement in dist.requires or []:
            marker = requirement.partition(";")[2]
            if "extra" in marker:
                continue
            match = _NAME.match(requirement)
            if match:
                todo.append(match.group(1))
    return top, sorted(seen.values(), key=str.lower)


def _package_files() -> list[Path]:
    """The files that make up the gpufleet package (what the wheel is built from)."""
    return sorted(
        path
        for path in PACKAGE_DIR.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")
    )


def sim_content_hash(base_id: str, constraints: Sequence[str]) -> str:
    """A hash of everything the simulator image is built from, except Debian's python3 debs.

    README.md is left out on purpose (the wheel's long description only): documentation edits
    should not rebuild engine images.
    """
    digest = ContentDigest()
    add = digest.add

    add("base", base_id.encode())
    add("python", IMAGE_PYTHON.encode())
    add("pins", "\n".join(constraints).encode())
    add("pyproject.toml", (REPO_ROOT / "pyproject.toml").read_bytes())
    for path in _package_files():
        add(path.relative_to(PACKAGE_DIR).as_posix(), path.read_bytes())
    return digest.hexdigest()


# --- simulator image: build context ----------------------------------------------------------


def _wheel_platforms() -> list[str]:
    """manylinux tags the image's glibc accepts, newest first (pip does not expand PEP 600 tags)."""
    arch = platform.machine()
    major, newest = IMAGE_GLIBC
    tags = [f"manylinux_{major}_{minor}_{arch}" for minor in range(newest, 16, -1)]
    return [*tags, f"manylinux2014_{arch}"]  # pip expands this one to manylinux2010/1


def _build_gpufleet_wheel(dist: Path, scratch: Path) -> None:
    """Build the gpufleet wheel from a clean copy of the source (a stale build/ can leak into it)."""
    src = scratch / "src"
    shutil.copytree(PACKAGE_DIR, src / "gpufleet", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--wheel-dir", str(dist), str(src)],
        what="building the gpufleet wheel",
    )  # fmt: skip


def _download_wheels(wheels: Path, top: Sequence[str], constraints: Sequence[str]) -> None:
    """Fetch the simulator's dependency wheels for the image's Python and glibc into `wheels`.

    The wheelhouse is kept per set of pins in the cache, so rebuilding the image after a change to
    gpufleet asks PyPI nothing (and works offline).
    """
    platforms = [arg for tag in _wheel_platforms() for arg in ("--platform", tag)]
    major, minor = IMAGE_PYTHON.split(".")
    key = hashlib.sha256("\n".join([IMAGE_PYTHON, *platforms, *top, "", *constraints]).encode()).hexdigest()
    house = cache_dir() / "wheelhouse" / key[:HASH_LEN]
    if not (house / ".complete").is_file():
        shutil.rmtree(house, ignore_errors=True)
        house.mkdir(parents=True)
        constraints_file = house / "constraints.txt"
        constraints_file.write_text("\n".join(constraints) + "\n", encoding="utf-8")
        _run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--only-binary=:all:", "--implementation", "cp", "--python-version", IMAGE_PYTHON,
             "--abi", f"cp{major}{minor}", *platforms, "--dest", str(house),
             "--constraint", str(constraints_file), *top],
            what="downloading the simulator's dependency wheels (pip download from PyPI)",
        )  # fmt: skip
        (house / ".complete").touch()
    wheels.mkdir(parents=True, exist_ok=True)
    for wheel in house.glob("*.whl"):
        shutil.copy2(wheel, wheels / wheel.name)


def _base_status(base: str, base_id: str) -> Path:
    """The base image's dpkg status file: apt resolves python3 against what the image already has."""
    status = cache_dir() / "apt" / f"status-{base_id.split(':')[-1][:HASH_LEN]}"
    if not status.is_file():
        status.parent.mkdir(parents=True, exist_ok=True)
        proc = _run(
            ["docker", "run", "--rm", "--network", "none", "--entrypoint", "cat", base, "/var/lib/dpkg/status"],
            what=f"reading {base}'s dpkg status",
        )
        status.write_text(proc.stdout, encoding="utf-8")
    return status


def _download_debs(debs: Path, base: str, base_id: str) -> None:
    """Download DEBIAN_PACKAGES and whatever the base image lacks for them, with apt on the host.

    apt runs with private lists, archives and sources (the base image's mirror) and the image's
    dpkg status, so the host's own apt state is neither used nor changed, and the result is
    exactly the set of debs `apt-get install` inside the image would fetch.
    """
    mirror = image_labels(base).get(MIRROR_LABEL)
    if not mirror:
        raise ImageError(f"{base} has no {MIRROR_LABEL} label; rebuild it: scripts/build-base-image.sh --force")
    root = cache_dir() / "apt"
    for sub in ("lists/partial", "archives/partial", "sources.list.d", "preferences.d"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    signed_by = f"[signed-by={DEBIAN_KEYRING}] " if DEBIAN_KEYRING.is_file() else ""
    sources = root / "sources.list"
    sources_line = f"deb {signed_by}{mirror} {BASE_SUITE} main\n"
    sources_changed = not sources.is_file() or sources.read_text(encoding="utf-8") != sources_line
    if sources_changed:
        sources.write_text(sources_line, encoding="utf-8")

    def apt(*args: str, archives: Path = root / "archives") -> list[str]:
        return [
            "apt-get", "-q",
            "-o", f"Dir::Etc::SourceList={sources}",
            "-o", f"Dir::Etc::SourceParts={root / 'sources.list.d'}",
            "-o", f"Dir::Etc::PreferencesParts={root / 'preferences.d'}",
            "-o", f"Dir::Etc::Preferences={root / 'preferences'}",
            "-o", f"Dir::State={root}",
            "-o", f"Dir::State::Lists={root / 'lists'}",
            "-o", f"Dir::State::status={_base_status(base, base_id)}",
            "-o", f"Dir::Cache={root}",
            "-o", f"Dir::Cache::Archives={archives}",
            "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Install-Recommends=false",
            "-o", f"APT::Sandbox::User={'root' if os.geteuid() == 0 else os.environ.get('USER', 'nobody')}",
            *args,
        ]  # fmt: skip

    if not shutil.which("apt-get"):
        raise ImageError("apt-get is needed to fetch Debian's python3 for the simulator image (Debian/Ubuntu host)")
    release_files = list((root / "lists").glob("*_InRelease"))
    stale = not release_files or time.time() - min(p.stat().st_mtime for p in release_files) > APT_LISTS_MAX_AGE_S
    if sources_changed or stale:
        _run(apt("update"), what=f"apt-get update (private lists, {mirror})", timeout=300)

    def fetch() -> list[str]:
        # --print-uris against an empty archive folder names every deb of the install, cached or not
        with tempfile.TemporaryDirectory(dir=root) as empty:
            (Path(empty) / "partial").mkdir()
            listing = _run(
                apt("install", "--print-uris", "-y", *DEBIAN_PACKAGES, archives=Path(empty)),
                what="apt-get install --print-uris",
            ).stdout
        names = re.findall(r"^'[^']+' (\S+\.deb) ", listing, flags=re.MULTILINE)
        if not names:
            raise ImageError(f"apt found nothing to install for {' '.join(DEBIAN_PACKAGES)}:\n{listing[-2000:]}")
        _run(apt("install", "--download-only", "-y", *DEBIAN_PACKAGES), what="apt-get --download-only", timeout=600)
        return names

    try:
        names = fetch()
    except ImageError:
        if stale or sources_changed:
            raise
        log("apt download failed; refreshing the private package lists and retrying once")
        _run(apt("update"), what=f"apt-get update (private lists, {mirror})", timeout=300)
        names = fetch()
    debs.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(root / "archives" / name, debs / name)


def _prepare_context(context: Path, base: str, base_id: str, top: Sequence[str], constraints: Sequence[str]) -> None:
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    for name in ("Dockerfile", "healthcheck.py"):
        shutil.copy2(IMAGE_DIR / name, context / name)
    (context / "requirements.txt").write_text("\n".join(top) + "\n", encoding="utf-8")
    with tempfile.TemporaryDirectory(dir=context.parent) as scratch:
        _download_debs(context / "debs", base, base_id)
        _download_wheels(context / "wheels", top, constraints)
        _build_gpufleet_wheel(context / "dist", Path(scratch))


# --- simulator image -------------------------------------------------------------------------


def sim_image_tag(content_hash: str) -> str:
    return f"{SIM_REPOSITORY}:{__version__}-{content_hash[:HASH_LEN]}"


def prune_sim_images(keep: int = KEEP_SIM_IMAGES) -> None:
    """Remove all but the `keep` newest content-hash tags of the simulator image.

    Every edit to the package makes a new image (its gpufleet layer only; the Debian, python and
    dependency layers are shared), so without this an active tree leaves dozens behind. An image a
    container still uses stays (docker refuses), and is pruned on a later build.
    """
    _prune_hashed_tags(SIM_REPOSITORY, ".+", keep)


def ensure_sim_image(*, force: bool = False) -> str:
    """Build the simulator image unless one of this exact tree exists; return its content tag.

    The content tag (`gpufleet/sim:<version>-<hash>`) names this tree's image for good, so a
    caller that runs it gets what it asked for even if another run rebuilds meanwhile; SIM_IMAGE
    (`gpufleet/sim:<version>`) is moved to the same image, for whoever wants the plain name.
    Builds the base image first if needed. A cached check takes ~0.2 s; a build ~40 s cold,
    ~15 s after a change to gpufleet only (the python and dependency layers are reused).
    """
    if not (IMAGE_DIR / "Dockerfile").is_file() or not (REPO_ROOT / "pyproject.toml").is_file():
        raise ImageError(f"building {SIM_IMAGE} needs a gpufleet source checkout (pyproject.toml, gpufleet/sim/image)")
    base = ensure_base_image()
    top, constraints = pinned_requirements()
    with cache_lock("sim-image.lock"):
        base_id = image_id(base)
        if base_id is None:
            raise ImageError(f"{base} disappeared; run scripts/build-base-image.sh")
        content_hash = sim_content_hash(base_id, constraints)
        tagged = sim_image_tag(content_hash)
        if not force and _reuse(tagged, SIM_IMAGE):
            return tagged

        started = time.monotonic()
        log(f"building {SIM_IMAGE} ({tagged})")
        context = cache_dir() / "sim-context"
        _prepare_context(context, base, base_id, top, constraints)
        prepared = time.monotonic()
        _run(
            ["docker", "build", "--network", "none", "--force-rm",
             "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"GPUFLEET_VERSION={__version__}",
             "--label", f"{CONTENT_HASH_LABEL}={content_hash}",
             "--tag", tagged, "--tag", SIM_IMAGE, str(context)],
            what=f"docker build {SIM_IMAGE}",
        )  # fmt: skip
        shutil.rmtree(context, ignore_errors=True)
        prune_sim_images()
        done = time.monotonic()
        log(
            f"built {SIM_IMAGE} in {done - started:.0f}s "
            f"(inputs {prepared - started:.0f}s, docker build {done - prepared:.0f}s)"
        )
    return tagged


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gpufleet.testbed.images`: build (or find cached) the test bed's images."""
    parser = argparse.ArgumentParser(prog="python -m gpufleet.testbed.images", description=main.__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild every image even if it exists")
    args = parser.parse_args(argv)
    try:
        ensure_docker()
        for what, build in (("base", ensure_base_image), ("host", ensure_host_image),
                            ("simulator", ensure_sim_image), ("check", ensure_busybox_image)):
            started = time.monotonic()
            log(f"{what} image: checking (built only when missing or out of date)")
            tag = build(force=args.force)
            print(f"{tag} ({what} image, {time.monotonic() - started:.1f}s)", flush=True)
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def remove_images_and_cache() -> list[str]:
    """Remove every test bed image (each gpufleet/* repository this module builds) and the cache folder.

    What `make demo-down` removes beyond the hosts; the next build starts from debootstrap. An
    image a container still uses is refused by Docker, reported in ImageError.
    """
    removed = []
    for repository in (SIM_REPOSITORY, HOST_REPOSITORY, BUSYBOX_IMAGE.split(":")[0], BASE_IMAGE.split(":")[0]):
        listing = _run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", repository],
                       what="docker image ls").stdout.split()
        if listing:
            _run(["docker", "image", "rm", *listing], what=f"docker image rm {repository}")
            removed += [f"image {tag}" for tag in listing]
    cache = cache_dir()
    if cache.exists():
        shutil.rmtree(cache)
        removed.append(f"cache folder {cache}")
    return removed


# --- host image (the test bed's GPU hosts) ---------------------------------------------------
#
# gpufleet/host:bookworm: a Debian host booting systemd (gpufleet/testbed/host_image), run by
# gpufleet.testbed.hosts. Its debs are fetched by apt in a throwaway container of the base image
# (the same route, Docker's bridge to the base image's Debian mirror, the hosts' own apt takes),
# into a pool of .debs in the cache that the hosts' apt caches are seeded from too; the build
# itself runs with `--network none`. Tagged `gpufleet/host:bookworm-<content hash>` as well.

HOST_REPOSITORY = "gpufleet/host"
HOST_IMAGE = f"{HOST_REPOSITORY}:{BASE_SUITE}"
HOST_IMAGE_DIR = PACKAGE_DIR / "testbed" / "host_image"
KEEP_HOST_IMAGES = 3
BUSYBOX_IMAGE = "gpufleet/busybox:standin"
BUSYBOX_APPLETS = ("sh", "cat", "ls", "echo", "head", "grep", "sleep")


def apt_pool_dir() -> Path:
    """Debian .debs downloaded for the host image and by the hosts' apt, kept across runs."""
    return cache_dir() / "apt-archives" / "pool"


def host_packages() -> list[str]:
    """The host image's Debian packages (host_image/packages.txt)."""
    lines = (HOST_IMAGE_DIR / "packages.txt").read_text(encoding="utf-8").splitlines()
    return [word for line in lines for word in line.split("#", 1)[0].split()]


def host_content_hash(base_id: str) -> str:
    """A hash of everything the host image is built from except the debs' versions (as the sim's)."""
    digest = hashlib.sha256()
    digest.update(f"base\0{base_id}\0".encode())
    for path in sorted(p for p in HOST_IMAGE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        data = path.read_bytes()
        name = path.relative_to(HOST_IMAGE_DIR).as_posix()
        executable = path.stat().st_mode & 0o111 != 0  # the entrypoint must stay executable
        digest.update(f"{name}\0{executable}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def host_image_tag(content_hash: str) -> str:
    return f"{HOST_IMAGE}-{content_hash[:HASH_LEN]}"


def _download_debs_in_container(debs: Path, base: str, packages: Sequence[str]) -> None:
    """Have apt in a container of `base` download `packages` (and what base lacks for them) to `debs`.

    apt works against the base image's own dpkg status and mirror, so the set is exactly what
    `apt-get install` in the image needs. The download goes into apt_pool_dir(), so a rebuild
    fetches only what changed; the debs of this install are then copied into `debs`.
    """
    pool = apt_pool_dir()
    (pool / "partial").mkdir(parents=True, exist_ok=True)
    names = " ".join(packages)
    script = (
        "set -e; apt-get update -qq; "
        f"apt-get install -qq -y --no-install-recommends --download-only {names} >&2; "
        # --print-uris against an empty archive folder names every deb of the install, cached or not
        "mkdir -p /tmp/empty/partial; "
        f"apt-get install -qq -y --no-install-recommends --print-uris -o Dir::Cache::Archives=/tmp/empty {names}"
    )
    listing = _run(
        ["docker", "run", "--rm", "--volume", f"{pool}:/var/cache/apt/archives", "--entrypoint", "sh", base,
         "-c", script],
        what=f"downloading the host image's debs with apt in a {base} container (needs its Debian mirror)",
        timeout=600,
    ).stdout  # fmt: skip
    files = re.findall(r"^'[^']+' (\S+\.deb) ", listing, flags=re.MULTILINE)
    if not files:
        raise ImageError(f"apt found nothing to install for {names} in {base}:\n{listing[-2000:]}")
    debs.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copy2(pool / name, debs / name)


def _prune_hashed_tags(repository: str, prefix_pattern: str, keep: int) -> None:
    """Remove all but the `keep` newest `<prefix>-<hash>` tags of `repository` (see prune_sim_images)."""
    proc = _run(["docker", "image", "ls", "--format", "{{.Tag}}\t{{.CreatedAt}}", repository], what="listing images")
    hashed = re.compile(rf"^{prefix_pattern}-[0-9a-f]{{{HASH_LEN}}}$")
    rows = [line.split("\t", 1) for line in proc.stdout.splitlines() if "\t" in line]
    tags = sorted((created, tag) for tag, created in rows if hashed.match(tag))
    stale = [f"{repository}:{tag}" for _, tag in tags[: max(len(tags) - keep, 0)]]
    if stale:
        subprocess.run(["docker", "image", "rm", *stale], capture_output=True, timeout=120)


def ensure_host_image(*, force: bool = False) -> str:
    """Build the host image unless one of this exact host_image/ and base exists; return its content tag.

    HOST_IMAGE (`gpufleet/host:bookworm`) is moved to the same image. A cached check takes ~0.2 s;
    a build about 40 s cold (most of it apt downloading ~45 MB of debs), ~20 s with the debs in
    the pool.
    """
    if not (HOST_IMAGE_DIR / "Dockerfile").is_file():
        raise ImageError(f"building {HOST_IMAGE} needs gpufleet/testbed/host_image (a gpufleet source checkout)")
    base = ensure_base_image()
    with cache_lock("host-image.lock"):
        base_id = image_id(base)
        if base_id is None:
            raise ImageError(f"{base} disappeared; run scripts/build-base-image.sh")
        content_hash = host_content_hash(base_id)
        tagged = host_image_tag(content_hash)
        if not force and _reuse(tagged, HOST_IMAGE):
            return tagged

        started = time.monotonic()
        log(f"building {HOST_IMAGE} ({tagged})")
        context = cache_dir() / "host-context"
        shutil.rmtree(context, ignore_errors=True)
        shutil.copytree(HOST_IMAGE_DIR, context, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _download_debs_in_container(context / "debs", base, host_packages())
        prepared = time.monotonic()
        _run(
            ["docker", "build", "--network", "none", "--force-rm",
             "--build-arg", f"BASE_IMAGE={base}", "--label", f"{CONTENT_HASH_LABEL}={content_hash}",
             "--tag", tagged, "--tag", HOST_IMAGE, str(context)],
            what=f"docker build {HOST_IMAGE}",
        )  # fmt: skip
        shutil.rmtree(context, ignore_errors=True)
        _prune_hashed_tags(HOST_REPOSITORY, re.escape(BASE_SUITE), KEEP_HOST_IMAGES)
        done = time.monotonic()
        log(
            f"built {HOST_IMAGE} in {done - started:.0f}s "
            f"(debs {prepared - started:.0f}s, docker build {done - prepared:.0f}s)"
        )
    return tagged


# --- busybox stand-in (the roles' layered GPU check runs in it) --------------------------------


def _download_busybox_deb(folder: Path) -> Path:
    """`apt-get download busybox-static` into `folder`, with the machine's own apt sources and lists."""
    folder.chmod(0o755)  # apt downloads as its sandbox user _apt, which must be able to write here
    try:
        proc = subprocess.run(
            ["apt-get", "download", "-q", "busybox-static"], cwd=folder, capture_output=True, text=True, timeout=300
        )
    except FileNotFoundError as exc:
        raise ImageError(f"apt-get is needed to download busybox-static for {BUSYBOX_IMAGE} (Debian host)") from exc
    debs = sorted(folder.glob("busybox-static_*.deb"))
    if proc.returncode != 0 or not debs:
        raise ImageError(
            f"apt-get download busybox-static failed (exit {proc.returncode}): {proc.stderr.strip()[-1000:]}\n"
            "if apt does not know the package or gets 404s, refresh this machine's lists: apt-get update"
        )
    return debs[0]


def _busybox_rootfs(deb: Path, root: Path) -> None:
    """A root file system of just /bin/busybox and its applet links (and the usual empty folders)."""
    extracted = root.parent / "deb"
    _run(["dpkg-deb", "-x", str(deb), str(extracted)], what=f"extracting {deb.name}")
    binary = extracted / "bin" / "busybox"
    if not binary.is_file():
        raise ImageError(f"{deb.name} has no bin/busybox")
    for folder in ("bin", "dev", "etc", "proc", "sys", "tmp"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, root / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")


def ensure_busybox_image(*, force: bool = False) -> str:
    """Build BUSYBOX_IMAGE (`docker import` of Debian's busybox-static) unless it exists; return its tag.

    The roles' layered GPU check starts a container on it inside a host; any image with a shell
    would do, and this one needs no registry and is ~1 MB, so loading it into a host is instant.
    """
    ensure_docker()
    with cache_lock("busybox-image.lock"):
        if not force and image_id(BUSYBOX_IMAGE):
            return BUSYBOX_IMAGE
        log(f"building {BUSYBOX_IMAGE} from Debian's busybox-static")
        with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
            work = Path(scratch)
            deb = _download_busybox_deb(work)
            root = work / "rootfs"
            _busybox_rootfs(deb, root)
            tar = subprocess.Popen(
                ["tar", "--numeric-owner", "--owner=0", "--group=0", "-C", str(root), "-c", "."],
                stdout=subprocess.PIPE,
            )
            try:
                proc = subprocess.run(
                    ["docker", "import", "--change", 'CMD ["/bin/sh"]',
                     "--change", f"LABEL io.gpufleet.busybox.deb={deb.name}",
                     "--message", f"gpufleet: {deb.name}", "-", BUSYBOX_IMAGE],
                    stdin=tar.stdout, capture_output=True, text=True, timeout=DOCKER_TIMEOUT_S,
                )  # fmt: skip
            finally:
                if tar.stdout:
                    tar.stdout.close()
                tar.wait(timeout=60)
            if proc.returncode != 0 or tar.returncode != 0:
                raise ImageError(f"docker import {BUSYBOX_IMAGE} failed: {proc.stderr.strip()[-1000:]}")
    return BUSYBOX_IMAGE


if __name__ == "__main__":
    sys.exit(main())
