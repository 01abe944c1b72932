"""pyinfra operations the host roles share: each diffs against a fact and yields commands only
when something must change, so a converged host reports no change.

pyinfra 3 runs an operation's body twice: at prepare time (to say what will change, with the
facts of a host not yet touched by this run) and at execute time (facts read again, after the
operations before it ran). Checks that only make sense after installation (is the driver
loaded, do containers see the GPUs) therefore act only at execute time, and fail the host with
a message (a command that returns False) instead of raising: one host's failure must not stop
the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
from collections.abc import Iterator, Mapping
from io import StringIO
from pathlib import PurePosixPath
from typing import Any

from pyinfra import host
from pyinfra.api import FileUploadCommand, FunctionCommand, operation
from pyinfra.facts.files import File, Sha256File
from pyinfra.facts.server import Command
from pyinfra.operations import apt, files, server, systemd
from pyinfra.operations.util import any_changed

from gpufleet.hostfacts import FileText, HeldPackages, InstalledDebVersions, JsonFile, NvidiaSmi

logger = logging.getLogger("gpufleet")

# Non-interactive, and keep a locally changed config file rather than prompting about it.
APT_INSTALL = (
    "DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
    "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
)


def executing() -> bool:
    """True while pyinfra executes (not while it prepares, and never in a --dry run)."""
    return bool(host.state.is_executing)


def _fail(state: Any, host: Any, message: str) -> bool:
    host.log_styled(message, fg="red", log_func=logger.error)
    return False


def fail_host(message: str) -> FunctionCommand:
    """A command that fails this host with `message` (the others carry on)."""
    return FunctionCommand(_fail, (message,), {})


# packages -----------------------------------------------------------------------------------


EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # of no bytes at all
APT_LISTS_MAX_AGE_S = 86400  # a host whose lists are older (or missing: a fresh monitoring host) refreshes them
APT_LOCK_WAIT = "/etc/apt/apt.conf.d/50gpufleet-lock-timeout"


@operation()
def apt_waits_for_its_lock() -> Iterator[Any]:
    """apt waits for the dpkg lock instead of failing at once: on a fresh boot unattended-upgrades
    often holds it, and an interrupted run's last install may still be finishing."""
    yield from files.put._inner(
        src=StringIO('// Managed by gpufleet: wait for the dpkg lock rather than fail\nDPkg::Lock::Timeout "600";\n'),
        dest=APT_LOCK_WAIT, mode="644",
    )


@operation()
def dpkg_consistent() -> Iterator[str]:
    """Finish what an interrupted run left half-installed (`dpkg --audit` lists it).

    When the run that was interrupted is pyinfra's, its last apt-get usually is still running on
    the host (killing pyinfra does not stop it): wait for apt and dpkg to finish (ten minutes at
    most) before deciding whether `dpkg --configure -a` is still needed.
    """
    if host.get_fact(Command, command="dpkg --audit 2>/dev/null || true"):
        yield (
            "for i in $(seq 600); do pgrep -x 'apt|apt-get|dpkg|unattended-upgr' >/dev/null || break; sleep 1; done; "
            'if [ -n "$(dpkg --audit 2>/dev/null)" ]; then DEBIAN_FRONTEND=noninteractive dpkg --configure -a; fi'
        )


def packages_installed(packages: list[str], version_prefix: str = "") -> bool:
    """Each package installed, at a version starting with `version_prefix`."""
    installed = host.get_fact(InstalledDebVersions)
    return all(name in installed and installed[name].startswith(version_prefix) for name in packages)


@operation()
def install_pinned(packages: list[str], version_prefix: str) -> Iterator[Any]:
    """Install `packages` at the version an apt preferences pin selects, unless each is installed
    at a version starting with `version_prefix`. Held packages are changed (the pin moved)."""
    if packages_installed(packages, version_prefix):
        return
    yield f"{APT_INSTALL} --allow-downgrades --allow-change-held-packages {' '.join(packages)}"


@operation()
def apt_hold(packages: list[str]) -> Iterator[str]:
    """`apt-mark hold` the packages not held yet, so no upgrade moves them behind our back."""
    held = host.get_fact(HeldPackages)
    missing = [name for name in packages if name not in held]
    if missing:
        yield f"apt-mark hold {' '.join(missing)}"


@operation()
def deb_from_url(package: str, url: str) -> Iterator[str]:
    """Install a .deb from a URL when `package` is not installed (e.g. cuda-keyring)."""
    if package in host.get_fact(InstalledDebVersions):
        return
    tmp = f"/tmp/gpufleet-{package}.deb"
    yield f"curl -fsSL --retry 3 -o {tmp} {shlex.quote(url)} && dpkg -i {tmp} && rm -f {tmp}"


@operation()
def keyring_from_url(url: str, dest: str) -> Iterator[str]:
    """Fetch a repository's signing key into a binary keyring for `signed-by=` (apt-key is gone).

    Refetched when the key behind the URL changed (a rotated key), compared by digest. The URL
    is fetched only when the run executes: a --dry run contacts nothing but the hosts.
    """
    have = host.get_fact(Command, command=f"sha256sum {dest} 2>/dev/null || true")
    parent = str(PurePosixPath(dest).parent)
    fetch = (
        f"mkdir -p {parent} && curl -fsSL --retry 3 {shlex.quote(url)} | gpg --dearmor --yes -o {dest}.tmp "
        f"&& chmod 644 {dest}.tmp && mv {dest}.tmp {dest}"
    )
    if not executing():
        if not have:
            yield fetch
        return
    want = host.get_fact(
        Command,
        command=f"(curl -fsSL --retry 3 {shlex.quote(url)} | gpg --dearmor | sha256sum) 2>/dev/null || true",
    )
    if have and (not want or want.split()[0] == EMPTY_SHA256):
        return  # the key server is unreachable now: keep the keyring we have rather than fail the host
    if want and have and want.split()[0] == have.split()[0]:
        return
    yield fetch


# JSON configuration ---------------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` over `base`: nested objects merge, everything else in `base` is kept."""
    merged = dict(base)
    for key, value in settings.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@operation()
def json_merged(path: str, settings: dict[str, Any], mode: str = "644") -> Iterator[Any]:
    """Merge `settings` into the JSON file at `path`, keeping every key it already has.

    A file that does not parse is never overwritten: the host fails with the fix.
    """
    current = host.get_fact(JsonFile, path=path)
    if current == JsonFile.INVALID or (current is not None and not isinstance(current, dict)):
        yield fail_host(
            f"{path} is not a JSON object, so gpufleet cannot merge its settings into it\n"
            f"  fix: repair or remove {path} on this host (gpufleet merges into it and never overwrites it)"
        )
        return
    merged = deep_merge(current or {}, settings)
    if merged == current:
        return
    text = json.dumps(merged, indent=4) + "\n"
    yield from files.put._inner(src=StringIO(text), dest=path, mode=mode)


@operation()
def secret_file(dest: str, content: str, mode: str = "600", user: str = "root", group: str = "root") -> Iterator[Any]:
    """A file holding a secret: uploaded when its checksum differs, owner-only, never printed.

    files.put shows the file's lines under `--diff` (a changed file's old lines too); a key or
    token must not reach the terminal or a CI log, so this compares SHA-256 checksums only and
    uploads from memory. Keep its folder 0700: the upload lands with the default mode first.
    """
    wanted = hashlib.sha256(content.encode()).hexdigest()
    current = host.get_fact(Sha256File, path=dest)
    if current != wanted:
        yield FileUploadCommand(StringIO(content), dest, remote_temp_filename=host.get_temp_filename(dest))
    attributes = host.get_fact(File, path=dest) if current == wanted else None
    if attributes is None or (attributes.get("mode"), attributes.get("user"), attributes.get("group")) != (
        int(mode), user, group
    ):
        yield f"chown {user}:{group} {shlex.quote(dest)} && chmod {mode} {shlex.quote(dest)}"


# Docker ------------------------------------------------------------------------------------------


@operation()
def image_present(image: str, archive_url: str | None = None) -> Iterator[str]:
    """Docker has `image`: loaded from a `docker save` archive when one is given (fleets that
    reach no registry), else pulled."""
    inspect = f"docker image inspect --format ok {shlex.quote(image)} 2>/dev/null || true"
    present = host.get_fact(Command, command=inspect)
    if present == "ok":
        return
    if archive_url:
        yield f"curl -fsSL --retry 3 {shlex.quote(archive_url)} | docker load"
    else:
        yield f"docker pull {shlex.quote(image)}"


# the NVIDIA stack -------------------------------------------------------------------------------


@operation()
def docker_nvidia_runtime(config: str = "/etc/docker/daemon.json") -> Iterator[str]:
    """`nvidia-ctk runtime configure` only when Docker's config has no nvidia runtime yet."""
    current = host.get_fact(JsonFile, path=config)
    runtimes = current.get("runtimes") if isinstance(current, dict) else None
    if isinstance(runtimes, dict) and "nvidia" in runtimes:
        return
    yield f"nvidia-ctk runtime configure --runtime=docker --config={config}"


@operation()
def cdi_spec(path: str = "/etc/cdi/nvidia.yaml") -> Iterator[str]:
    """Generate the CDI spec when missing or written for another driver version.

    The spec names the driver's files by version (libnvidia-ml.so.<version>), so one that does
    not mention the loaded driver's version is stale.
    """
    text = host.get_fact(FileText, path=path)
    smi = host.get_fact(NvidiaSmi)
    if text is not None and (smi.driver_version is None or smi.driver_version in text):
        return
    yield f"mkdir -p {PurePosixPath(path).parent} && nvidia-ctk cdi generate --output={path}"


# Debian-packaged services (prometheus, its exporters, alertmanager) -------------------------------


def packaged_service(
    package: str, args: list[str], configs: dict[str, str] | None = None, check: str | None = None,
    service: str | None = None,
) -> None:
    """A Debian package whose unit reads `ARGS` from /etc/default/<service>, with its config files.

    The arguments and configs are written before the package is installed, so its first start
    (Debian starts services on install) already binds the inventory's address, never the package's
    default of every interface; dpkg keeps them (--force-confold). Changed arguments restart the
    service, changed configs reload it (SIGHUP); both only after `check` accepts the files, so a
    rejected config fails the host while the running service keeps its previous one.
    """
    service = service or package
    changed_configs = []
    for path, text in (configs or {}).items():
        files.directory(name=f"{service}: folder of {path}", path=str(PurePosixPath(path).parent), mode="755")
        changed_configs.append(files.put(name=f"{service}: {path}", src=StringIO(text), dest=path, mode="644"))
    arguments = files.put(name=f"{service}: arguments", src=StringIO(f'ARGS="{shlex.join(args)}"\n'),
                          dest=f"/etc/default/{service}", mode="644")
    apt.packages(name=package, packages=[package], no_recommends=True, update=True, cache_time=APT_LISTS_MAX_AGE_S)
    systemd.service(name=f"{service} running", service=service, running=True, enabled=True)
    first = f"{check} && " if check else ""
    config_changed = any_changed(*changed_configs) if changed_configs else (lambda: False)
    server.shell(name=f"{service}: restart for new arguments", commands=[f"{first}systemctl restart {service}"],
                 _if=arguments.did_change)
    server.shell(name=f"{service}: reload for new configuration", commands=[f"{first}systemctl reload {service}"],
                 _if=lambda: config_changed() and not arguments.did_change())


@operation()
def generated_secret(dest: str, user: str = "root", group: str = "root", mode: str = "600") -> Iterator[str]:
    """A random secret made on the host once (never sent over the wire, never printed); kept on re-runs."""
    attributes = host.get_fact(File, path=dest)
    quoted = shlex.quote(dest)
    if attributes is None:
        yield (f"umask 077 && head -c 32 /dev/urandom | base64 | tr -d '/+=\\n' | head -c 32 > {quoted}.tmp "
               f"&& mv {quoted}.tmp {quoted}")
    if attributes is None or (attributes.get("mode"), attributes.get("user"), attributes.get("group")) != (
        int(mode), user, group
    ):
        yield f"chown {user}:{group} {quoted} && chmod {mode} {quoted}"


# systemd -------------------------------------------------------------------------------------

SYSTEMD_CHECK = "test -d /run/systemd/system && echo systemd || echo none"


@operation()
def systemd_is_init() -> Iterator[Any]:
    """Fail the host, saying so, when systemd is not its init: the services are systemd units."""
    if host.get_fact(Command, command=SYSTEMD_CHECK) != "systemd":
        yield fail_host(
            "this host does not run systemd as its init (PID 1), and gpufleet's services are systemd units\n"
            "  fix: deploy to a host booted with systemd (a container needs it as its entrypoint)"
        )


def runs_systemd() -> bool:
    """True when systemd is the host's init; otherwise a failing `systemd_is_init` step is added instead."""
    if host.get_fact(Command, command=SYSTEMD_CHECK) == "systemd":
        return True
    systemd_is_init(name="systemd runs the services")
    return False
