"""The gateway's nginx files, a pure function of the host's gateway settings, plan and API keys.

Three files, so each changes only when its inputs do: the server configuration
(templates/gpufleet.conf.j2), the upstream of instances (templates/upstream.conf.j2, which
deploy/rollout.py re-renders with one instance marked `down`) and the key map (mode 0600: it
holds every client's key). Integration tests render the same files for an nginx on loopback.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from gpufleet.apikeys import ApiKey
from gpufleet.planner.gateway import GatewayPlan
from gpufleet.schema.units import parse_size

TEMPLATES = Path(__file__).parent / "templates"
UPSTREAM = "gpufleet_engines"
CONNECT_TIMEOUT_S = 2
RETRY_WINDOW_S = 10
KEEPALIVE = 64

# The serving API per engine; everything else (/metrics, /health, admin paths) answers 404.
API_PATHS = {
    "vllm": r"^/v1/(chat/completions|completions|embeddings|models(/[^/]+)?)$",
    "sim": r"^/v1/(chat/completions|completions|models(/[^/]+)?)$",
    "tgi": r"^(/v1/(chat/completions|completions|models(/[^/]+)?)|/generate|/generate_stream)$",
}

# OpenAI-shaped errors for what nginx itself answers (an engine's own errors pass through as they
# are). No quote characters: they sit in nginx's single-quoted strings.
ERRORS = {
    401: ("authentication_error", "missing or unknown API key: send Authorization: Bearer <key>"),
    404: ("not_found_error", "no such path on this gateway"),
    405: ("invalid_request_error", "method not allowed"),
    413: ("invalid_request_error", "request body too large"),
    429: ("rate_limit_error", "too many requests: the rate or connection limit of this key, or the capacity "
          "of the service, is reached; retry after a moment"),
    502: ("api_error", "no model instance answered; retry later"),
    503: ("api_error", "the service is unavailable; retry later"),
    504: ("api_error", "the model instance did not answer in time"),
}


@dataclass(frozen=True)
class GatewayPaths:
    """Where the files live; the role uses the defaults, tests a temporary folder."""

    conf: str = "/etc/nginx/conf.d/gpufleet.conf"
    upstream: str = "/etc/nginx/gpufleet/upstream.conf"
    keys_map: str = "/etc/nginx/gpufleet/api_keys.map"
    access_log: str = "/var/log/nginx/gpufleet-access.log"

    @property
    def folder(self) -> str:
        return str(PurePosixPath(self.upstream).parent)


@dataclass(frozen=True)
class GatewayFiles:
    conf: str
    upstream: str
    keys_map: str = field(repr=False)  # secret


def nginx_rate(per_second: float) -> str:
    """nginx's rate syntax: whole requests per second, else per minute (nginx takes integers only)."""
    if float(per_second).is_integer():
        return f"{int(per_second)}r/s"
    per_minute = round(per_second * 60)
    if per_minute < 1:
        raise ValueError(f"a rate of {per_second}/s is below nginx's lowest, 1 request per minute")
    return f"{per_minute}r/m"


def nginx_size(size: str) -> str:
    """nginx's size syntax (whole k or m, else bytes) for a schema size such as '4m', '4MiB' or '1.5m'."""
    count = parse_size(size)
    for unit, factor in (("m", 1 << 20), ("k", 1 << 10)):
        if count % factor == 0:
            return f"{count // factor}{unit}"
    return str(count)


def render_upstream(plan: GatewayPlan, settings: object, drained: Collection[str] = ()) -> str:
    """The upstream block; `drained` holds backends' `server` addresses to mark down."""
    return _env().get_template("upstream.conf.j2").render(
        plan=plan, upstream=UPSTREAM, drained=set(drained), keepalive=KEEPALIVE,
        max_fails=settings.max_fails, fail_timeout_s=settings.fail_timeout_s,
    )


def render_keys_map(keys: Sequence[ApiKey]) -> str:
    lines = ["# API keys -> client names for the gateway: generated, mode 0600, never commit"]
    # exact and case-sensitive (plain map strings ignore case); one pattern per key, tried in
    # order: microseconds per request for hundreds of keys
    lines += [f'"~^{re.escape(key.key)}$" "{key.name}";' for key in sorted(keys, key=lambda k: k.name)]
    return "\n".join(lines) + "\n"


def render(plan: GatewayPlan, settings: object, keys: Sequence[ApiKey],
           paths: GatewayPaths = GatewayPaths(), drained: Collection[str] = ()) -> GatewayFiles:
    """The three files for a gateway host (`settings`: the host's `gateway` section)."""
    conf = _env().get_template("gpufleet.conf.j2").render(
        plan=plan, upstream=UPSTREAM, keys_map=paths.keys_map, upstream_conf=paths.upstream,
        access_log=paths.access_log, listen=settings.listen, rate=nginx_rate(settings.rate_per_second),
        burst=settings.burst, nodelay=settings.nodelay, max_conns_per_key=settings.max_conns_per_key,
        max_concurrency=plan.max_concurrency, max_body_size=nginx_size(settings.max_body_size),
        read_timeout_s=settings.read_timeout_s, connect_timeout_s=CONNECT_TIMEOUT_S,
        retry_window_s=RETRY_WINDOW_S, status_port=settings.status_port,
        api_paths=API_PATHS[plan.engine], errors=ERRORS, unlimited_clients=sorted(settings.unlimited_clients),
    )
    return GatewayFiles(conf=conf, upstream=render_upstream(plan, settings, drained), keys_map=render_keys_map(keys))


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["regex_escape"] = re.escape
    return env
