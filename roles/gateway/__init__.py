"""Role gateway: nginx in front of the engine instances, with API keys and limits per key.

The files come from nginx_conf.py (a pure function of the host's gateway plan, settings and
keys). nginx is reloaded only when one of them changed, and only after `nginx -t` accepts the
whole configuration: a rejected file fails the host while the running nginx keeps serving with
its previous configuration. Debian's default site (a welcome page on port 80) is removed: a
gateway host answers on the gateway's port only.
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files, server, systemd
from pyinfra.operations.util import any_changed

from gpufleet.hostops import secret_file
from roles.gateway.nginx_conf import GatewayPaths, render

PATHS = GatewayPaths()
DEFAULT_SITE = "/etc/nginx/sites-enabled/default"


@deploy("gateway")
def apply() -> None:
    fleet_host = host.data.gpufleet
    settings, plan = fleet_host.config.gateway, fleet_host.gateway
    rendered = render(plan, settings, fleet_host.api_keys, PATHS)
    apt.packages(name="nginx", packages=["nginx"])
    changes = [
        files.link(name="no default site", path=DEFAULT_SITE, present=False),
        files.directory(name="gateway config folder", path=PATHS.folder, mode="700"),
        secret_file(name="API keys (0600)", dest=PATHS.keys_map, content=rendered.keys_map),
        files.put(name="upstream of the instances", src=StringIO(rendered.upstream), dest=PATHS.upstream, mode="644"),
        files.put(name="gateway server", src=StringIO(rendered.conf), dest=PATHS.conf, mode="644"),
    ]
    changed = any_changed(*changes)
    systemd.service(name="nginx enabled and running", service="nginx", running=True, enabled=True)
    server.shell(name="reload nginx (configuration tested first)", commands=["nginx -t -q && nginx -s reload"],
                 _if=changed)
