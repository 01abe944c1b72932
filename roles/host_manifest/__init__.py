"""Role host_manifest: write /etc/gpufleet/host.json, the host's configuration and plan."""

from __future__ import annotations

from io import StringIO
from pathlib import PurePosixPath

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files

from gpufleet.manifest import MANIFEST_PATH, render_manifest


@deploy("host manifest")
def apply() -> None:
    fleet_host = host.data.gpufleet
    files.directory(name="gpufleet config folder", path=str(PurePosixPath(MANIFEST_PATH).parent), mode="755")
    files.put(name="host manifest", src=StringIO(render_manifest(fleet_host)), dest=MANIFEST_PATH, mode="644")
