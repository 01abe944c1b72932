"""Run gpufleet's host roles against pyinfra's @fake connector, backed by a small simulated host.

A `SimHost` is a fact set that reacts: it answers every fact command the roles (and the pyinfra
operations they use) run from its state (files, packages, held packages, services, loaded kernel
modules, the PCI bus, nvidia-smi...), and the changing commands change that state the way the
real command would (apt-get install adds the package and its driver closure at the pinned
version, modprobe loads the module, nvidia-ctk writes daemon.json's runtime, a reboot reloads the
modules). pyinfra 3 reads facts again when it executes, so a run sees what earlier operations did:
nvidia-smi is absent until the driver install, the driver's packages exist for `apt-mark hold`.

    run = run_deploy({"gpu-01": (fleet_host, sim)})          # deploy/gpu.py, as `pyinfra` runs it
    run = run_deploy({...}, roles=["preflight", "docker"])   # only some roles, in that order
    host = run["gpu-01"]
    host.changes        # changing commands in order, normalised ("upload /etc/...", temp names)
    host.facts          # fact-gathering commands (prepare and execute)
    host.uploads        # dest -> text of every file pyinfra uploaded
    host.ops            # OpRecord(name, did_change, success, commands) per operation, in order
    host.failed, host.failure   # did pyinfra fail the host, and the error lines logged for it

`sim.responses` (matcher -> response, as the fake connector's `fake_responses`) overrides any
answer; `sim.unhandled` lists commands the simulation did not recognise (they succeed, empty).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import import_module
from pathlib import Path
from typing import Any
from unittest import mock

from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operations import run_ops
from pyinfra.connectors.fake import FakeConnector
from pyinfra.connectors.util import CommandOutput, OutputLine
from pyinfra.context import ctx_host, ctx_state

from gpufleet.fleet import FleetHost
from gpufleet.inventory.pyinfra_groups import connection_data

REPO = Path(__file__).resolve().parents[2]
DEPLOY_GPU = REPO / "deploy" / "gpu.py"
NOW = datetime(2026, 1, 15, 12, 0, 0, tzinfo=timezone.utc)
NOW_TS = int(NOW.timestamp())
DRIVER_PACKAGE_PREFIXES = ("nvidia-", "libnvidia-", "cuda-drivers", "xserver-xorg-video-nvidia")
TOOLKIT_NAMES = ("nvidia-container-toolkit", "libnvidia-container")
DOCKER_PACKAGES = ("docker-ce", "docker.io")
SOURCES = "/etc/apt/sources.list.d/"
# Packages only a third-party repository has: apt finds them once `apt-get update` read its list.
REPOSITORY_OF = (
    (("nvidia-open-", "cuda-"), SOURCES + "gpufleet-cuda.list"),
    (("docker-ce", "containerd.io", "docker-buildx-plugin", "docker-compose-plugin"), SOURCES + "docker.list"),
    (("nvidia-container-toolkit", "libnvidia-container"), SOURCES + "nvidia-container-toolkit.list"),
)
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)


# the simulated host ---------------------------------------------------------------------------


@dataclass
class SimFile:
    content: str
    mode: str = "644"
    user: str = "root"
    group: str = "root"
    mtime: int = NOW_TS - 86400


@dataclass
class Gpu:
    address: str
    device: str = "0x2685"  # AD102 (RTX 4090 D)
    name: str = "NVIDIA GeForce RTX 4090 D"


def driver_closure(package: str) -> list[str]:
    """What installing a driver metapackage brings along (one version for all of them)."""
    match = re.match(r"^(nvidia-open|cuda-drivers)-(\d+)$", package)
    if match:
        branch = match.group(2)
        flavour = "-open" if match.group(1) == "nvidia-open" else ""
        return [package, f"nvidia-driver-{branch}{flavour}", f"nvidia-dkms-{branch}{flavour}",
                f"nvidia-kernel-source-{branch}{flavour}", f"libnvidia-compute-{branch}",
                f"nvidia-compute-utils-{branch}", f"nvidia-utils-{branch}"]
    match = re.match(r"^nvidia-headless-(\d+)-server(-open)?$", package)
    if match:
        branch, flavour = match.group(1), match.group(2) or ""
        return [package, f"nvidia-headless-no-dkms-{branch}-server{flavour}", f"nvidia-dkms-{branch}-server{flavour}",
                f"nvidia-kernel-source-{branch}-server{flavour}", f"libnvidia-compute-{branch}-server",
                f"nvidia-compute-utils-{branch}-server"]
    return [package]


def is_driver(name: str) -> bool:
    return name.startswith(DRIVER_PACKAGE_PREFIXES) and not name.startswith(TOOLKIT_NAMES)


def upstream(version: str) -> str:
    """580.126.20 for 580.126.20-0ubuntu1."""
    return version.split(":")[-1].split("-")[0]


@dataclass
class SimHost:
    """A host's state, answering fact commands and changed by the changing ones."""

    os_release: dict[str, str] | None = None
    kernel: str = "5.15.0-131-generic"
    headers_in_apt: bool = True
    gpus: list[Gpu] = field(default_factory=list)
    other_pci: list[str] = field(default_factory=list)  # raw "addr vendor device class" lines
    secure_boot: str = "disabled"
    free_kib: int = 500 * 1024 * 1024
    files: dict[str, SimFile] = field(default_factory=dict)
    dirs: dict[str, str] = field(default_factory=dict)  # path -> mode
    packages: dict[str, str] = field(default_factory=dict)  # name -> version
    held: set[str] = field(default_factory=set)
    services: dict[str, tuple[bool, bool]] = field(default_factory=dict)  # name -> (running, enabled)
    modules: set[str] = field(default_factory=set)
    module_version: str | None = None  # version of the loaded nvidia module
    nouveau_busy: bool = False  # `modprobe -r nouveau` fails (a console uses it)
    which: dict[str, str] = field(default_factory=lambda: {
        "curl": "/usr/bin/curl", "update-initramfs": "/usr/sbin/update-initramfs"})
    dpkg_audit: list[str] = field(default_factory=list)
    uptime: int = 100_000
    images: set[str] = field(default_factory=set)
    remote_keys: dict[str, str] = field(default_factory=dict)  # URL -> key text (default derived from URL)
    driver_versions: dict[str, str] = field(default_factory=lambda: {"580": "580.126.20"})  # branch -> newest
    has_apt: bool = True  # False: a host without apt and dpkg (CentOS)
    apt_lists: dict[str, str] = field(default_factory=dict)  # sources file -> its content at the last apt-get update
    broken_repos: set[str] = field(default_factory=set)  # URLs whose lists fail to download (a mirror mid-sync)
    responses: dict[Any, Any] = field(default_factory=dict)  # overrides, as fake_responses
    unhandled: list[str] = field(default_factory=list)
    reboots: int = 0

    def copy(self) -> SimHost:
        return copy.deepcopy(self)

    # derived state ----------------------------------------------------------------------------

    @property
    def codename(self) -> str:
        return (self.os_release or {}).get("VERSION_CODENAME", "")

    @property
    def repo_distro(self) -> str:
        info = self.os_release or {}
        return f"{info.get('ID', '')}{info.get('VERSION_ID', '').replace('.', '')}"

    def remote_key(self, url: str) -> str:
        return self.remote_keys.get(url, f"-----BEGIN PGP PUBLIC KEY BLOCK-----\n{url}\n")

    def dearmored(self, url: str) -> str:
        return "dearmored:" + hashlib.sha256(self.remote_key(url).encode()).hexdigest()

    def driver_lib_version(self) -> str | None:
        """The installed driver's version (nvidia-smi and the libraries come with it)."""
        for name, version in self.packages.items():
            if name.startswith("nvidia-compute-utils-") or name.startswith("nvidia-utils-"):
                return upstream(version)
        return None

    def smi(self) -> list[str]:
        version = self.driver_lib_version()
        if version is None:
            return ["rc=absent"]
        if "nvidia" not in self.modules:
            return [NO_DRIVER, "rc=9"]
        if self.module_version != version:
            return ["Failed to initialize NVML: Driver/library version mismatch",
                    f"NVML library version: {'.'.join(version.split('.')[:2])}", "rc=18"]
        return [f"{version}, {gpu.name}" for gpu in self.gpus] + ["rc=0"]

    def json_file(self, path: str) -> Any:
        file = self.files.get(path)
        return json.loads(file.content) if file else None

    def boot(self) -> None:
        """A reboot: modules load as the installed packages and modprobe.d say."""
        self.reboots += 1
        self.uptime = 5
        self.modules = {m for m in self.modules if not m.startswith(("nvidia", "nouveau"))}
        version = self.driver_lib_version()
        if version is not None:
            self.modules |= {"nvidia", "nvidia_uvm", "nvidia_modeset"}
            self.module_version = version
        elif self.gpus and "/etc/modprobe.d/blacklist-nouveau.conf" not in self.files:
            self.modules.add("nouveau")
        for name, (_, enabled) in list(self.services.items()):
            self.services[name] = (enabled, enabled)

    # answering commands -------------------------------------------------------------------------

    def run(self, command: str, upload_content: str | None = None) -> tuple[bool, list[str]]:
        for matcher, response in self.responses.items():
            hit = matcher.search(command) if isinstance(matcher, re.Pattern) else matcher in command
            if hit:
                response = response(self) if callable(response) else response
                if isinstance(response, dict):
                    return bool(response.get("success", True)), _lines(response.get("stdout"))
                return True, _lines(response)
        if not self.has_apt:
            if "( dpkg -l )" in command:
                return True, ["##PYINFRA_NOCMD##"]
            tool = re.match(r"^(?:DEBIAN_FRONTEND=\S+ )?(apt-get|apt-cache|apt-mark|dpkg)\b", command)
            if tool:
                return ("|| true" in command), [] if "|| true" in command else [f"sh: 1: {tool.group(1)}: not found"]
        for pattern, handler in _HANDLERS:
            match = pattern.search(command)
            if match:
                result = handler(self, match)
                return (True, result) if isinstance(result, list) else result
        if " && " in command:
            lines: list[str] = []
            for part in command.split(" && "):
                ok, out = self.run(part.strip())
                lines += out
                if not ok:
                    return False, lines
            return True, lines
        self.unhandled.append(command)
        return True, []

    def put(self, dest: str, content: str) -> None:
        old = self.files.get(dest)
        self.files[dest] = SimFile(content, mode=old.mode if old else "644", mtime=NOW_TS)

    def install(self, command: str) -> tuple[bool, list[str]]:
        """apt-get install: the packages (name or name=version), a driver metapackage with its
        closure at the version the preferences pin allows; held packages change only when allowed."""
        words = shlex.split(command.replace("DEBIAN_FRONTEND=noninteractive ", ""))
        names: list[str] = []
        skip = False
        for word in words[words.index("install") + 1:]:
            if skip:
                skip = False
            elif word == "-o":
                skip = True
            elif not word.startswith("-"):
                names.append(word)
        for spec in names:
            name = spec.partition("=")[0]
            for prefixes, source in REPOSITORY_OF:
                if name.startswith(prefixes) and (source not in self.files
                                                  or self.apt_lists.get(source) != self.files[source].content):
                    return False, [f"E: Unable to locate package {name}"]
        wanted: dict[str, str] = {}
        for spec in names:
            name, _, version = spec.partition("=")
            if is_driver(name):
                for member in driver_closure(name):
                    wanted[member] = version or self.pinned_driver_version(name)
            else:
                wanted[name] = version or self.packages.get(name) or "1.0-1ubuntu1"
        changed_held = [n for n, v in wanted.items() if n in self.held and self.packages.get(n) != v]
        if changed_held and "--allow-change-held-packages" not in words:
            return False, ["E: Held packages were changed and -y was used without --allow-change-held-packages."]
        for name, version in wanted.items():
            if name in self.packages and _older(version, self.packages[name]) and "--allow-downgrades" not in words:
                return False, ["E: Packages were downgraded and -y was used without --allow-downgrades."]
        self.packages.update(wanted)
        for name in wanted:
            if name.startswith(DOCKER_PACKAGES):
                self.services["docker"] = (True, True)
                self.which["docker"] = "/usr/bin/docker"
            if name == "nvidia-container-toolkit":
                self.which["nvidia-ctk"] = "/usr/bin/nvidia-ctk"
            if name.startswith("nvidia-utils-") or name.startswith("nvidia-compute-utils-"):
                self.which["nvidia-smi"] = "/usr/bin/nvidia-smi"
        return True, []

    def pinned_driver_version(self, package: str) -> str:
        branch = re.search(r"-(\d{3})\b", package)
        newest = self.driver_versions.get(branch.group(1) if branch else "", "580.126.20")
        pref = self.files.get("/etc/apt/preferences.d/gpufleet-nvidia-driver")
        pin = re.search(r"^Pin: version (\S+)", pref.content, re.M) if pref else None
        version = newest
        if pin and re.fullmatch(r"\d+\.\d+\.\d+-\*", pin.group(1)):
            version = pin.group(1)[:-2]
        return f"{version}-0ubuntu1"


def _older(a: str, b: str) -> bool:
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", upstream(v)))
    return key(a) < key(b)


def _lines(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.splitlines()
    return [str(line) for line in value]


def _perm(mode: str, kind: str) -> str:
    bits = ""
    for digit in mode[-3:]:
        d = int(digit)
        bits += ("r" if d & 4 else "-") + ("w" if d & 2 else "-") + ("x" if d & 1 else "-")
    return ("d" if kind == "dir" else "-") + bits


def _stat(sim: SimHost, m: re.Match[str]) -> list[str]:
    path = _unquote(m.group(1))
    if path in sim.files:
        f = sim.files[path]
        return [f"user={f.user} group={f.group} mode={_perm(f.mode, 'file')} atime={f.mtime} mtime={f.mtime} "
                f"ctime={f.mtime} size={len(f.content.encode())} '{path}'"]
    if path in sim.dirs or any(p.startswith(path.rstrip("/") + "/") for p in sim.files) or path == "/":
        mode = sim.dirs.get(path, "755")
        return [f"user=root group=root mode={_perm(mode, 'dir')} atime={NOW_TS} mtime={NOW_TS} ctime={NOW_TS} "
                f"size=4096 '{path}'"]
    return []


def _hash(sim: SimHost, m: re.Match[str]) -> list[str]:
    path = _unquote(m.group(1))
    algo = {"sha1sum": hashlib.sha1, "md5sum": hashlib.md5, "sha256sum": hashlib.sha256}[m.group(2)]
    if path not in sim.files:
        return []
    return [f"{algo(sim.files[path].content.encode()).hexdigest()}  {path}"]


def _unquote(word: str) -> str:
    return shlex.split(word)[0] if word[:1] in "'\"" else word


def _dpkg_query(s: SimHost, m: re.Match[str]) -> list[str]:
    """dpkg's status abbreviation: "hi" for a held installed package, "ii" otherwise."""
    return [f"{'hi' if name in s.held else 'ii'} {name} {version}" for name, version in sorted(s.packages.items())]


def _dpkg_l(sim: SimHost, m: re.Match[str]) -> list[str]:
    head = ["Desired=Unknown/Install/Remove/Purge/Hold", "||/ Name  Version  Architecture  Description"]
    return head + [f"{'hi' if n in sim.held else 'ii'}  {n}  {v}  amd64  {n} package"
                   for n, v in sorted(sim.packages.items())]


def _policy(sim: SimHost, m: re.Match[str]) -> list[str]:
    name = m.group(1)
    if not sim.headers_in_apt and name not in sim.packages:
        return []
    installed = sim.packages.get(name, "(none)")
    return [f"  Installed: {installed}", f"  Candidate: {sim.packages.get(name, '5.15.0-131.141')}"]


def _systemctl_show(sim: SimHost, m: re.Match[str]) -> list[str]:
    prop, unit = m.group(1), _unquote(m.group(2))
    name = unit.removesuffix(".service")
    if name not in sim.services:
        return [f"Id={unit}", f"{prop}={'dead' if prop == 'SubState' else ''}"]
    running, enabled = sim.services[name]
    value = ("running" if running else "dead") if prop == "SubState" else ("enabled" if enabled else "disabled")
    return [f"Id={unit}", f"{prop}={value}"]


def _systemctl(sim: SimHost, m: re.Match[str]) -> list[str]:
    action, name = m.group(1), _unquote(m.group(2)).removesuffix(".service")
    running, enabled = sim.services.get(name, (False, False))
    if action in ("start", "restart", "reload"):
        running = True
    elif action == "stop":
        running = False
    elif action == "enable":
        enabled = True
    elif action == "disable":
        enabled = False
    sim.services[name] = (running, enabled)
    return []


def _file_text(sim: SimHost, m: re.Match[str]) -> list[str]:
    path = m.group(1)
    if path not in sim.files:
        return ["absent"]
    return ["present", *sim.files[path].content.splitlines()]


def _docker_check(sim: SimHost, m: re.Match[str]) -> list[str]:
    if "docker" not in sim.which or not sim.services.get("docker", (False, False))[0]:
        return ["bash: docker: command not found" if "docker" not in sim.which else
                "docker: Cannot connect to the Docker daemon at unix:///var/run/docker.sock.", "rc=127"]
    smi = sim.smi()
    if "nvidia-container-toolkit" not in sim.packages or smi[-1] != "rc=0":
        return ['docker: Error response from daemon: could not select device driver "" with capabilities: [[gpu]].',
                "rc=125"]
    return [f"GPU {i}: {gpu.name} (UUID: GPU-{i:08x}-0000-0000-0000-000000000000)"
            for i, gpu in enumerate(sim.gpus)] + ["rc=0"]


def _apt_update(sim: SimHost, m: re.Match[str]) -> tuple[bool, list[str]]:
    """Read every source's list; a broken one fails the update (exit 100), the others are read."""
    failed = []
    for path, file in sim.files.items():
        if path.startswith(SOURCES) and path.endswith(".list"):
            if any(url in file.content for url in sim.broken_repos):
                failed.append(path)
            else:
                sim.apt_lists[path] = file.content
    if failed:
        return False, [f"E: Failed to fetch the lists of {path}  Hash Sum mismatch" for path in failed] + [
            "E: Some index files failed to download. They have been ignored, or old ones used instead."]
    sim.files["/var/lib/apt/periodic/update-success-stamp"] = SimFile("", mtime=NOW_TS)  # APT::Update::Post-Invoke
    return True, []


def _touch(sim: SimHost, m: re.Match[str]) -> list[str]:
    path = _unquote(m.group(1))
    if path in sim.files:
        sim.files[path].mtime = NOW_TS
    else:
        sim.files[path] = SimFile("", mtime=NOW_TS)
    return []


def _mkdir(sim: SimHost, m: re.Match[str]) -> list[str]:
    sim.dirs.setdefault(_unquote(m.group(1)), "755")
    return []


def _chmod(sim: SimHost, m: re.Match[str]) -> list[str]:
    mode, path = m.group(1), _unquote(m.group(2))
    if path in sim.files:
        sim.files[path].mode = mode
    else:
        sim.dirs[path] = mode
    return []


def _rm(sim: SimHost, m: re.Match[str]) -> list[str]:
    sim.files.pop(_unquote(m.group(1)), None)
    return []


def _mv(sim: SimHost, m: re.Match[str]) -> list[str]:
    src, dest = _unquote(m.group(1)), _unquote(m.group(2))
    if src in sim.files:
        sim.files[dest] = sim.files.pop(src)
        sim.files[dest].mtime = NOW_TS
    return []


def _curl_to(sim: SimHost, m: re.Match[str]) -> list[str]:
    dest, url = _unquote(m.group(1)), m.group(2).strip("'")
    deb = re.search(r"/([a-z0-9.+-]+)_([^_/]+)_[a-z0-9]+\.deb$", url)
    sim.files[dest] = SimFile(f"deb {deb.group(1)} {deb.group(2)}" if deb else sim.remote_key(url), mtime=NOW_TS)
    return []


def _download(sim: SimHost, m: re.Match[str]) -> list[str]:
    url, dest = m.group(1).strip("'"), _unquote(m.group(2))
    sim.files[dest] = SimFile(sim.remote_key(url), mtime=NOW_TS)
    return []


def _dpkg_i(sim: SimHost, m: re.Match[str]) -> tuple[bool, list[str]]:
    deb = sim.files.get(_unquote(m.group(1)))
    if deb is None or not deb.content.startswith("deb "):
        return False, ["dpkg: error: cannot access archive"]
    _, name, version = deb.content.split()
    sim.packages[name] = version
    if name == "cuda-keyring":  # the package ships the keyring and a repository line of its own
        sim.files["/usr/share/keyrings/cuda-archive-keyring.gpg"] = SimFile("cuda keyring", mtime=NOW_TS)
        url = f"https://developer.download.nvidia.com/compute/cuda/repos/{sim.repo_distro}/x86_64/"
        sim.files[f"/etc/apt/sources.list.d/cuda-{sim.repo_distro}-x86_64.list"] = SimFile(
            f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {url} /\n", mtime=NOW_TS)
    return True, []


def _gpg_dearmor_to(sim: SimHost, m: re.Match[str]) -> list[str]:
    url, dest = m.group(1).strip("'"), _unquote(m.group(2))
    sim.files[dest] = SimFile(sim.dearmored(url), mtime=NOW_TS)
    return []


def _key_digest(sim: SimHost, m: re.Match[str]) -> list[str]:
    return [f"{hashlib.sha256(sim.dearmored(m.group(1).strip(chr(39))).encode()).hexdigest()}  -"]


def _file_digest(sim: SimHost, m: re.Match[str]) -> list[str]:
    path = _unquote(m.group(1))
    if path not in sim.files:
        return []
    return [f"{hashlib.sha256(sim.files[path].content.encode()).hexdigest()}  {path}"]


def _modprobe_r_nouveau(sim: SimHost, m: re.Match[str]) -> list[str]:
    if "nouveau" in sim.modules and sim.nouveau_busy:
        return ["modprobe: FATAL: Module nouveau is in use.",
                "nouveau is in use; the driver step will ask for a reboot"]
    sim.modules.discard("nouveau")
    return []


def _modprobe(sim: SimHost, m: re.Match[str]) -> tuple[bool, list[str]]:
    module = m.group(1)
    version = sim.driver_lib_version()
    if version is None:
        return False, [f"modprobe: FATAL: Module {module} not found in directory /lib/modules/{sim.kernel}"]
    if module == "nvidia" and "nouveau" in sim.modules:
        return False, ["modprobe: ERROR: could not insert 'nvidia': No such device"]
    if module == "nvidia" and "nvidia" not in sim.modules:
        sim.module_version = version
    sim.modules.add(module)
    return True, []


def _runtime_configure(sim: SimHost, m: re.Match[str]) -> tuple[bool, list[str]]:
    path = m.group(1)
    try:
        current = sim.json_file(path) or {}
    except ValueError:
        return False, [f"unable to load config: {path}"]
    runtimes = current.setdefault("runtimes", {})
    runtimes["nvidia"] = {"args": [], "path": "nvidia-container-runtime"}
    sim.files[path] = SimFile(json.dumps(current, indent=4) + "\n", mode=sim.files[path].mode if path in sim.files
                              else "644", mtime=NOW_TS)
    return True, []


def _cdi_generate(sim: SimHost, m: re.Match[str]) -> list[str]:
    sim.files[m.group(1)] = SimFile(cdi_spec_text(sim.module_version or "unknown"), mtime=NOW_TS)
    return []


def cdi_spec_text(driver_version: str) -> str:
    return (
        "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ncontainerEdits:\n  mounts:\n"
        f"  - hostPath: /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.{driver_version}\n"
    )


def _reboot(sim: SimHost, m: re.Match[str]) -> list[str]:
    sim.boot()
    return []


def _docker_load(sim: SimHost, m: re.Match[str]) -> list[str]:
    sim.images.add("loaded")
    return []


def _image_inspect(sim: SimHost, m: re.Match[str]) -> list[str]:
    return ["ok"] if m.group(1) in sim.images or "loaded" in sim.images else []


def _dpkg_configure(sim: SimHost, m: re.Match[str]) -> list[str]:
    sim.dpkg_audit = []
    return []


def _apt_mark_hold(sim: SimHost, m: re.Match[str]) -> list[str]:
    sim.held |= set(m.group(1).split())
    return []


def _which(sim: SimHost, m: re.Match[str]) -> list[str]:
    name = _unquote(m.group(1))
    return [sim.which[name]] if name in sim.which else []


def _pci(sim: SimHost, m: re.Match[str]) -> list[str]:
    lines = list(sim.other_pci)
    for gpu in sim.gpus:
        lines.append(f"{gpu.address} 0x10de {gpu.device} 0x030000")
        lines.append(f"{gpu.address[:-1]}1 0x10de 0x22ba 0x040300")  # the card's HDMI audio function
    return sorted(lines)


Handler = Callable[[SimHost, "re.Match[str]"], "list[str] | tuple[bool, list[str]]"]
_P = re.compile
_HANDLERS: list[tuple[re.Pattern[str], Handler]] = [
    # facts
    (_P(r"^cat /etc/os-release"), lambda s, m: [f'{k}="{v}"' for k, v in (s.os_release or {}).items()]),
    (_P(r"/sys/bus/pci/devices"), _pci),
    (_P(r"^uname -r$"), lambda s, m: [s.kernel]),
    (_P(r"^uname -s$"), lambda s, m: ["Linux"]),
    (_P(r"^apt-cache policy (\S+)"), _policy),
    (_P(r"mokutil --sb-state"), lambda s, m: [s.secure_boot]),
    (_P(r"^p=\S+; while .*df -Pk"), lambda s, m: [f"/dev/nvme0n1p2 1000000000 1 {s.free_kib} 1% /"]),
    (_P(r"^! \(test -e (\S+) \|\| test -L"), _stat),
    (_P(r"^test -e (\S+) && \( (sha1sum|md5sum|sha256sum) "), _hash),
    (_P(r"^date \+"), lambda s, m: [NOW.strftime("%Y-%m-%dT%H:%M:%S%z")]),
    (_P(r"\( dpkg -l \)"), _dpkg_l),
    (_P(r"^dpkg-query -W"), _dpkg_query),
    (_P(r"^apt-mark showhold"), lambda s, m: sorted(s.held)),
    (_P(r"systemctl show --all --property Id --property (SubState|UnitFileState) (\S+)"), _systemctl_show),
    (_P(r"nvidia-smi --query-gpu"), lambda s, m: s.smi()),
    (_P(r"/proc/modules"), lambda s, m: sorted(s.modules)),
    (_P(r"^cut -d\. -f1 /proc/uptime"), lambda s, m: [str(s.uptime)]),
    (_P(r"^command -v (\S+) \|\| true$"), _which),
    (_P(r"^if \[ -f (\S+) \]; then echo present; cat"), _file_text),
    (_P(r"^dpkg --audit"), lambda s, m: list(s.dpkg_audit)),
    (_P(r"^\(curl -fsSL --retry 3 (\S+) \| gpg --dearmor \| sha256sum\)"), _key_digest),
    (_P(r"^sha256sum (\S+) 2>/dev/null \|\| true$"), _file_digest),
    (_P(r"^docker run --rm --gpus all (\S+) nvidia-smi -L"), _docker_check),
    (_P(r"^docker image inspect --format ok (\S+)"), _image_inspect),
    (_P(r"TMPDIR"), lambda s, m: ["/tmp"]),
    # changes
    (_P(r"^apt-get update$"), _apt_update),
    (_P(r"apt-get .*\binstall\b"), lambda s, m: s.install(m.string)),
    (_P(r"dpkg --configure -a; fi$"), _dpkg_configure),
    (_P(r"^apt-mark hold (.+)$"), _apt_mark_hold),
    (_P(r"^touch (\S+)$"), _touch),
    (_P(r"^mkdir -p (\S+)$"), _mkdir),
    (_P(r"^chmod (\d+) (\S+)$"), _chmod),
    (_P(r"^chown \S+ \S+$"), lambda s, m: []),
    (_P(r"^rm -f (\S+)$"), _rm),
    (_P(r"^mv (\S+) (\S+)$"), _mv),
    (_P(r"^curl -fsSL --retry 3 -o (\S+) (\S+)$"), _curl_to),
    (_P(r"^(?:\( )?curl -sSLf (\S+) -o (\S+)"), _download),
    (_P(r"^dpkg -i (\S+)$"), _dpkg_i),
    (_P(r"^curl -fsSL --retry 3 (\S+) \| gpg --dearmor --yes -o (\S+)$"), _gpg_dearmor_to),
    (_P(r"^curl -fsSL --retry 3 \S+ \| docker load$"), _docker_load),
    (_P(r"^modprobe -r nouveau"), _modprobe_r_nouveau),
    (_P(r"^modprobe (\S+)$"), _modprobe),
    (_P(r"^update-initramfs -u$"), lambda s, m: []),
    (_P(r"^systemctl (start|stop|restart|reload|enable|disable) (\S+)$"), _systemctl),
    (_P(r"^nvidia-ctk runtime configure --runtime=docker --config=(\S+)$"), _runtime_configure),
    (_P(r"^nvidia-ctk cdi generate --output=(\S+)$"), _cdi_generate),
    (_P(r"&& reboot \)"), _reboot),
]


# pyinfra side ----------------------------------------------------------------------------------


TEMP_NAME = re.compile(r"/tmp/pyinfra-[0-9a-f]{32,64}")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def normalise(command: str) -> str:
    return TEMP_NAME.sub("/tmp/pyinfra-TMP", command)


def _gathering_fact() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(("pyinfra/api/facts.py", "pyinfra\\api\\facts.py")):
            return True
        frame = frame.f_back
    return False


@dataclass
class CommandRecord:
    command: str  # normalised; uploads read "upload <dest>"
    kind: str  # fact | change
    phase: str  # prepare | execute
    op: str | None  # the operation executing it (execute phase)
    ok: bool = True
    output: list[str] = field(default_factory=list)


class SimConnector(FakeConnector):
    """The fake connector, answering from the host's SimHost and recording what ran."""

    def __init__(self, state: Any, host: Any) -> None:
        super().__init__(state, host)
        self.records: list[CommandRecord] = []
        self.uploads: dict[str, str] = {}

    @property
    def sim(self) -> SimHost:
        return self.host.data.fake_sim.sim  # host data is shallow-copied on access: hold the sim by reference

    def _record(self, command: str, kind: str) -> CommandRecord:
        op_hash = self.host.nested_executing_op_hash or self.host.executing_op_hash
        op = _op_name(self.state, op_hash) if op_hash else None
        phase = "execute" if self.state.is_executing else "prepare"
        record = CommandRecord(normalise(command), kind, phase, op)
        self.records.append(record)
        return record

    def run_shell_command(self, command: Any, print_output: bool = False, print_input: bool = False,
                          **arguments: Any) -> tuple[bool, CommandOutput]:
        text = command if isinstance(command, str) else command.get_masked_value()
        self.executed_commands.append(text)
        record = self._record(text, "fact" if _gathering_fact() else "change")
        ok, lines = self.sim.run(text)
        record.ok, record.output = ok, lines
        return ok, CommandOutput([OutputLine("stdout", line) for line in lines])

    def put_file(self, filename_or_io: Any, remote_filename: str, remote_temp_filename: str | None = None,
                 print_output: bool = False, print_input: bool = False, **arguments: Any) -> bool:
        if hasattr(filename_or_io, "read"):
            position = filename_or_io.tell()
            filename_or_io.seek(0)
            content = filename_or_io.read()
            filename_or_io.seek(position)
            content = content.decode() if isinstance(content, bytes) else content
        else:
            content = Path(filename_or_io).read_text(encoding="utf-8")
        self._record(f"upload {remote_filename}", "change")
        self.uploads[remote_filename] = content
        self.sim.put(remote_filename, content)
        return True


@dataclass
class _SimRef:
    sim: SimHost


def _op_name(state: Any, op_hash: str) -> str:
    names = state.op_meta[op_hash].names
    return " / ".join(sorted(names)) if names else op_hash


@dataclass
class OpRecord:
    name: str
    did_change: bool | None  # None: not run on this host (it failed before)
    success: bool | None
    commands: list[str]


@dataclass
class HostRun:
    name: str
    sim: SimHost
    records: list[CommandRecord]
    uploads: dict[str, str]
    ops: list[OpRecord]
    failed: bool
    messages: list[str]

    @property
    def changes(self) -> list[str]:
        return [r.command for r in self.records if r.kind == "change"]

    @property
    def facts(self) -> list[str]:
        return [r.command for r in self.records if r.kind == "fact"]

    @property
    def failure(self) -> str:
        return "\n".join(self.messages)

    def op(self, name: str) -> OpRecord:
        found = [op for op in self.ops if op.name == name]
        assert len(found) == 1, f"{len(found)} operations named {name!r}: {[op.name for op in self.ops]}"
        return found[0]

    def ops_named(self, name: str) -> list[OpRecord]:
        return [op for op in self.ops if op.name == name]

    def commands_of(self, op_name: str, kind: str = "fact") -> list[str]:
        """Commands run while `op_name` executed (its execute-time facts, or its changes)."""
        return [r.command for r in self.records if r.op == op_name and r.kind == kind and r.phase == "execute"]

    @property
    def changed_ops(self) -> list[str]:
        return [op.name for op in self.ops if op.did_change]


@dataclass
class FleetRun:
    hosts: dict[str, HostRun]
    error: str | None  # a PyinfraError that ended the run (e.g. "No hosts remaining!")

    def __getitem__(self, name: str) -> HostRun:
        return self.hosts[name]


class _HostLog(logging.Handler):
    """Warnings and errors pyinfra and gpufleet log, by host."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.by_host: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = ANSI.sub("", record.getMessage())
        match = re.match(r"^\[(?:@fake/)?([^\]]+)\]\s*(?:nested\s+)?(.*)$", text, re.S)
        host, message = (match.group(1), match.group(2)) if match else ("", text)
        self.by_host.setdefault(host.strip(), []).append(message.strip())


@contextmanager
def _captured_logs() -> Iterator[_HostLog]:
    handler = _HostLog()
    loggers = [logging.getLogger("pyinfra"), logging.getLogger("gpufleet")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def _apply_roles(roles: Sequence[str] | None) -> None:
    if roles is None:
        code = compile(DEPLOY_GPU.read_text(encoding="utf-8"), str(DEPLOY_GPU), "exec")
        exec(code, {"__file__": str(DEPLOY_GPU), "__name__": "deploy_gpu"})  # as `pyinfra INVENTORY deploy/gpu.py`
        return
    for role in roles:
        import_module(f"roles.{role}").apply()


def run_deploy(targets: Mapping[str, tuple[FleetHost, SimHost]], roles: Sequence[str] | None = None) -> FleetRun:
    """Run deploy/gpu.py (or `roles`, by name, in order) on @fake hosts backed by SimHosts.

    Each SimHost is used as is and changed by the run (pass `sim.copy()` to keep one).
    """
    names = list(targets)
    host_data = {}
    for name, (fleet_host, sim) in targets.items():
        _, data = connection_data(fleet_host)
        host_data[f"@fake/{name}"] = {**data, "fake_sim": _SimRef(sim), "fake_delay": 0, "fake_delay_jitter": 0}
    inventory = Inventory(([(f"@fake/{n}", host_data[f"@fake/{n}"]) for n in names], {}))
    for host in inventory:
        host.connector_cls = SimConnector
    state = State(inventory, Config())
    error = None
    with _captured_logs() as logs, mock.patch("pyinfra.operations.server.sleep", lambda seconds: None):
        connect_all(state)
        with ctx_state.use(state):
            for host in inventory:
                with ctx_host.use(host):
                    _apply_roles(roles)
        try:
            run_ops(state)
        except PyinfraError as exc:
            error = str(exc)
    order = state.get_op_order()
    runs = {}
    for name in names:
        host = inventory.get_host(f"@fake/{name}")
        ops = []
        for op_hash in order:
            if op_hash not in state.ops[host]:
                continue
            meta = state.ops[host][op_hash].operation_meta
            done = meta.is_complete()
            ops.append(OpRecord(
                name=_op_name(state, op_hash),
                did_change=meta.did_change() if done else None,
                success=meta.did_succeed() if done else None,
                commands=[normalise(str(c)) for c in (meta._commands or [])],
            ))
        connector = host.connector
        assert isinstance(connector, SimConnector)
        runs[name] = HostRun(
            name=name, sim=targets[name][1], records=connector.records, uploads=dict(connector.uploads), ops=ops,
            failed=host in state.failed_hosts, messages=logs.by_host.get(name, []),
        )
    return FleetRun(runs, error)


def run_one(fleet_host: FleetHost, sim: SimHost, roles: Sequence[str] | None = None) -> HostRun:
    return run_deploy({fleet_host.name: (fleet_host, sim)}, roles)[fleet_host.name]


def with_config(fleet_host: FleetHost, **changes: Any) -> FleetHost:
    """The host with config changes: a dict for a section updates its keys, anything else is set."""
    config = fleet_host.config
    update: dict[str, Any] = {}
    for key, value in changes.items():
        current = getattr(config, key)
        update[key] = current.model_copy(update=value) if isinstance(value, dict) else value
    return dataclasses.replace(fleet_host, config=config.model_copy(update=update))
