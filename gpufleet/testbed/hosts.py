"""The test bed's GPU hosts: Debian 12 containers that boot systemd, on this machine's Docker.

gpufleet's roles (driver, CUDA, container toolkit, Docker) run unchanged against them, through
pyinfra's @docker connector (`TestbedHost.pyinfra_name`, i.e. `@docker/gpufleet-tb-<name>`; in an
inventory: `ansible_connection: docker`, `ansible_host: gpufleet-tb-<name>`). Each host:

- runs gpufleet/host:bookworm (images.ensure_host_image) as container `gpufleet-tb-<name>` with
  hostname `<name>`, booted to `systemctl is-system-running` = running before start_hosts returns;
- has its own cgroup namespace with writable cgroups and a volume on /var/lib/docker, so the Docker
  the roles install runs containers whose --memory/--cpus/--pids-limit nest under the host's;
- sees exactly its simulated NVIDIA GPUs on the PCI bus (a generated tree mounted read-only over
  /sys/bus/pci/devices; see pci.py) and lists them in /etc/gpufleet-testbed/gpus;
- serves the stand-in package mirror (bind-mounted read-only at /srv/gpufleet-mirror) on its own
  127.0.0.1:8765, and trusts the mirror's distribution-side repository when it has a keyring;
- keeps its apt downloads: /var/cache/apt/archives is a per-host folder seeded from a shared pool
  of .debs and harvested back into it on stop, so repeated runs fetch docker.io and friends from
  deb.debian.org once. (One folder shared by all hosts would not do: apt takes an exclusive lock
  on it, and the roles run apt on every host at once.)

Containers and volumes carry the label io.gpufleet.testbed=1; `remove_strays()` (CLI: `strays`)
removes whatever a crashed run left behind. `docker restart` of a host is a reboot (/run is a
tmpfs, so it starts empty); a reboot or poweroff from inside also restarts it (restart policy
unless-stopped), as pyinfra's server.reboot expects of a real host.

For the roles' layered GPU check, load_check_image() loads gpufleet/busybox:standin into a host's
Docker (save_check_image() writes it to a file, e.g. into the mirror), and CGROUP_LIMITS_SCRIPT /
parse_cgroup_limits (cgroups.py) read a nested container's limits on cgroup v1 or v2.

Traffic: the harness talks to hosts only through `docker exec`/`docker cp`. Hosts sit on Docker's
default bridge, whose NAT their apt needs for the Debian mirror; nothing there blocks other
addresses, so keeping the roles on the local mirror is up to the inventory.

    python -m gpufleet.testbed.hosts up gpu-01 gpu-02 --mirror DIR [--gpus 4]
    python -m gpufleet.testbed.hosts down gpu-01 gpu-02
    python -m gpufleet.testbed.hosts strays [--list]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gpufleet.testbed import images, pci
from gpufleet.testbed.cgroups import CGROUP_LIMITS_SCRIPT as CGROUP_LIMITS_SCRIPT  # re-exported
from gpufleet.testbed.cgroups import parse_cgroup_limits as parse_cgroup_limits  # re-exported
from gpufleet.testbed.images import ImageError, log

CONTAINER_PREFIX = "gpufleet-tb-"
TESTBED_LABEL = "io.gpufleet.testbed"  # =1 on every container and volume of the test bed's hosts
HOST_LABEL = "io.gpufleet.testbed.host"  # the host's name

MIRROR_MOUNT = "/srv/gpufleet-mirror"
MIRROR_PORT = 8765
MIRROR_KEYRING = Path("testbed") / "keyring.gpg"  # in the mirror: signs the distribution-side repository
KEYRING_PATH = "/usr/share/keyrings/gpufleet-testbed.gpg"
SOURCES_PATH = "/etc/apt/sources.list.d/gpufleet-testbed.list"
SOURCES_LINE = f"deb [signed-by={KEYRING_PATH}] http://127.0.0.1:{MIRROR_PORT}/testbed/debian/ /\n"
GPUS_PATH = "/etc/gpufleet-testbed/gpus"

DEFAULT_GPUS = 4
DEFAULT_GPU_NAME = "NVIDIA GeForce RTX 4090 D"
DEFAULT_MEMORY_MIB = 24564
BOOT_TIMEOUT_S = 120.0
EXEC_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30  # docker restart: seconds systemd gets to shut down before SIGKILL

# A host name is also a hostname and part of container, volume and folder names.
_HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$")


class HostError(RuntimeError):
    """A test bed host could not be started, reached or removed; the message says what and what to do."""


@dataclass(frozen=True)
class HostNetwork:
    """How a host's ports reach the other test bed hosts without any address but loopback's.

    The test bed's traffic stays on loopback (DESIGN.md): a host that others scrape publishes
    those ports at the same numbers on a loopback address of its own (`loopback`, e.g.
    127.100.7.42), and a monitoring host shares this machine's network (`host_network`), where
    `extra_hosts` name those addresses as the inventory's `ansible_host`s. No host reaches another
    through Docker's bridge.
    """

    loopback: str | None = None
    ports: tuple[int, ...] = ()  # published at loopback:port
    host_network: bool = False
    extra_hosts: tuple[tuple[str, str], ...] = ()  # (name, address) in /etc/hosts


def loopback_address(name: str) -> str:
    """A loopback address of this machine for a host, stable for its name (127.100.0.0/16)."""
    digest = hashlib.sha256(container_name(name).encode()).digest()
    return f"127.100.{digest[0]}.{digest[1] % 254 + 1}"


@dataclass(frozen=True)
class TestbedHost:
    """A running host container of the test bed."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    container: str
    gpus: int

    @property
    def pyinfra_name(self) -> str:
        """How pyinfra reaches it: its @docker connector works in place on a running container."""
        return f"@docker/{self.container}"

    def published(self, port: int) -> int:
        """The 127.0.0.1 port of this machine that reaches the host's `port` (see start_hosts' `publish`)."""
        out = _docker("port", self.container, f"{port}/tcp", what=f"{self.name}: docker port {port}").stdout
        for line in out.splitlines():
            address, _, mapped = line.strip().rpartition(":")
            if address == "127.0.0.1" and mapped.isdigit():
                return int(mapped)
        raise HostError(f"{self.name}: port {port} is not published on 127.0.0.1 (docker port said {out!r})")

    def exec(
        self, *cmd: str, check: bool = True, timeout: float = EXEC_TIMEOUT_S, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in the host as root (`docker exec`); with `check`, a non-zero exit raises HostError."""
        interactive = ["--interactive"] if input is not None else []
        return _docker(
            "exec", *interactive, self.container, *cmd,
            what=f"{self.name}: {' '.join(cmd)}", timeout=timeout, check=check, input=input,
        )  # fmt: skip


# --- docker ----------------------------------------------------------------------------------


def _docker(
    *args: str, what: str, timeout: float = 120, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `docker ARGS`; raise HostError (with the tail of its output) on a timeout, or a failure if `check`."""
    try:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{what}: no result after {timeout:.0f}s (docker {' '.join(args[:3])} ...)") from exc
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise HostError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc


@functools.cache
def _cgroup_version() -> str:
    """The daemon's cgroup version, "1" or "2" (Docker 20.10+ reports it)."""
    return _docker("info", "--format", "{{.CgroupVersion}}", what="docker info").stdout.strip() or "1"


def container_name(name: str) -> str:
    return f"{CONTAINER_PREFIX}{name}"


def _volume_name(name: str) -> str:
    return f"{CONTAINER_PREFIX}{name}-docker"


def _container_exists(container: str) -> bool:
    return _docker("container", "inspect", container, what="docker inspect", check=False).returncode == 0


def _container_running(container: str) -> bool:
    proc = _docker("container", "inspect", "--format", "{{.State.Running}}", container, what="inspect", check=False)
    return proc.stdout.strip() == "true"


def host_state(name: str) -> str | None:
    """"running" or "stopped" for the host's container, None when there is none."""
    proc = _docker("container", "inspect", "--format", "{{.State.Running}}", container_name(name), what="inspect",
                   check=False)
    if proc.returncode != 0:
        return None
    return "running" if proc.stdout.strip() == "true" else "stopped"


# --- per-host folders: PCI tree and apt archives ----------------------------------------------


def _hosts_dir() -> Path:
    return images.cache_dir() / "hosts"


def _host_dir(name: str) -> Path:
    """<cache>/hosts/<name>: pci/ (mounted over /sys/bus/pci/devices), archives/ (apt's cache)."""
    return _hosts_dir() / name


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` to `target` (no copy on one file system); an existing target is kept."""
    try:
        os.link(source, target)
    except FileExistsError:
        pass
    except OSError:  # another file system, or links not allowed: copy, then move into place whole
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.copy2(source, partial)
        os.replace(partial, target)


def _seed_archives(archives: Path) -> None:
    """Give a host's apt cache every deb of the pool, so apt downloads only what none of them has."""
    pool = images.apt_pool_dir()
    pool.mkdir(parents=True, exist_ok=True)
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    for deb in pool.glob("*.deb"):
        _link_or_copy(deb, archives / deb.name)


def _harvest_archives(archives: Path) -> None:
    """Add the debs a host downloaded to the pool (apt renames only complete files into archives/)."""
    pool = images.apt_pool_dir()
    pool.mkdir(parents=True, exist_ok=True)
    for deb in archives.glob("*.deb"):
        if not (pool / deb.name).exists():
            _link_or_copy(deb, pool / deb.name)


def _release_host_dir(name: str) -> None:
    """Harvest a removed host's downloads and delete its folder."""
    folder = _host_dir(name)
    if folder.is_dir():
        _harvest_archives(folder / "archives")
        shutil.rmtree(folder, ignore_errors=True)


def _prepare_host_dir(name: str, gpus: Sequence[pci.SimulatedGpu]) -> Path:
    """A fresh folder for the host: its PCI tree and its seeded apt cache (a stale one is released first)."""
    _release_host_dir(name)
    folder = _host_dir(name)
    pci.write_pci_tree(folder / "pci", gpus)
    _seed_archives(folder / "archives")
    return folder


# --- starting one host -----------------------------------------------------------------------


def _run_options(
    name: str, folder: Path, mirror_dir: Path | None, publish: Sequence[int] = (), network: HostNetwork | None = None
) -> list[str]:
    """`docker create` options: what systemd, a nested Docker and the simulated GPUs need, no more.

    Not --privileged: CAP_SYS_ADMIN (mounts: systemd's, cgroups, overlayfs for the nested Docker)
    and CAP_NET_ADMIN (the nested Docker's bridge and iptables) are enough, with seccomp and
    AppArmor off for the mount and keyring calls systemd and runc make. A private cgroup namespace
    with an empty tmpfs on /sys/fs/cgroup (cgroup v1) lets the image's entrypoint mount writable
    hierarchies rooted at the container's own cgroup (see host_image/gpufleet-testbed-init).
    """
    options = [
        "--name", container_name(name), "--hostname", name,
        "--label", f"{TESTBED_LABEL}=1", "--label", f"{HOST_LABEL}={name}",
        "--restart", "unless-stopped",
        "--cap-add", "SYS_ADMIN",
        "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
        "--cgroupns", "private",
        "--tmpfs", "/run:rw,nosuid,nodev,mode=755,size=256m",
        "--tmpfs", "/run/lock:rw,nosuid,nodev,noexec,size=8m",
        "--volume", f"{_volume_name(name)}:/var/lib/docker",
        "--volume", f"{folder / 'archives'}:/var/cache/apt/archives",
        "--volume", f"{folder / 'pci'}:/sys/bus/pci/devices:ro",
    ]  # fmt: skip
    if _cgroup_version() == "1":
        options += ["--tmpfs", "/sys/fs/cgroup:rw,nosuid,nodev,noexec,mode=755"]
    if mirror_dir is not None:
        options += ["--volume", f"{mirror_dir}:{MIRROR_MOUNT}:ro"]
    for port in publish:  # e.g. the gateway's port, on a free port of this machine's loopback only
        options += ["--publish", f"127.0.0.1::{port}"]
    return options + _network_options(network or HostNetwork())


def _network_options(network: HostNetwork) -> list[str]:
    # this machine's network has no nested Docker bridge: no CAP_NET_ADMIN there (the others need it for theirs)
    options = ["--network", "host"] if network.host_network else ["--cap-add", "NET_ADMIN"]
    options += [arg for port in network.ports for arg in ("--publish", f"{network.loopback}:{port}:{port}")]
    options += [arg for name, address in network.extra_hosts for arg in ("--add-host", f"{name}:{address}")]
    return options


def _seed_files(gpus: Sequence[pci.SimulatedGpu], mirror_dir: Path | None) -> bytes:
    """A tar of the files a host has from its first boot: the GPU list, and the mirror's apt source."""
    files: dict[str, tuple[bytes, int]] = {GPUS_PATH: (pci.gpus_file(gpus).encode(), 0o644)}
    keyring = mirror_dir / MIRROR_KEYRING if mirror_dir is not None else None
    if keyring is not None and keyring.is_file():
        files[KEYRING_PATH] = (keyring.read_bytes(), 0o644)
        files[SOURCES_PATH] = (SOURCES_LINE.encode(), 0o644)
    now = int(time.time())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folder = tarfile.TarInfo(os.path.dirname(GPUS_PATH).lstrip("/"))  # new; existing folders stay as they are
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, now
        tar.addfile(folder)
        for path, (data, mode) in files.items():
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), mode, now
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _copy_into(container: str, tar: bytes) -> None:
    """`docker cp - CONTAINER:/` of a tar (works on a created, not yet started container)."""
    try:
        proc = subprocess.run(["docker", "cp", "-", f"{container}:/"], input=tar, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"docker cp into {container}: no result after 60s") from exc
    if proc.returncode != 0:
        raise HostError(f"docker cp into {container} failed: {proc.stderr.decode(errors='replace').strip()}")


def _start_host(
    name: str, image: str, gpus: Sequence[pci.SimulatedGpu], mirror_dir: Path | None, publish: Sequence[int] = (),
    network: HostNetwork | None = None,
) -> TestbedHost:
    """Create, seed and start one host, and wait until its systemd is up."""
    container = container_name(name)
    folder = _prepare_host_dir(name, gpus)
    labels = ["--label", f"{TESTBED_LABEL}=1", "--label", f"{HOST_LABEL}={name}"]
    _docker("volume", "create", *labels, _volume_name(name), what=f"{name}: docker volume create")
    _docker("create", *_run_options(name, folder, mirror_dir, publish, network), image, what=f"{name}: docker create")
    _copy_into(container, _seed_files(gpus, mirror_dir))
    _docker("start", container, what=f"{name}: docker start")
    host = TestbedHost(name=name, container=container, gpus=len(gpus))
    wait_for_systemd(host)
    return host


def _diagnostics(host: TestbedHost) -> str:
    """Failed units and the journal's recent warnings, for an error message."""
    failed = host.exec("systemctl", "--failed", "--no-legend", "--plain", check=False, timeout=30).stdout.strip()
    journal = host.exec(
        "journalctl", "--boot", "--priority", "warning", "--lines", "25", "--no-pager", check=False, timeout=30
    ).stdout.strip()
    return f"\nfailed units:\n{failed or '(none)'}\njournal (warnings):\n{journal or '(empty)'}"


def wait_for_systemd(host: TestbedHost, timeout: float = BOOT_TIMEOUT_S) -> None:
    """Wait until the host's systemd has booted: "running" returns; "degraded" raises, listing failed units.

    `systemctl is-system-running --wait` answers "offline" until systemd's socket exists (right
    after a start or restart), so that is retried, as is a command that could not run yet.
    """
    deadline = time.monotonic() + timeout
    state = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HostError(
                f"{host.name}: systemd did not finish booting within {timeout:.0f}s (last: {state}){_diagnostics(host)}"
            )
        if not _container_running(host.container):
            logs = _docker("logs", "--tail", "30", host.container, what="docker logs", check=False)
            raise HostError(
                f"{host.name}: container {host.container} is not running; its log:\n"
                f"{(logs.stdout + logs.stderr).strip() or '(empty)'}"
            )
        proc = host.exec("systemctl", "is-system-running", "--wait", check=False, timeout=remaining)
        state = proc.stdout.strip() or proc.stderr.strip() or f"exit {proc.returncode}"
        if state == "running":
            return
        if state == "degraded":
            raise HostError(f"{host.name}: systemd booted degraded{_diagnostics(host)}")
        time.sleep(0.2)


# --- the harness's API -----------------------------------------------------------------------


def _gpu_counts(names: Sequence[str], gpus: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(gpus, int):
        return dict.fromkeys(names, gpus)
    missing = [name for name in names if name not in gpus]
    if missing:
        raise ValueError(f"gpus gives no count for {', '.join(missing)}")
    return {name: gpus[name] for name in names}


def _check_names(names: Sequence[str]) -> None:
    bad = [name for name in names if not _HOST_NAME.match(name)]
    if bad:
        raise ValueError(f"host names must be lowercase letters, digits and inner hyphens (<= 48): {bad}")
    if len(set(names)) != len(names):
        raise ValueError(f"host names repeat: {list(names)}")


def start_hosts(
    names: Iterable[str],
    *,
    mirror_dir: Path | None,
    gpus: int | Mapping[str, int] = DEFAULT_GPUS,
    gpu_name: str = DEFAULT_GPU_NAME,
    memory_mib: int = DEFAULT_MEMORY_MIB,
    pci_device: int | None = None,
    publish: Mapping[str, Sequence[int]] | None = None,
    networks: Mapping[str, HostNetwork] | None = None,
) -> list[TestbedHost]:
    """Start one host per name, in parallel, each booted to systemd "running"; in the order given.

    `gpus` is every host's GPU count, or a count per name (0 makes a host without GPUs, e.g. a
    gateway). `pci_device` overrides the PCI device ID pci.KNOWN_GPUS has for `gpu_name`.
    `mirror_dir` (the stand-in package mirror) is mounted read-only; None starts hosts without it.
    `publish` lists, per name, ports of the host published on free ports of 127.0.0.1 (see
    `TestbedHost.published`); `networks` how a host is reached by the others (HostNetwork).
    On any failure every host of this call is removed before HostError is raised.
    """
    names = list(names)
    _check_names(names)
    counts = _gpu_counts(names, gpus)
    specs = {
        name: pci.simulated_gpus(name, counts[name], name=gpu_name, memory_mib=memory_mib, pci_device=pci_device)
        for name in names
    }
    if mirror_dir is not None:
        mirror_dir = Path(mirror_dir).resolve()
        if not mirror_dir.is_dir():
            raise HostError(f"mirror folder {mirror_dir} does not exist")
    if not names:
        return []
    image = images.ensure_host_image()
    taken = [container_name(name) for name in names if _container_exists(container_name(name))]
    if taken:
        raise HostError(
            f"{', '.join(taken)} already exist(s): hosts of another run, or left behind by one; "
            f"`python -m gpufleet.testbed.hosts down NAME...` (or `strays`) removes them"
        )
    started = time.monotonic()
    workers = ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="testbed-host")
    try:
        futures = {
            name: workers.submit(_start_host, name, image, specs[name], mirror_dir, (publish or {}).get(name, ()),
                                 (networks or {}).get(name))
            for name in names
        }
        workers.shutdown(wait=True)
    except BaseException:  # Ctrl-C while waiting: let running starts finish (nothing appears after the cleanup)
        workers.shutdown(wait=True, cancel_futures=True)
        _remove_hosts(names)
        raise
    failures = {name: future.exception() for name, future in futures.items() if future.exception() is not None}
    if failures:
        _remove_hosts(names)
        detail = "\n".join(f"- {name}: {error}" for name, error in failures.items())
        raise HostError(f"starting test bed hosts failed (all removed):\n{detail}") from next(iter(failures.values()))
    log(f"started {len(names)} host(s) in {time.monotonic() - started:.1f}s: {', '.join(names)}")
    return [futures[name].result() for name in names]


def _remove_hosts(names: Sequence[str]) -> None:
    """Remove the named hosts' containers and volumes (missing ones are fine) and release their folders."""
    if not names:
        return
    containers = [container_name(name) for name in names]
    proc = _docker("rm", "--force", "--volumes", *containers, what="docker rm", timeout=180, check=False)
    problems = [line for line in proc.stderr.splitlines() if line.strip() and "No such container" not in line]
    volumes = [_volume_name(name) for name in names]
    proc = _docker("volume", "rm", "--force", *volumes, what="docker volume rm", timeout=180, check=False)
    problems += [line for line in proc.stderr.splitlines() if line.strip() and "no such volume" not in line.lower()]
    for name in names:
        _release_host_dir(name)
    if problems:
        raise HostError("removing test bed hosts: " + "\n".join(problems))


def stop_hosts(hosts: Iterable[TestbedHost]) -> None:
    """Remove the hosts: containers, their /var/lib/docker volumes and their folders (downloads kept)."""
    _remove_hosts([host.name for host in hosts])


@contextlib.contextmanager
def testbed_hosts(
    names: Iterable[str],
    *,
    mirror_dir: Path | None,
    gpus: int | Mapping[str, int] = DEFAULT_GPUS,
    gpu_name: str = DEFAULT_GPU_NAME,
    memory_mib: int = DEFAULT_MEMORY_MIB,
    pci_device: int | None = None,
    publish: Mapping[str, Sequence[int]] | None = None,
    networks: Mapping[str, HostNetwork] | None = None,
) -> Iterator[list[TestbedHost]]:
    """start_hosts() for a `with` block: the hosts are removed when it ends, however it ends.

    A failed start removes its own hosts, and only those: names another run holds stay untouched.
    """
    started = start_hosts(
        names, mirror_dir=mirror_dir, gpus=gpus, gpu_name=gpu_name, memory_mib=memory_mib, pci_device=pci_device,
        publish=publish, networks=networks,
    )
    try:
        yield started
    finally:
        stop_hosts(started)


# Its name starts with "test": without this, pytest would collect it from any test module importing it.
testbed_hosts.__test__ = False  # type: ignore[attr-defined]


def remove_strays(*, dry_run: bool = False) -> list[str]:
    """Remove every test bed host container and volume (by label), and their folders; their names.

    For what crashed or killed runs leave behind. It does not know which run a host belongs to:
    do not call it while another run's hosts are in use.
    """
    label = f"label={TESTBED_LABEL}=1"
    containers = _docker("ps", "--all", "--filter", label, "--format", "{{.Names}}", what="docker ps")
    volumes = _docker("volume", "ls", "--quiet", "--filter", label, what="docker volume ls")
    found = sorted(containers.stdout.split()) + sorted(volumes.stdout.split())
    if dry_run:
        return found
    if containers.stdout.split():
        _docker("rm", "--force", "--volumes", *containers.stdout.split(), what="docker rm", timeout=180)
    if volumes.stdout.split():
        _docker("volume", "rm", "--force", *volumes.stdout.split(), what="docker volume rm", timeout=180)
    if _hosts_dir().is_dir():
        for folder in _hosts_dir().iterdir():
            if folder.is_dir():
                _release_host_dir(folder.name)
    return found


def restart_host(host: TestbedHost, timeout: float = BOOT_TIMEOUT_S) -> None:
    """Reboot the host (`docker restart`: systemd shuts down, /run starts empty) and wait for systemd."""
    _docker("restart", "--time", str(STOP_TIMEOUT_S), host.container, what=f"{host.name}: docker restart",
            timeout=STOP_TIMEOUT_S + 60)  # fmt: skip
    wait_for_systemd(host, timeout)


def load_check_image(host: TestbedHost) -> str:
    """Load gpufleet/busybox:standin into the host's Docker (built once on this machine); its tag.

    The roles' layered GPU check runs `nvidia-smi` in a `--gpus all` container of this image.
    The host's Docker must be running (the roles install it).
    """
    image = images.ensure_busybox_image()
    if host.exec("docker", "info", check=False, timeout=60).returncode != 0:
        raise HostError(f"{host.name}: Docker does not answer in the host; install and start it first (docker role)")
    save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        load = subprocess.run(
            ["docker", "exec", "--interactive", host.container, "docker", "load"],
            stdin=save.stdout, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        if save.stdout:
            save.stdout.close()
        save.wait(timeout=60)
    if save.returncode != 0 or load.returncode != 0:
        errors = (save.stderr.read().decode(errors="replace") if save.stderr else "") + load.stderr
        raise HostError(f"{host.name}: docker save {image} | docker load failed: {errors.strip()}")
    return image


def save_check_image(path: Path) -> Path:
    """Write gpufleet/busybox:standin as a `docker save` archive to `path` (e.g. into the mirror); `path`.

    For roles that load the layered check's image from a file on hosts that reach no registry.
    """
    image = images.ensure_busybox_image()
    path.parent.mkdir(parents=True, exist_ok=True)
    _docker("save", "--output", str(path), image, what=f"docker save {image}", timeout=300)
    return path


# --- CLI -------------------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    hosts = start_hosts(args.names, mirror_dir=args.mirror, gpus=args.gpus, gpu_name=args.gpu_name,
                        memory_mib=args.memory_mib)  # fmt: skip
    for host in hosts:
        shell = f"docker exec -it {host.container} bash"
        print(f"{host.name}: {host.gpus} GPU(s); pyinfra {host.pyinfra_name}; shell: {shell}")
    return 0


def _down(args: argparse.Namespace) -> int:
    _remove_hosts(args.names)
    print(f"removed {', '.join(container_name(name) for name in args.names)}")
    return 0


def _strays(args: argparse.Namespace) -> int:
    found = remove_strays(dry_run=args.list)
    print("\n".join(found) if found else "no test bed containers or volumes")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gpufleet.testbed.hosts`: start, remove or clean up the test bed's hosts."""
    parser = argparse.ArgumentParser(prog="python -m gpufleet.testbed.hosts", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start hosts booted to systemd, with simulated GPUs")
    up.add_argument("names", nargs="+", metavar="NAME")
    up.add_argument("--mirror", type=Path, help="the stand-in package mirror folder (mounted read-only)")
    up.add_argument("--gpus", type=int, default=DEFAULT_GPUS, help=f"GPUs per host (default {DEFAULT_GPUS})")
    up.add_argument("--gpu-name", default=DEFAULT_GPU_NAME, help=f"default {DEFAULT_GPU_NAME!r}")
    up.add_argument("--memory-mib", type=int, default=DEFAULT_MEMORY_MIB, help=f"default {DEFAULT_MEMORY_MIB}")
    up.set_defaults(run=_up)
    down = commands.add_parser("down", help="remove hosts, their volumes and folders")
    down.add_argument("names", nargs="+", metavar="NAME")
    down.set_defaults(run=_down)
    strays = commands.add_parser("strays", help="remove every test bed host container and volume (by label)")
    strays.add_argument("--list", action="store_true", help="only list them")
    strays.set_defaults(run=_strays)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (HostError, ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
