"""Role docker: Docker Engine from Docker's repository (docker-ce) or the distribution (docker.io).

daemon.json is merged, never overwritten: keys an operator or another tool set (the NVIDIA
runtime, registry mirrors, a data-root) stay; gpufleet sets log rotation (a chatty engine must
not fill the disk) and live-restore (engine containers keep serving while dockerd restarts).
dockerd restarts only when the file changed.
"""

from __future__ import annotations

from io import StringIO
from typing import Any

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files, systemd
from pyinfra.operations.util import any_changed

from gpufleet.hostfacts import OsRelease
from gpufleet.hostops import json_merged, packages_installed

DAEMON_JSON = "/etc/docker/daemon.json"
DOCKER_KEYRING = "/etc/apt/keyrings/docker.asc"
DOCKER_CE_PACKAGES = ["docker-ce", "docker-ce-cli", "containerd.io", "docker-buildx-plugin", "docker-compose-plugin"]


def daemon_settings(settings: Any) -> dict[str, Any]:
    """What gpufleet owns in daemon.json."""
    return {
        "log-driver": "json-file",
        "log-opts": {"max-size": settings.log_max_size, "max-file": str(settings.log_max_file)},
        "live-restore": settings.live_restore,
    }


def _docker_ce_source(settings: Any) -> list[Any]:
    os_info = host.get_fact(OsRelease)
    distro_id = os_info.id if os_info else "ubuntu"
    codename = os_info.codename if os_info else ""
    files.directory(name="apt keyrings folder", path="/etc/apt/keyrings", mode="755")
    return [
        files.download(
            name="Docker's signing key", src=settings.gpg_key_url.format(distro_id=distro_id),
            dest=DOCKER_KEYRING, mode="644",
        ),
        files.put(
            name="Docker's repository",
            src=StringIO(
                f"deb [arch=amd64 signed-by={DOCKER_KEYRING}] {settings.repo_url.format(distro_id=distro_id)} "
                f"{codename} stable\n"
            ),
            dest="/etc/apt/sources.list.d/docker.list", mode="644",
        ),
    ]


@deploy("docker")
def apply() -> None:
    settings = host.data.gpufleet.config.docker
    if settings.source == "docker_ce":
        source_ops = _docker_ce_source(settings)
        sources_changed = any_changed(*source_ops)
        apt.update(name="apt lists after a source change",
                   _if=lambda: sources_changed() or not packages_installed(DOCKER_CE_PACKAGES))
        apt.packages(name="Docker CE", packages=DOCKER_CE_PACKAGES)
    else:
        apt.packages(name="Docker (distribution package)", packages=["docker.io"])
    files.directory(name="Docker config folder", path="/etc/docker", mode="755")
    daemon = json_merged(name="merge daemon.json", path=DAEMON_JSON, settings=daemon_settings(settings))
    systemd.service(name="Docker enabled and running", service="docker", running=True, enabled=True)
    systemd.service(name="restart Docker for daemon.json", service="docker", restarted=True, _if=daemon.did_change)
