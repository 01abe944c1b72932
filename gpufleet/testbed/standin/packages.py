"""The catalogue of stand-in packages: NVIDIA's and Grafana's package names and versions, gpufleet's contents.

Each package carries the real name, version and (versioned) Depends of the package the roles
install, so apt resolves, pins and upgrades them exactly as on a real host; the files are
stand-ins from files/ (templates with @NAME@ placeholders, filled in per version here). Nothing
in this module runs a tool: debs.py builds the .debs, repo.py the repositories.

Four repositories (`repositories()`), laid out under the mirror's root as NVIDIA's and Grafana's
are under theirs, so a role's URLs change only in their base:
- cuda/repos/<distro>/x86_64: the driver (two versions, for pin and upgrade tests), its pinning
  package, the CUDA toolkit and cuda-keyring (whose list file points at NVIDIA's real URL, as the
  real one does: a role must replace it to use a mirror);
- libnvidia-container/stable/deb/amd64: the container toolkit (two versions);
- testbed/debian: Debian packages the test bed's hosts lack (linux-headers-<uname -r>);
- grafana/deb: suite `stable`, component `main`, as apt.grafana.com (dists/ and pool/, not flat):
  `grafana`, whose server is a stand-in speaking the part of Grafana's HTTP API gpufleet uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FILES_DIR = Path(__file__).resolve().parent / "files"

MAINTAINER = "gpufleet test bed"
DESCRIPTION_PREFIX = "gpufleet STAND-IN for the test bed (no GPU, no NVIDIA software): "
LONG_DESCRIPTION = (
    "Stands in for the package of the same name and version so that gpufleet's roles run",
    "unchanged on the one-machine test bed. Its programs behave like the real ones for what",
    "the roles use and say that they are stand-ins. Never install it on a real host.",
)

DRIVER_BRANCH = "580"
DRIVER_VERSIONS = ("580.126.20-1", "580.105.08-1")  # newest first; tests pin the older and upgrade
CUDA_VERSION_OF_DRIVER = "13.0"  # what the 580 driver reports as "CUDA Version"
TOOLKIT_VERSIONS = ("1.19.1-1", "1.18.2-1")
CUDA_TOOLKIT_VERSION = "12.8.1-1"
CUDA_RELEASE = "12.8"
NVCC_VERSION = "12.8.93"  # what 12.8.1's nvcc --version reports
NVCC_BUILT_ON = "Fri_Feb_21_20:23:50_PST_2025"
NVCC_BUILD = "35583870"
KEYRING_VERSION = "1.1-1"
HEADERS_VERSION = "1.0-1"
CUDA_DISTROS = ("debian12", "ubuntu2204", "ubuntu2404")
NVIDIA_CUDA_URL = "https://developer.download.nvidia.com/compute/cuda/repos/{distro}/x86_64/"
CUDA_KEYRING_PATH = "/usr/share/keyrings/cuda-archive-keyring.gpg"
FLAVOURS = {"nvidia-kernel-open-dkms": "open", "nvidia-kernel-dkms": "proprietary"}
STANDIN_LIB = "/usr/lib/gpufleet-standin"

GRAFANA_VERSION = "12.2.1"  # a real Grafana release; its deb's version has no Debian revision
GRAFANA_REPO = "grafana/deb"  # under the mirror's root, as https://apt.grafana.com is
GRAFANA_SUITE = "stable"
GRAFANA_COMPONENT = "main"
GRAFANA_KEY = "grafana/gpg.key"  # ASCII-armored, as https://apt.grafana.com/gpg.key
GRAFANA_HOME = "/usr/share/grafana"
GRAFANA_PREFIX = "gpufleet STAND-IN for the test bed (not Grafana: no UI, no database, no alerting): "

_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9.+-]+$")


class StandinError(RuntimeError):
    """The stand-in mirror could not be built; the message says what failed and what to do."""


@dataclass(frozen=True)
class FileEntry:
    """One file (or symlink, when `link` is set) in a package, at its absolute installed path."""

    path: str
    data: bytes = b""
    mode: int = 0o644
    link: str | None = None
    conffile: bool = False


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    summary: str
    arch: str = "amd64"
    section: str = "multiverse/misc"
    depends: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()
    files: tuple[FileEntry, ...] = ()
    scripts: tuple[tuple[str, bytes], ...] = ()  # maintainer scripts: (postinst|prerm|..., text)
    prefix: str = DESCRIPTION_PREFIX  # what the description starts with: what it stands in for

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version}_{self.arch}.deb"

    @property
    def description(self) -> str:
        return self.prefix + self.summary


@dataclass(frozen=True)
class Repository:
    """An apt repository at `path` below the mirror's root.

    Flat (`deb URL /`: debs, Packages and Release side by side) unless `suite` is set; then laid
    out as Debian's archives are (`deb URL SUITE COMPONENT`): dists/SUITE/Release (signed),
    dists/SUITE/COMPONENT/binary-ARCH/Packages, and the debs in pool/COMPONENT/<initial>/<name>/.
    """

    path: str
    label: str
    packages: tuple[Package, ...]
    suite: str | None = None
    component: str = "main"
    architecture: str = "amd64"

    @property
    def flat(self) -> bool:
        return self.suite is None

    def deb_path(self, package: Package) -> str:
        """Where the package's deb lies, relative to the repository's root (its Packages Filename, less ./)."""
        if self.flat:
            return package.filename
        initial = package.name[:4] if package.name.startswith("lib") else package.name[0]
        return f"pool/{self.component}/{initial}/{package.name}/{package.filename}"

    @property
    def release_dir(self) -> str:
        """Where Release, InRelease and Release.gpg lie, relative to the repository's root."""
        return "" if self.flat else f"dists/{self.suite}"

    @property
    def index_dir(self) -> str:
        """Where Packages and Packages.gz lie, relative to release_dir."""
        return "" if self.flat else f"{self.component}/binary-{self.architecture}"


def upstream(version: str) -> str:
    """The upstream part of a Debian version: 580.126.20-1 -> 580.126.20."""
    return version.rsplit("-", 1)[0]


def render(template: str, **values: str) -> bytes:
    """files/<template> with each @NAME@ replaced by values[NAME]; every placeholder must be given."""
    text = (FILES_DIR / template).read_text(encoding="utf-8")
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise StandinError(f"files/{template} needs {', '.join(missing)}; packages.py must pass them")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], text).encode()


def _program(path: str, template: str, **values: str) -> FileEntry:
    return FileEntry(path, render(template, **values), mode=0o755)


def _placeholder(path: str, what: str) -> FileEntry:
    """A text file where the real package has a binary (a library): it must never be mistaken for one."""
    text = f"gpufleet STAND-IN for {what}: a placeholder, not a library (test bed: no GPU, no NVIDIA software).\n"
    return FileEntry(path, text.encode())


# --- the driver (CUDA repository) ---------------------------------------------------------------


def kernel_module_package(name: str, version: str) -> Package:
    """nvidia-kernel-open-dkms or nvidia-kernel-dkms: "builds" and "loads" the module (see load-module)."""
    flavour = FLAVOURS[name]
    other = next(other for other in FLAVOURS if other != name)
    up = upstream(version)
    readme = (
        f"gpufleet STAND-IN for the NVIDIA {flavour} kernel module {up} (no GPU, no NVIDIA software).\n"
        "There is no module source here: `modprobe nvidia` runs /usr/lib/gpufleet-standin/load-module,\n"
        "which records this version as loaded in /run/gpufleet-standin/nvidia-module.\n"
    )
    scripts = (("postinst", render("nvidia-kernel-dkms.postinst", DRIVER_VERSION=up, FLAVOUR=flavour)),
               ("prerm", render("nvidia-kernel-dkms.prerm")))  # fmt: skip
    return Package(
        name=name,
        version=version,
        summary=f"NVIDIA {flavour} kernel module {up} (DKMS), loaded by modprobe as a recorded state",
        section="multiverse/kernel",
        conflicts=(other,),
        replaces=(other,),  # both ship the loader and modprobe config: switching flavours swaps them
        files=(
            FileEntry(f"/usr/src/nvidia-{up}/README.standin", readme.encode()),
            FileEntry(f"{STANDIN_LIB}/driver-version", f"{up} {flavour}\n".encode()),
            _program(f"{STANDIN_LIB}/load-module", "load-module"),
            FileEntry("/etc/modprobe.d/gpufleet-standin-nvidia.conf", render("gpufleet-standin-nvidia.conf")),
            FileEntry(
                "/lib/systemd/system/gpufleet-standin-nvidia-modules.service",
                render("gpufleet-standin-nvidia-modules.service"),
            ),
        ),
        scripts=scripts,
    )


def driver_packages(version: str) -> tuple[Package, ...]:
    """The driver branch's packages at one version: two metas and what they depend on."""
    up = upstream(version)
    common = (f"nvidia-driver-cuda (= {version})", f"nvidia-persistenced (= {version})", f"libnvidia-ml1 (= {version})")
    values = {"DRIVER_VERSION": up, "CUDA_VERSION": CUDA_VERSION_OF_DRIVER}
    return (
        Package(
            f"nvidia-open-{DRIVER_BRANCH}",
            version,
            f"NVIDIA driver {DRIVER_BRANCH} with open kernel modules (metapackage)",
            section="multiverse/metapackages",
            depends=(f"nvidia-kernel-open-dkms (= {version})", *common),
        ),
        Package(
            f"cuda-drivers-{DRIVER_BRANCH}",
            version,
            f"NVIDIA driver {DRIVER_BRANCH} with proprietary kernel modules (metapackage)",
            section="multiverse/metapackages",
            depends=(f"nvidia-kernel-dkms (= {version})", *common),
        ),
        kernel_module_package("nvidia-kernel-open-dkms", version),
        kernel_module_package("nvidia-kernel-dkms", version),
        Package(
            "nvidia-driver-cuda",
            version,
            f"nvidia-smi {up}, answering from the simulated GPUs and the recorded module",
            section="multiverse/utils",
            files=(_program("/usr/bin/nvidia-smi", "nvidia-smi", **values),),
        ),
        Package(
            "libnvidia-ml1",
            version,
            f"NVML library {up} (a placeholder file)",
            section="multiverse/libs",
            files=(_placeholder(f"/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.{up}", f"libnvidia-ml {up}"),),
        ),
        Package(
            "nvidia-persistenced",
            version,
            f"nvidia-persistenced {up}, a daemon that only keeps running (not enabled on install)",
            section="multiverse/utils",
            files=(
                _program("/usr/bin/nvidia-persistenced", "nvidia-persistenced", DRIVER_VERSION=up),
                FileEntry("/lib/systemd/system/nvidia-persistenced.service", render("nvidia-persistenced.service")),
            ),
        ),
    )


def pinning_package() -> Package:
    """nvidia-driver-pinning-580: keeps apt on the branch (nvidia-*/libnvidia-* at 580.*)."""
    preferences = (
        f"# gpufleet STAND-IN for the test bed: keep NVIDIA's driver packages on branch {DRIVER_BRANCH}.\n"
        "Package: nvidia-* libnvidia-*\n"
        f"Pin: version {DRIVER_BRANCH}.*\n"
        "Pin-Priority: 1000\n"
    )
    return Package(
        f"nvidia-driver-pinning-{DRIVER_BRANCH}",
        DRIVER_VERSIONS[0],
        f"apt preferences that pin NVIDIA's driver packages to branch {DRIVER_BRANCH}",
        arch="all",
        section="multiverse/admin",
        files=(
            FileEntry(
                f"/etc/apt/preferences.d/nvidia-driver-pinning-{DRIVER_BRANCH}", preferences.encode(), conffile=True
            ),
        ),
    )


def cuda_toolkit_package() -> Package:
    release = CUDA_RELEASE
    version_json = (
        '{\n   "cuda" : {\n      "name" : "CUDA SDK",\n'
        f'      "version" : "{upstream(CUDA_TOOLKIT_VERSION)}"\n   }},\n'
        '   "gpufleet" : "STAND-IN: no GPU, no NVIDIA software"\n}\n'
    )
    nvcc = render(
        "nvcc", CUDA_RELEASE=release, NVCC_VERSION=NVCC_VERSION, NVCC_BUILT_ON=NVCC_BUILT_ON, NVCC_BUILD=NVCC_BUILD
    )
    return Package(
        f"cuda-toolkit-{release.replace('.', '-')}",
        CUDA_TOOLKIT_VERSION,
        f"CUDA toolkit {release}: an nvcc that prints its version and compiles nothing",
        section="multiverse/devel",
        files=(
            FileEntry(f"/usr/local/cuda-{release}/bin/nvcc", nvcc, mode=0o755),
            FileEntry(f"/usr/local/cuda-{release}/version.json", version_json.encode()),
            FileEntry("/usr/local/cuda", link=f"cuda-{release}"),
        ),
    )


def cuda_keyring_package(distro: str, keyring: bytes) -> Package:
    """cuda-keyring for one distro: the mirror's key and a list file naming NVIDIA's real URL."""
    url = NVIDIA_CUDA_URL.format(distro=distro)
    sources = f"deb [signed-by={CUDA_KEYRING_PATH}] {url} /\n"
    return Package(
        "cuda-keyring",
        KEYRING_VERSION,
        "the test bed mirror's signing key, and the CUDA repository at NVIDIA's URL",
        arch="all",
        section="multiverse/admin",
        files=(
            FileEntry(CUDA_KEYRING_PATH, keyring),
            FileEntry(f"/etc/apt/sources.list.d/cuda-{distro}-x86_64.list", sources.encode(), conffile=True),
        ),
    )


def cuda_packages(distro: str, keyring: bytes) -> tuple[Package, ...]:
    drivers = tuple(package for version in DRIVER_VERSIONS for package in driver_packages(version))
    return (cuda_keyring_package(distro, keyring), *drivers, pinning_package(), cuda_toolkit_package())


# --- the container toolkit ------------------------------------------------------------------------


def toolkit_packages(version: str) -> tuple[Package, ...]:
    up = upstream(version)
    hook = _program("/usr/bin/nvidia-container-runtime-hook", "nvidia-container-runtime-hook", TOOLKIT_VERSION=up)
    return (
        Package(
            "nvidia-container-toolkit",
            version,
            f"NVIDIA Container Toolkit {up}: the OCI hook that gives containers the simulated GPUs",
            section="utils",
            depends=(f"nvidia-container-toolkit-base (= {version})", f"libnvidia-container-tools (= {version})"),
            files=(hook,),
        ),
        Package(
            "nvidia-container-toolkit-base",
            version,
            f"NVIDIA Container Toolkit base {up}: nvidia-ctk and nvidia-container-runtime",
            section="utils",
            files=(
                _program("/usr/bin/nvidia-ctk", "nvidia-ctk", TOOLKIT_VERSION=up),
                _program("/usr/bin/nvidia-container-runtime", "nvidia-container-runtime", TOOLKIT_VERSION=up),
            ),
        ),
        Package(
            "libnvidia-container-tools",
            version,
            f"nvidia-container-cli {up}",
            section="utils",
            depends=(f"libnvidia-container1 (= {version})",),
            files=(_program("/usr/bin/nvidia-container-cli", "nvidia-container-cli", TOOLKIT_VERSION=up),),
        ),
        Package(
            "libnvidia-container1",
            version,
            f"libnvidia-container {up} (a placeholder file)",
            section="libs",
            files=(_placeholder(f"/usr/lib/x86_64-linux-gnu/libnvidia-container.so.{up}", "libnvidia-container"),),
        ),
    )


# --- the test bed's own Debian packages --------------------------------------------------------------


def check_kernel_release(release: str) -> str:
    """A kernel release usable in a package name (linux-headers-<release>), else StandinError."""
    if not _PACKAGE_NAME.match(f"linux-headers-{release}") or "/" in release:
        raise StandinError(
            f"kernel release {release!r} cannot be part of a Debian package name (lowercase letters, digits, "
            "'.', '+', '-'); pass the release the test bed's hosts report with --kernel-release"
        )
    return release


def headers_package(release: str) -> Package:
    readme = (
        f"gpufleet STAND-IN for linux-headers-{release} (test bed: no GPU, no NVIDIA software).\n"
        "The test bed's hosts share this machine's kernel; the NVIDIA stand-ins build nothing against it.\n"
    )
    return Package(
        f"linux-headers-{check_kernel_release(release)}",
        HEADERS_VERSION,
        f"Linux kernel headers for {release} (a README only)",
        section="kernel",
        files=(
            FileEntry(f"/usr/src/linux-headers-{release}/README.standin", readme.encode()),
            FileEntry(f"/lib/modules/{release}/build", link=f"/usr/src/linux-headers-{release}"),
        ),
    )


# --- Grafana ----------------------------------------------------------------------------------------


def grafana_package() -> Package:
    """grafana: the real package's layout where the monitoring role touches it, around a stand-in server.

    /usr/share/grafana/bin/grafana is the stand-in (files/grafana, Python); the unit, the
    defaults file, the wrappers and the maintainer scripts follow the real package's. As the real
    one, the package creates the grafana user and its folders and does not start the service.
    """
    version = GRAFANA_VERSION
    readme = (
        f"gpufleet STAND-IN for Grafana {version} (test bed only; never install it on a real host).\n"
        "bin/grafana is a small Python program that serves the part of Grafana's HTTP API gpufleet uses\n"
        "(health, data sources, dashboards, search, /api/ds/query against Prometheus) from the provisioning\n"
        "files. It has no UI, no database, no alerting and no CLI; the admin's password is the configured one.\n"
    )
    return Package(
        "grafana",
        version,
        f"Grafana {version}: a server that speaks the HTTP API gpufleet uses, from provisioning files",
        section="default",
        depends=("adduser", "python3"),
        prefix=GRAFANA_PREFIX,
        files=(
            _program(f"{GRAFANA_HOME}/bin/grafana", "grafana", GRAFANA_VERSION=version),
            FileEntry(f"{GRAFANA_HOME}/README.standin", readme.encode()),
            _program("/usr/sbin/grafana-server", "grafana-server", GRAFANA_HOME=GRAFANA_HOME),
            _program("/usr/sbin/grafana-cli", "grafana-cli", GRAFANA_HOME=GRAFANA_HOME),
            FileEntry("/usr/sbin/grafana", link=f"{GRAFANA_HOME}/bin/grafana"),
            FileEntry("/lib/systemd/system/grafana-server.service", render("grafana-server.service")),
            FileEntry("/etc/default/grafana-server", render("grafana-server.default"), conffile=True),
            FileEntry("/etc/grafana/grafana.ini", render("grafana.ini", GRAFANA_VERSION=version), conffile=True),
        ),
        scripts=(("postinst", render("grafana.postinst", GRAFANA_VERSION=version)), ("prerm", render("grafana.prerm"))),
    )


def repositories(keyring: bytes, kernel_release: str) -> tuple[Repository, ...]:
    """Every repository of the mirror, with its packages; `keyring` is the signing key (binary)."""
    cuda = tuple(
        Repository(f"cuda/repos/{distro}/x86_64", "gpufleet stand-in CUDA", cuda_packages(distro, keyring))
        for distro in CUDA_DISTROS
    )
    toolkit = Repository(
        "libnvidia-container/stable/deb/amd64",
        "gpufleet stand-in libnvidia-container",
        tuple(package for version in TOOLKIT_VERSIONS for package in toolkit_packages(version)),
    )
    testbed = Repository("testbed/debian", "gpufleet test bed", (headers_package(kernel_release),))
    grafana = Repository(GRAFANA_REPO, "gpufleet stand-in Grafana", (grafana_package(),), suite=GRAFANA_SUITE,
                         component=GRAFANA_COMPONENT)  # fmt: skip
    return (*cuda, toolkit, testbed, grafana)
