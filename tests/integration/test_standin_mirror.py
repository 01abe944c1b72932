"""The stand-in mirror as apt sees it: built by the CLI, served over HTTP on loopback, used by apt-get.

apt runs with a private configuration (APT_CONFIG: its own sources, preferences, lists, cache,
status and log folders, no apt.conf.d), so this machine's own apt state is neither read for
packages nor changed. Sources name the keys as the roles will: the keyring from the cuda-keyring
package, the dearmored libnvidia-container gpgkey, the test bed's keyring.gpg.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NEW, OLD = "580.126.20-1", "580.105.08-1"
DRIVER_DEPS = ("nvidia-kernel-open-dkms", "nvidia-driver-cuda", "nvidia-persistenced", "libnvidia-ml1")
PRIVATE_DIRS = ("Dir::Etc::sourcelist/f", "Dir::Etc::sourceparts/d", "Dir::Etc::preferences/f", "Dir::Etc::parts/d",
                "Dir::State::lists/d", "Dir::State::status/f", "Dir::Cache::archives/d", "Dir::Log/d")  # fmt: skip


def build(out: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPUFLEET_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "gpufleet.testbed.standin", "build", str(out), "--kernel-release", "6.1.0-99-amd64"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("standin")
    result = build(work / "mirror", work / "cache")
    assert result.returncode == 0, result.stderr
    assert ": built in " in result.stdout
    return work / "mirror"


@pytest.fixture(scope="module")
def base_url(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The mirror served as-is by python's http.server on 127.0.0.1 and a free port."""
    log = (tmp_path_factory.mktemp("http") / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(mirror), "0"],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (http://127.0.0.1:N/) ..."
        match = re.search(r"port (\d+)", banner)
        assert match, f"http.server did not start: {banner!r}"
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


@dataclass
class Apt:
    """apt-get/apt-cache with a private configuration under `root`."""

    root: Path

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "APT_CONFIG": str(self.root / "apt.conf"), "LC_ALL": "C"}
        proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, f"{tool} {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    @property
    def archives(self) -> Path:
        return self.root / "cache/archives"


def private_apt(root: Path, sources: list[str], preferences: str = "") -> Apt:
    for sub in ("apt.conf.d", "sources.list.d", "preferences.d", "state/lists/partial", "cache/archives/partial",
                "log"):  # fmt: skip
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "status").write_text("")
    (root / "sources.list").write_text("".join(f"{line}\n" for line in sources))
    (root / "preferences").write_text(preferences)
    settings = {
        "Dir::Etc::Parts": root / "apt.conf.d",
        "Dir::Etc::Main": root / "apt.conf.main",
        "Dir::Etc::SourceList": root / "sources.list",
        "Dir::Etc::SourceParts": root / "sources.list.d",
        "Dir::Etc::Preferences": root / "preferences",
        "Dir::Etc::PreferencesParts": root / "preferences.d",
        "Dir::State": root / "state",
        "Dir::State::Lists": root / "state/lists",
        "Dir::State::status": root / "status",
        "Dir::Cache": root / "cache",
        "Dir::Cache::Archives": root / "cache/archives",
        "Dir::Log": root / "log",
        "Debug::NoLocking": "1",
        "APT::Sandbox::User": "root",
        "Acquire::Languages": "none",
        "Acquire::http::Proxy": "DIRECT",
        "APT::Install-Recommends": "false",
    }
    (root / "apt.conf").write_text("".join(f'{key} "{value}";\n' for key, value in settings.items()))
    return Apt(root)


def dearmor(armored: Path, target: Path) -> Path:
    home = target.parent / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(["gpg", "--homedir", str(home), "--dearmor", "--output", str(target), str(armored)], check=True)
    return target


def extract(deb: Path, target: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return target


@pytest.fixture(scope="module")
def apt(mirror: Path, base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Apt:
    """apt, updated from every repository of the mirror, with the pinning package's preferences."""
    keys = tmp_path_factory.mktemp("keys")
    cuda_keyring = extract(mirror / "cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb", keys / "keyring")
    cuda_key = cuda_keyring / "usr/share/keyrings/cuda-archive-keyring.gpg"
    toolkit_key = dearmor(mirror / "libnvidia-container/gpgkey", keys / "nvidia-container-toolkit-keyring.gpg")
    sources = [
        f"deb [signed-by={cuda_key}] {base_url}/cuda/repos/{distro}/x86_64/ /"
        for distro in ("debian12", "ubuntu2204", "ubuntu2404")
    ]
    sources += [
        f"deb [signed-by={toolkit_key}] {base_url}/libnvidia-container/stable/deb/amd64 /",
        f"deb [signed-by={mirror / 'testbed/keyring.gpg'}] {base_url}/testbed/debian/ /",
    ]
    pinning = extract(mirror / f"cuda/repos/debian12/x86_64/nvidia-driver-pinning-580_{NEW}_all.deb", keys / "pin")
    preferences = (pinning / "etc/apt/preferences.d/nvidia-driver-pinning-580").read_text()
    private = private_apt(tmp_path_factory.mktemp("apt"), sources, preferences)
    update = private.run("apt-get", "update")
    problems = [line for line in (update.stdout + update.stderr).splitlines() if line[:2] in ("W:", "E:", "N:")]
    assert problems == [], "apt-get update complained:\n" + "\n".join(problems)
    return private


def test_the_cli_build_is_cached(mirror: Path) -> None:
    started = time.monotonic()
    result = build(mirror, mirror.parent / "cache")
    assert result.returncode == 0, result.stderr
    assert ": up to date in " in result.stdout
    assert time.monotonic() - started < 5  # the interpreter's start included; the check itself is milliseconds


def test_apt_reads_and_writes_only_its_private_folders(apt: Apt) -> None:
    """Every folder and file apt uses resolves below the private root: the machine's apt state is untouched."""
    for key in PRIVATE_DIRS:
        value = apt.run("apt-config", "shell", "VALUE", key).stdout
        path = re.fullmatch(r"VALUE='([^']*)'\n", value)
        assert path and path.group(1).startswith(f"{apt.root}/"), (key, value)


def test_update_accepts_every_repository(apt: Apt) -> None:
    lists = sorted(path.name for path in (apt.root / "state/lists").glob("*_InRelease"))
    assert len(lists) == 5, lists


def test_policy_shows_both_driver_versions_pinned(apt: Apt) -> None:
    policy = apt.run("apt-cache", "policy", "nvidia-open-580").stdout
    assert f"Candidate: {NEW}" in policy
    assert re.search(rf"^\s+{re.escape(NEW)} 1000$", policy, flags=re.MULTILINE), policy
    assert re.search(rf"^\s+{re.escape(OLD)} 1000$", policy, flags=re.MULTILINE), policy
    toolkit = apt.run("apt-cache", "policy", "nvidia-container-toolkit").stdout
    assert "Candidate: 1.19.1-1" in toolkit and "1.18.2-1" in toolkit


def test_show_gives_the_stand_in_metadata(apt: Apt) -> None:
    show = apt.run("apt-cache", "show", f"nvidia-open-580={OLD}").stdout
    assert f"Depends: nvidia-kernel-open-dkms (= {OLD}), nvidia-driver-cuda (= {OLD})" in show
    assert "Description: gpufleet STAND-IN for the test bed (no GPU, no NVIDIA software): " in show
    headers = apt.run("apt-cache", "show", "linux-headers-6.1.0-99-amd64").stdout
    assert "Maintainer: gpufleet test bed" in headers


def test_install_resolves_the_pinned_driver(apt: Apt) -> None:
    apt.run("apt-get", "install", "--download-only", "-y", f"nvidia-open-580={NEW}")
    debs = sorted(path.name for path in apt.archives.glob("*.deb"))
    expected = sorted(f"{name}_{NEW}_amd64.deb" for name in ("nvidia-open-580", *DRIVER_DEPS))
    assert debs == expected


def test_install_of_the_older_versions_by_name(apt: Apt) -> None:
    """Installing an older driver means naming every package's version, as with NVIDIA's repository."""
    wanted = [f"{name}={OLD}" for name in ("cuda-drivers-580", "nvidia-kernel-dkms", *DRIVER_DEPS[1:])]
    output = apt.run("apt-get", "install", "--download-only", "-y", "--print-uris", *wanted).stdout
    uris = re.findall(r"^'([^']+)'", output, flags=re.MULTILINE)
    assert sorted(uri.rsplit("/", 1)[1] for uri in uris) == sorted(
        f"{name}_{OLD}_amd64.deb" for name in ("cuda-drivers-580", "nvidia-kernel-dkms", *DRIVER_DEPS[1:])
    )


def test_install_of_the_toolkit_resolves_its_dependencies(apt: Apt) -> None:
    output = apt.run("apt-get", "install", "--download-only", "-y", "--print-uris", "nvidia-container-toolkit").stdout
    names = sorted(uri.rsplit("/", 1)[1] for uri in re.findall(r"^'([^']+)'", output, flags=re.MULTILINE))
    assert names == sorted(
        f"{name}_1.19.1-1_amd64.deb"
        for name in ("nvidia-container-toolkit", "nvidia-container-toolkit-base", "libnvidia-container-tools",
                     "libnvidia-container1")
    )  # fmt: skip


# --- the Grafana repository, laid out and signed as apt.grafana.com ------------------------------------------

GRAFANA_DEB = "grafana_12.2.1_amd64.deb"


def grafana_sources(base_url: str, keyring: Path) -> list[str]:
    """The monitoring role's sources line, at the mirror's URL."""
    return [f"deb [signed-by={keyring}] {base_url}/grafana/deb stable main"]


@pytest.fixture(scope="module")
def grafana_apt(mirror: Path, base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Apt:
    """apt with only the Grafana repository, trusting grafana/gpg.key dearmored (as the role installs it)."""
    keyring = dearmor(mirror / "grafana/gpg.key", tmp_path_factory.mktemp("grafana-key") / "grafana.gpg")
    private = private_apt(tmp_path_factory.mktemp("grafana-apt"), grafana_sources(base_url, keyring))
    update = private.run("apt-get", "update")
    problems = [line for line in (update.stdout + update.stderr).splitlines() if line[:2] in ("W:", "E:", "N:")]
    assert problems == [], "apt-get update complained:\n" + "\n".join(problems)
    return private


def test_grafana_packages_index_lists_the_stand_in(mirror: Path) -> None:
    index = mirror / "grafana/deb/dists/stable/main/binary-amd64/Packages"
    text = index.read_text()
    assert text.startswith("Package: grafana\nVersion: 12.2.1\n")
    assert f"Filename: pool/main/g/grafana/{GRAFANA_DEB}\n" in text
    assert (mirror / "grafana/deb/pool/main/g/grafana" / GRAFANA_DEB).is_file()
    release = (mirror / "grafana/deb/dists/stable/Release").read_text()
    assert "Suite: stable\n" in release and "Components: main\n" in release
    assert " main/binary-amd64/Packages\n" in release


def test_apt_verifies_the_grafana_repository_with_its_published_key(grafana_apt: Apt) -> None:
    lists = sorted(path.name for path in (grafana_apt.root / "state/lists").iterdir() if path.is_file())
    assert [name for name in lists if name.endswith("_grafana_deb_dists_stable_InRelease")], lists
    assert [name for name in lists if name.endswith("_grafana_deb_dists_stable_main_binary-amd64_Packages")], lists
    policy = grafana_apt.run("apt-cache", "policy", "grafana").stdout
    assert "Candidate: 12.2.1" in policy and "/grafana/deb stable/main amd64 Packages" in policy
    show = grafana_apt.run("apt-cache", "show", "grafana").stdout
    assert "Depends: adduser, python3" in show
    assert "Description: gpufleet STAND-IN for the test bed (not Grafana: no UI, no database, no alerting): " in show


def test_apt_downloads_the_grafana_deb_it_checked(grafana_apt: Apt, mirror: Path, tmp_path: Path) -> None:
    env = {**os.environ, "APT_CONFIG": str(grafana_apt.root / "apt.conf"), "LC_ALL": "C"}
    result = subprocess.run(["apt-get", "download", "grafana"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    downloaded = tmp_path / GRAFANA_DEB
    assert downloaded.read_bytes() == (mirror / "grafana/deb/pool/main/g/grafana" / GRAFANA_DEB).read_bytes()


def test_apt_refuses_the_grafana_repository_under_another_key(base_url: str, tmp_path: Path) -> None:
    """The metadata is signed: with some other key in signed-by, apt refuses the repository."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--homedir", str(home), "--pinentry-mode", "loopback", "--passphrase", ""]
    try:
        subprocess.run([*gpg, "--quick-generate-key", "not the mirror's key", "ed25519", "sign", "never"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        subprocess.run([*gpg, "--output", str(tmp_path / "other.gpg"), "--export"], check=True, timeout=60)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, timeout=30)
    private = private_apt(tmp_path / "apt", grafana_sources(base_url, tmp_path / "other.gpg"))
    env = {**os.environ, "APT_CONFIG": str(private.root / "apt.conf"), "LC_ALL": "C"}
    update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=120, env=env)
    output = update.stdout + update.stderr
    assert "NO_PUBKEY" in output or "not signed" in output, output
    assert not list((private.root / "state/lists").glob("*_grafana_deb_dists_stable_main_binary-amd64_Packages"))
