"""apt repositories, flat or with dists/: the signing key, Packages/Release indexes, InRelease and Release.gpg.

The key is a throwaway made once per cache (<cache>/standin-gnupg, a private GNUPGHOME: the
user's ~/.gnupg is never read or written), without a passphrase, so builds sign in batch mode.
It signs nothing but the test bed's mirror, and says so in its user ID.

The indexes are written here rather than by apt-ftparchive (apt-utils) so that the mirror needs
only dpkg-deb and gpg: the catalogue already knows every control field, and a Release is just
hashes of two files (Packages, Packages.gz; with a dists/ layout, under COMPONENT/binary-ARCH/).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from gpufleet.testbed.standin.debs import control_fields, run_tool
from gpufleet.testbed.standin.packages import Package, Repository, StandinError

KEY_UID = "gpufleet test bed mirror (stand-in packages, not NVIDIA)"
ORIGIN = "gpufleet test bed"
RELEASE_DESCRIPTION = "gpufleet STAND-IN packages for the test bed (no GPU; not NVIDIA's or Grafana's software)"
INDEXES = ("Packages", "Packages.gz")
HASHES = (("MD5Sum", "md5"), ("SHA256", "sha256"), ("SHA512", "sha512"))
SOCKET_PATH_MAX = 100  # gpg-agent's socket lives in the home; AF_UNIX paths stop at 107 bytes


@dataclass(frozen=True)
class SigningKey:
    """The mirror's key: where it lives, its fingerprint, and its public half in both encodings."""

    home: Path
    fingerprint: str
    public: bytes  # binary OpenPGP, for signed-by= and keyrings (*.gpg)
    armored: bytes  # ASCII-armored, as NVIDIA serves libnvidia-container/gpgkey


# --- the key --------------------------------------------------------------------------------------


def gpg(home: Path, *args: str, what: str) -> str:
    return run_tool(["gpg", "--batch", "--yes", "--no-tty", "--homedir", str(home), *args], what=what).stdout


def stop_agent(home: Path) -> None:
    """End the gpg-agent that signing started for `home` (one per home; it would linger otherwise)."""
    if shutil.which("gpgconf") and home.is_dir():
        run_tool(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], what="stopping gpg-agent")


def _fingerprint(home: Path) -> str:
    listing = gpg(home, "--with-colons", "--list-secret-keys", what="listing the test bed key")
    fingerprints = [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")]
    if not fingerprints:
        raise StandinError(f"{home} holds no secret key; remove the folder and build again to make a new key")
    return fingerprints[0]


def _generate(home: Path) -> None:
    """Make the key in a fresh home next to `home`, then move it into place (never half a key)."""
    fresh = home.with_name(home.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(mode=0o700, parents=True)
    try:
        gpg(fresh, "--pinentry-mode", "loopback", "--passphrase", "", "--quick-generate-key", KEY_UID,
            "ed25519", "sign", "never", what="generating the test bed signing key")  # fmt: skip
        fingerprint = _fingerprint(fresh)
        gpg(fresh, "--output", str(fresh / "public.gpg"), "--export", fingerprint, what="exporting the key")
        gpg(fresh, "--armor", "--output", str(fresh / "public.asc"), "--export", fingerprint, what="exporting the key")
        (fresh / "fingerprint").write_text(fingerprint + "\n", encoding="utf-8")
    finally:
        stop_agent(fresh)
    fresh.rename(home)


def ensure_key(home: Path) -> SigningKey:
    """The key in `home`, generated the first time. Callers hold the build lock."""
    if len(str(home / "S.gpg-agent.browser")) > SOCKET_PATH_MAX:
        raise StandinError(f"{home} is too long a path for gpg-agent's socket; set GPUFLEET_CACHE to a shorter folder")
    if not (home / "fingerprint").is_file():
        if home.exists():
            raise StandinError(f"{home} exists but is not a complete test bed key; remove it and build again")
        _generate(home)
    return SigningKey(
        home=home,
        fingerprint=(home / "fingerprint").read_text(encoding="utf-8").strip(),
        public=(home / "public.gpg").read_bytes(),
        armored=(home / "public.asc").read_bytes(),
    )


# --- indexes ----------------------------------------------------------------------------------------


def packages_stanza(package: Package, deb: bytes, filename: str | None = None) -> str:
    """The deb's Packages entry: its control fields plus where it is (default flat: ./name) and its hashes."""
    fields = control_fields(package)
    location = [
        ("Filename", filename or f"./{package.filename}"),
        ("Size", str(len(deb))),
        ("MD5sum", hashlib.md5(deb).hexdigest()),
        ("SHA256", hashlib.sha256(deb).hexdigest()),
    ]
    ordered = [*fields[:-1], *location, fields[-1]]  # Description stays last, as apt-ftparchive writes it
    return "".join(f"{name}: {value}\n" for name, value in ordered)


def write_packages(root: Path, repo: Repository) -> Path:
    """Packages and Packages.gz for the debs already under `root`, sorted by name then version (newest first).

    Returns the folder they went to (the root, or dists/SUITE/COMPONENT/binary-ARCH).
    """
    ordered = sorted(repo.packages, key=lambda package: package.name)  # stable: catalogue order keeps newest first
    stanzas = []
    for package in ordered:
        where = repo.deb_path(package)
        stanzas.append(packages_stanza(package, (root / where).read_bytes(), f"./{where}" if repo.flat else where))
    text = "\n".join(stanzas)
    folder = root / repo.release_dir / repo.index_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Packages").write_text(text, encoding="utf-8")
    (folder / "Packages.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    return folder


def release_text(root: Path, repo: Repository, now: float | None = None) -> str:
    """The Release: who, when, and the hashes of the indexes apt fetches (paths relative to the Release).

    A flat repository's names no suite; a dists/ one names its suite (as Suite and Codename, as
    apt.grafana.com does), component and architecture, which apt checks against the sources line.
    """
    date = time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime(now))
    lines = [f"Origin: {ORIGIN}", f"Label: {repo.label}"]
    if repo.flat:
        lines.append("Architectures: amd64 all")
    else:
        lines += [f"Suite: {repo.suite}", f"Codename: {repo.suite}", f"Architectures: {repo.architecture}",
                  f"Components: {repo.component}"]  # fmt: skip
    lines += [f"Date: {date}", f"Description: {RELEASE_DESCRIPTION}"]
    release_dir = root / repo.release_dir
    indexes = [f"{repo.index_dir}/{name}" if repo.index_dir else name for name in INDEXES]
    for field_name, algorithm in HASHES:
        lines.append(f"{field_name}:")
        for name in indexes:
            data = (release_dir / name).read_bytes()
            lines.append(f" {hashlib.new(algorithm, data).hexdigest()} {len(data):>8} {name}")
    return "\n".join(lines) + "\n"


def sign_release(repo: Path, key: SigningKey) -> None:
    """InRelease (clear-signed) and Release.gpg (detached, armored) from `repo`/Release."""
    common = ("--pinentry-mode", "loopback", "--passphrase", "", "--local-user", key.fingerprint,
              "--digest-algo", "SHA512")  # fmt: skip
    release = str(repo / "Release")
    gpg(key.home, *common, "--clearsign", "--output", str(repo / "InRelease"), release, what="signing InRelease")
    gpg(key.home, *common, "--armor", "--detach-sign", "--output", str(repo / "Release.gpg"), release,
        what="signing Release.gpg")  # fmt: skip


def write_repository(root: Path, repo: Repository, key: SigningKey) -> None:
    """Indexes and signatures for the repository at `root`, whose debs are already in place."""
    write_packages(root, repo)
    release_dir = root / repo.release_dir
    (release_dir / "Release").write_text(release_text(root, repo), encoding="utf-8")
    sign_release(release_dir, key)
