"""The stand-in catalogue, the .debs built from it, the repositories' indexes and signatures, and the build cache.

One mirror is built per module into a temporary folder, with a private cache (so a private
throwaway key): a cold build takes about a second. Debs are inspected with dpkg-deb, signatures
checked with gpgv against the exported key, as apt does.
"""

from __future__ import annotations

import gzip
import hashlib
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.testbed import standin
from gpufleet.testbed.standin import MirrorInfo, StandinError, build_mirror, packages

NEW, OLD = "580.126.20-1", "580.105.08-1"
TOOLKIT_NEW, TOOLKIT_OLD = "1.19.1-1", "1.18.2-1"
CUDA_REPOS = [f"cuda/repos/{distro}/x86_64" for distro in ("debian12", "ubuntu2204", "ubuntu2404")]
TOOLKIT_REPO = "libnvidia-container/stable/deb/amd64"
TESTBED_REPO = "testbed/debian"
DRIVER_NAMES = (
    "nvidia-open-580", "cuda-drivers-580", "nvidia-kernel-open-dkms", "nvidia-kernel-dkms", "nvidia-driver-cuda",
    "libnvidia-ml1", "nvidia-persistenced",
)  # fmt: skip
TOOLKIT_NAMES = ("nvidia-container-toolkit", "nvidia-container-toolkit-base", "libnvidia-container-tools",
                 "libnvidia-container1")  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private GPUFLEET_CACHE for the module: its own key, no effect on the tree's cache."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPUFLEET_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def mirror(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> MirrorInfo:
    return build_mirror(tmp_path_factory.mktemp("mirror") / "out")


def paragraphs(text: str) -> list[dict[str, str]]:
    """Deb822 paragraphs, continuation lines joined with newlines."""
    result = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        name = ""
        for line in block.splitlines():
            if line.startswith(" "):
                fields[name] += "\n" + line
            else:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        result.append(fields)
    return result


def deb_field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()


def deb_listing(deb: Path) -> dict[str, str]:
    """path -> 'mode owner' (symlinks: 'lrwxrwxrwx -> target') from dpkg-deb -c."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    listing = {}
    for line in out.splitlines():
        mode, owner, _size, _date, _time, path, *rest = line.split()
        listing[path.removeprefix(".")] = f"{mode} {owner}" + (f" -> {rest[1]}" if rest else "")
    return listing


def extract(deb: Path, target: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return target


def by_name(name: str, version: str, repo: Path) -> Path:
    return repo / f"{name}_{version}_{'all' if name in ('cuda-keyring', 'nvidia-driver-pinning-580') else 'amd64'}.deb"


# --- the catalogue --------------------------------------------------------------------------------------------


def test_versions_are_the_ones_the_roles_and_tests_pin() -> None:
    assert packages.DRIVER_VERSIONS == (NEW, OLD)
    assert packages.TOOLKIT_VERSIONS == (TOOLKIT_NEW, TOOLKIT_OLD)
    assert packages.CUDA_TOOLKIT_VERSION == "12.8.1-1"


def test_cuda_repository_holds_both_driver_versions_the_pinning_toolkit_and_keyring() -> None:
    names = {(p.name, p.version, p.arch) for p in packages.cuda_packages("debian12", b"key")}
    expected = {(name, version, "amd64") for name in DRIVER_NAMES for version in (NEW, OLD)}
    expected |= {("nvidia-driver-pinning-580", NEW, "all"), ("cuda-toolkit-12-8", "12.8.1-1", "amd64"),
                 ("cuda-keyring", "1.1-1", "all")}  # fmt: skip
    assert names == expected


@pytest.mark.parametrize("version", [NEW, OLD])
def test_driver_metas_depend_on_exact_versions(version: str) -> None:
    found = {p.name: p for p in packages.driver_packages(version)}
    common = (f"nvidia-driver-cuda (= {version})", f"nvidia-persistenced (= {version})", f"libnvidia-ml1 (= {version})")
    assert found["nvidia-open-580"].depends == (f"nvidia-kernel-open-dkms (= {version})", *common)
    assert found["cuda-drivers-580"].depends == (f"nvidia-kernel-dkms (= {version})", *common)
    for name in ("nvidia-kernel-open-dkms", "nvidia-kernel-dkms", "nvidia-driver-cuda", "libnvidia-ml1",
                 "nvidia-persistenced"):  # fmt: skip
        assert found[name].depends == (), f"{name} must not depend on anything (no dkms on the test bed)"
    assert found["nvidia-kernel-open-dkms"].conflicts == ("nvidia-kernel-dkms",)
    assert found["nvidia-kernel-dkms"].conflicts == ("nvidia-kernel-open-dkms",)


@pytest.mark.parametrize("version", [TOOLKIT_NEW, TOOLKIT_OLD])
def test_toolkit_packages_depend_on_exact_versions(version: str) -> None:
    found = {p.name: p for p in packages.toolkit_packages(version)}
    assert set(found) == set(TOOLKIT_NAMES)
    assert found["nvidia-container-toolkit"].depends == (
        f"nvidia-container-toolkit-base (= {version})",
        f"libnvidia-container-tools (= {version})",
    )
    assert found["libnvidia-container-tools"].depends == (f"libnvidia-container1 (= {version})",)
    assert found["nvidia-container-toolkit-base"].depends == found["libnvidia-container1"].depends == ()


def test_every_package_says_it_is_a_stand_in() -> None:
    every = [*packages.cuda_packages("ubuntu2404", b"key"), *packages.toolkit_packages(TOOLKIT_NEW),
             packages.headers_package("6.1.0-18-amd64")]  # fmt: skip
    for package in every:
        assert package.description.startswith(
            "gpufleet STAND-IN for the test bed (no GPU, no NVIDIA software): "
        ), package.name


def test_templates_are_fully_rendered() -> None:
    every = [*packages.cuda_packages("debian12", b"key"), *packages.toolkit_packages(TOOLKIT_OLD)]
    for package in every:
        for data in [entry.data for entry in package.files] + [script for _, script in package.scripts]:
            assert re.search(rb"@[A-Z_]+@", data) is None, package.name


def test_render_refuses_missing_values() -> None:
    with pytest.raises(StandinError, match="needs DRIVER_VERSION"):
        packages.render("nvidia-persistenced")


def test_kernel_release_must_fit_a_package_name() -> None:
    assert packages.check_kernel_release("6.1.0-18-amd64") == "6.1.0-18-amd64"
    with pytest.raises(StandinError, match="--kernel-release"):
        packages.check_kernel_release("5.15.90.1-microsoft-standard-WSL2")


# --- the debs -----------------------------------------------------------------------------------------------------


def test_deb_metadata_matches_the_catalogue(mirror: MirrorInfo) -> None:
    repo = mirror.out / CUDA_REPOS[0]
    deb = by_name("nvidia-open-580", OLD, repo)
    assert deb_field(deb, "Package") == "nvidia-open-580"
    assert deb_field(deb, "Version") == OLD
    assert deb_field(deb, "Architecture") == "amd64"
    assert deb_field(deb, "Maintainer") == "gpufleet test bed"
    assert deb_field(deb, "Depends") == (
        f"nvidia-kernel-open-dkms (= {OLD}), nvidia-driver-cuda (= {OLD}), nvidia-persistenced (= {OLD}), "
        f"libnvidia-ml1 (= {OLD})"
    )
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True).stdout
    assert " Description: gpufleet STAND-IN for the test bed (no GPU, no NVIDIA software): " in info
    dkms = by_name("nvidia-kernel-dkms", NEW, repo)
    assert deb_field(dkms, "Conflicts") == "nvidia-kernel-open-dkms"
    assert deb_field(dkms, "Depends") == ""


def test_kernel_module_deb_contents_and_scripts(mirror: MirrorInfo, tmp_path: Path) -> None:
    deb = by_name("nvidia-kernel-open-dkms", NEW, mirror.out / CUDA_REPOS[0])
    listing = deb_listing(deb)
    assert listing["/usr/src/nvidia-580.126.20/README.standin"] == "-rw-r--r-- root/root"
    assert listing["/usr/lib/gpufleet-standin/load-module"] == "-rwxr-xr-x root/root"
    assert "/etc/modprobe.d/gpufleet-standin-nvidia.conf" in listing
    assert "/lib/systemd/system/gpufleet-standin-nvidia-modules.service" in listing
    files = extract(deb, tmp_path / "x")
    assert (files / "usr/lib/gpufleet-standin/driver-version").read_text() == "580.126.20 open\n"
    unit = (files / "lib/systemd/system/gpufleet-standin-nvidia-modules.service").read_text()
    assert "Type=oneshot" in unit and "WantedBy=multi-user.target" in unit
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    postinst = (control / "postinst").read_text()
    assert "command -v systemctl" in postinst
    assert "systemctl enable --quiet gpufleet-standin-nvidia-modules.service" in postinst
    proprietary = extract(by_name("nvidia-kernel-dkms", OLD, mirror.out / CUDA_REPOS[0]), tmp_path / "p")
    assert (proprietary / "usr/lib/gpufleet-standin/driver-version").read_text() == "580.105.08 proprietary\n"


def test_persistenced_ships_a_simple_unit_it_does_not_enable(mirror: MirrorInfo, tmp_path: Path) -> None:
    deb = by_name("nvidia-persistenced", NEW, mirror.out / CUDA_REPOS[1])
    files = extract(deb, tmp_path / "x")
    assert "Type=simple" in (files / "lib/systemd/system/nvidia-persistenced.service").read_text()
    assert (files / "usr/bin/nvidia-persistenced").stat().st_mode & 0o777 == 0o755
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")], check=True)
    assert not (tmp_path / "control/postinst").exists()


def test_library_packages_ship_text_placeholders(mirror: MirrorInfo, tmp_path: Path) -> None:
    files = extract(by_name("libnvidia-ml1", NEW, mirror.out / CUDA_REPOS[0]), tmp_path / "ml")
    assert "stand-in" in (files / "usr/lib/x86_64-linux-gnu/libnvidia-ml.so.580.126.20").read_text().lower()
    toolkit_lib = extract(mirror.out / TOOLKIT_REPO / f"libnvidia-container1_{TOOLKIT_OLD}_amd64.deb", tmp_path / "lc")
    assert "STAND-IN" in (toolkit_lib / "usr/lib/x86_64-linux-gnu/libnvidia-container.so.1.18.2").read_text()


def test_toolkit_debs_ship_their_programs(mirror: MirrorInfo) -> None:
    repo = mirror.out / TOOLKIT_REPO
    expected = {
        "nvidia-container-toolkit": ["/usr/bin/nvidia-container-runtime-hook"],
        "nvidia-container-toolkit-base": ["/usr/bin/nvidia-ctk", "/usr/bin/nvidia-container-runtime"],
        "libnvidia-container-tools": ["/usr/bin/nvidia-container-cli"],
    }
    for name, programs in expected.items():
        listing = deb_listing(repo / f"{name}_{TOOLKIT_NEW}_amd64.deb")
        for program in programs:
            assert listing[program] == "-rwxr-xr-x root/root", (name, program)
    assert deb_field(repo / f"nvidia-container-toolkit_{TOOLKIT_OLD}_amd64.deb", "Depends") == (
        f"nvidia-container-toolkit-base (= {TOOLKIT_OLD}), libnvidia-container-tools (= {TOOLKIT_OLD})"
    )


def test_cuda_toolkit_deb_has_nvcc_and_the_cuda_symlink(mirror: MirrorInfo) -> None:
    listing = deb_listing(mirror.out / CUDA_REPOS[0] / "cuda-toolkit-12-8_12.8.1-1_amd64.deb")
    assert listing["/usr/local/cuda-12.8/bin/nvcc"] == "-rwxr-xr-x root/root"
    assert listing["/usr/local/cuda"] == "lrwxrwxrwx root/root -> cuda-12.8"


def test_pinning_deb_pins_the_branch(mirror: MirrorInfo, tmp_path: Path) -> None:
    deb = by_name("nvidia-driver-pinning-580", NEW, mirror.out / CUDA_REPOS[2])
    files = extract(deb, tmp_path / "x")
    preferences = (files / "etc/apt/preferences.d/nvidia-driver-pinning-580").read_text()
    assert "Package: nvidia-* libnvidia-*\nPin: version 580.*\nPin-Priority: 1000\n" in preferences


@pytest.mark.parametrize("distro", ["debian12", "ubuntu2204", "ubuntu2404"])
def test_cuda_keyring_points_at_nvidia_and_holds_the_mirror_key(
    mirror: MirrorInfo, tmp_path: Path, distro: str
) -> None:
    deb = mirror.out / f"cuda/repos/{distro}/x86_64/cuda-keyring_1.1-1_all.deb"
    assert deb_field(deb, "Architecture") == "all"
    files = extract(deb, tmp_path / "x")
    assert (files / f"etc/apt/sources.list.d/cuda-{distro}-x86_64.list").read_text() == (
        "deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] "
        f"https://developer.download.nvidia.com/compute/cuda/repos/{distro}/x86_64/ /\n"
    )
    assert (files / "usr/share/keyrings/cuda-archive-keyring.gpg").read_bytes() == mirror.keyring.read_bytes()
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")], check=True)
    assert (tmp_path / "control/conffiles").read_text() == f"/etc/apt/sources.list.d/cuda-{distro}-x86_64.list\n"


def test_testbed_repo_has_headers_for_this_kernel(mirror: MirrorInfo) -> None:
    release = platform.uname().release
    assert mirror.kernel_release == release
    listing = deb_listing(mirror.out / TESTBED_REPO / f"linux-headers-{release}_1.0-1_amd64.deb")
    assert f"/usr/src/linux-headers-{release}/README.standin" in listing


# --- the repositories ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo", [*CUDA_REPOS, TOOLKIT_REPO, TESTBED_REPO])
def test_packages_index_lists_every_deb_with_matching_hashes(mirror: MirrorInfo, repo: str) -> None:
    folder = mirror.out / repo
    text = (folder / "Packages").read_text()
    assert gzip.decompress((folder / "Packages.gz").read_bytes()).decode() == text
    entries = paragraphs(text)
    assert sorted(e["Filename"] for e in entries) == sorted(f"./{p.name}" for p in folder.glob("*.deb"))
    for entry in entries:
        data = (folder / entry["Filename"]).read_bytes()
        assert entry["Size"] == str(len(data))
        assert entry["SHA256"] == hashlib.sha256(data).hexdigest()
        assert entry["MD5sum"] == hashlib.md5(data).hexdigest()
        assert entry["Maintainer"] == "gpufleet test bed"
        deb = folder / entry["Filename"]
        assert (entry["Package"], entry["Version"]) == (deb_field(deb, "Package"), deb_field(deb, "Version"))
        assert entry.get("Depends", "") == deb_field(deb, "Depends")


def test_cuda_index_names_both_driver_versions(mirror: MirrorInfo) -> None:
    entries = paragraphs((mirror.out / CUDA_REPOS[0] / "Packages").read_text())
    versions = {(e["Package"], e["Version"]) for e in entries}
    assert {("nvidia-open-580", NEW), ("nvidia-open-580", OLD), ("cuda-keyring", "1.1-1")} <= versions
    toolkit = {(e["Package"], e["Version"]) for e in paragraphs((mirror.out / TOOLKIT_REPO / "Packages").read_text())}
    assert toolkit == {(name, v) for name in TOOLKIT_NAMES for v in (TOOLKIT_NEW, TOOLKIT_OLD)}


@pytest.mark.parametrize("repo", [*CUDA_REPOS, TOOLKIT_REPO, TESTBED_REPO])
def test_release_hashes_match_the_indexes(mirror: MirrorInfo, repo: str) -> None:
    folder = mirror.out / repo
    release = paragraphs((folder / "Release").read_text())[0]
    assert release["Origin"] == "gpufleet test bed"
    for field, algorithm in (("MD5Sum", "md5"), ("SHA256", "sha256")):
        rows = [line.split() for line in release[field].strip().splitlines()]
        assert {name for _, _, name in rows} == {"Packages", "Packages.gz"}
        for digest, size, name in rows:
            data = (folder / name).read_bytes()
            assert (digest, int(size)) == (hashlib.new(algorithm, data).hexdigest(), len(data)), (field, name)


def gpgv(keyring: Path, home: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    home.mkdir(exist_ok=True, mode=0o700)
    cmd = ["gpgv", "--homedir", str(home), "--keyring", str(keyring), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.parametrize("repo", [*CUDA_REPOS, TOOLKIT_REPO, TESTBED_REPO])
def test_signatures_verify_with_the_exported_key(mirror: MirrorInfo, repo: str, tmp_path: Path) -> None:
    folder = mirror.out / repo
    inline = gpgv(mirror.keyring, tmp_path / "gnupg", folder / "InRelease")
    assert inline.returncode == 0, inline.stderr
    detached = gpgv(mirror.keyring, tmp_path / "gnupg", folder / "Release.gpg", folder / "Release")
    assert detached.returncode == 0, detached.stderr
    signed_text = (folder / "InRelease").read_text()
    assert (folder / "Release").read_text().strip() in signed_text


def test_a_changed_release_no_longer_verifies(mirror: MirrorInfo, tmp_path: Path) -> None:
    forged = tmp_path / "Release"
    forged.write_text((mirror.out / CUDA_REPOS[0] / "Release").read_text().replace("gpufleet", "gpuFLEET", 1))
    result = gpgv(mirror.keyring, tmp_path / "gnupg", mirror.out / CUDA_REPOS[0] / "Release.gpg", forged)
    assert result.returncode != 0


def test_published_keys_are_the_test_bed_key(mirror: MirrorInfo, cache: Path, tmp_path: Path) -> None:
    armored = mirror.armored_key.read_bytes()
    assert armored.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    dearmored = subprocess.run(["gpg", "--homedir", str(home), "--dearmor"], input=armored, capture_output=True,
                               check=True).stdout  # fmt: skip
    assert dearmored == mirror.keyring.read_bytes()
    shown = subprocess.run(["gpg", "--homedir", str(home), "--with-colons", "--show-keys", str(mirror.keyring)],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "gpufleet test bed mirror (stand-in packages, not NVIDIA)" in shown
    assert f"fpr:::::::::{mirror.key_fingerprint}:" in shown
    assert (cache / "standin-gnupg").stat().st_mode & 0o777 == 0o700


# --- caching --------------------------------------------------------------------------------------------------------


def test_second_build_is_a_fast_no_op(mirror: MirrorInfo) -> None:
    release = mirror.out / CUDA_REPOS[0] / "Release"
    mtime = release.stat().st_mtime_ns
    started = time.monotonic()
    again = build_mirror(mirror.out)
    assert time.monotonic() - started < 0.5
    assert (again.built, again.content_hash) == (False, mirror.content_hash)
    assert release.stat().st_mtime_ns == mtime


def test_a_changed_script_rebuilds(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    first = build_mirror(out, kernel_release="6.1.0-99-standin-amd64")
    assert first.built
    assert (out / TESTBED_REPO / "linux-headers-6.1.0-99-standin-amd64_1.0-1_amd64.deb").is_file()
    unchanged = by_name("libnvidia-ml1", NEW, out / CUDA_REPOS[0]).read_bytes()
    files = tmp_path / "files"
    shutil.copytree(packages.FILES_DIR, files)
    with (files / "nvidia-smi").open("a") as handle:
        handle.write("# a change\n")
    monkeypatch.setattr(packages, "FILES_DIR", files)
    second = build_mirror(out, kernel_release="6.1.0-99-standin-amd64")
    assert second.built and second.content_hash != first.content_hash
    smi = extract(by_name("nvidia-driver-cuda", NEW, out / CUDA_REPOS[0]), tmp_path / "x") / "usr/bin/nvidia-smi"
    assert smi.read_text().endswith("# a change\n")
    assert by_name("libnvidia-ml1", NEW, out / CUDA_REPOS[0]).read_bytes() == unchanged  # reproducible debs
    assert not list(out.glob(".staging-*")) and not list(out.glob(".old-*"))


def test_content_hash_covers_the_kernel_release() -> None:
    assert standin.content_hash("6.1.0-1-amd64", "F" * 40) != standin.content_hash("6.1.0-2-amd64", "F" * 40)


def test_build_refuses_folders_it_did_not_make(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "precious").write_text("user data")
    with pytest.raises(StandinError, match="not made by the stand-in build"):
        build_mirror(tmp_path)
    assert (tmp_path / "cuda" / "precious").read_text() == "user data"
