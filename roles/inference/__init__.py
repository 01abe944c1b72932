"""Role inference: the engine containers of a GPU host (vLLM, TGI or gpufleet's simulator).

spec.py builds each instance's container spec from the host's plan and settings. The role
converges the host to those specs: a container is (re)created only when its spec hash label
differs from the spec's (pyinfra's docker.container does not diff specs), started when it is
stopped, and containers of instances the layout no longer has are removed. Then it waits until
each engine is healthy and answers one smoke completion.

With `engine.hf_token_file` set, the Hugging Face token is uploaded to HF_TOKEN_FILE (folder
0700, file 0600, root's) by a checksum-comparing operation that never prints the file, even
under `--diff` (files.put would show its lines); the engines mount it read-only (spec.py).
Without it, a token left from an earlier setting is removed. A new token value is uploaded but
does not recreate the engines: an engine reads the token when it downloads, at start-up, so it
uses the new one from its next start (docs/serving.md, "Changing the token").
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from typing import Any

import gevent
from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.facts.server import Command
from pyinfra.operations import files

from gpufleet.hostops import executing, fail_host, image_present, secret_file
from roles.inference.spec import (
    CONTAINER_PREFIX,
    ROLE_LABEL,
    SPEC_HASH_LABEL,
    ContainerSpec,
    container_name,
    container_specs,
)

MODEL_CACHE_DIR = "/var/lib/gpufleet/model-cache"
SECRETS_DIR = "/etc/gpufleet/secrets"
HF_TOKEN_FILE = f"{SECRETS_DIR}/hf_token"
HEALTHY_TIMEOUT_S = 1800  # a real engine downloads and loads the model first
POLL_S = 2.0


def container_state(name: str, on: Any = None) -> tuple[str, bool] | None:
    """(spec hash label, running) of a container on host `on` (this one by default), None when there is none."""
    fmt = f'{{{{index .Config.Labels "{SPEC_HASH_LABEL}"}}}} {{{{.State.Running}}}}'
    inspect = f"docker inspect --format '{fmt}' {name} 2>/dev/null || true"
    out = (host if on is None else on).get_fact(Command, command=inspect)
    if not out:
        return None
    label, _, running = out.strip().rpartition(" ")
    return label, running == "true"


@operation()
def engine_container(instance: int) -> Iterator[str]:
    """Create the instance's container when missing or of another spec; start it when stopped.

    The spec is computed here, when the operation runs, not when the deploy is prepared: on a
    host this run is installing Docker on, dockerd's memlock limit (part of the spec) only
    exists by then.
    """
    spec = host_specs(host)[instance]
    state = container_state(spec.name)
    if state is not None and state[0] == spec.spec_hash:
        if not state[1]:
            yield f"docker start {spec.name}"
        return
    if state is not None:
        yield f"docker rm -f {spec.name}"
    yield " ".join(shlex.quote(arg) for arg in spec.create_args())
    yield f"docker start {spec.name}"


@operation()
def stale_engines_removed(keep: list[str]) -> Iterator[str]:
    """Remove engine containers of instances the layout no longer has."""
    out = host.get_fact(
        Command,
        command=f"docker ps -a --filter label={ROLE_LABEL}=inference --format '{{{{.Names}}}}' 2>/dev/null || true",
    )
    stale = sorted(name for name in (out or "").split() if name.startswith(CONTAINER_PREFIX) and name not in keep)
    if stale:
        yield f"docker rm -f {' '.join(stale)}"


def wait_healthy(spec: ContainerSpec, timeout: float) -> str | None:
    """None once the engine's /health answers 200 on its published port; else why not.

    The port is what clients (the gateway) use, so that is what is waited for; Docker's own
    health status (the container's health check) follows it but lags by an interval.
    """
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = host.get_fact(
            Command,
            command=f"curl -s -o /dev/null -w '%{{http_code}}' {spec.url}/health 2>/dev/null; "
            f"echo \" $(docker inspect --format '{{{{.State.Running}}}}' {spec.name} 2>/dev/null)\"",
        ) or ""
        code, _, running = status.strip().partition(" ")
        if code == "200":
            return None
        if running.strip() != "true":
            break
        gevent.sleep(POLL_S)  # lets pyinfra's other hosts go on meanwhile
    logs = host.get_fact(Command, command=f"docker logs --tail 20 {spec.name} 2>&1 || true") or ""
    return f"{spec.name} did not become healthy (/health, running: {status or 'no answer'}); last log lines:\n{logs}"


def smoke_completion(spec: ContainerSpec, served_name: str) -> str | None:
    """None when the engine answers one completion on its published port; else why not."""
    body = json.dumps({"model": served_name, "prompt": "ping", "max_tokens": 1})
    out = host.get_fact(
        Command,
        command=(
            f"curl -sS -o /dev/null -w '%{{http_code}}' -H 'Content-Type: application/json' "
            f"-d {shlex.quote(body)} {spec.url}/v1/completions 2>&1 || true"
        ),
    )
    return None if out == "200" else f"{spec.name}: a smoke completion got {out or 'no answer'}"


@operation()
def engines_serving(served_name: str, timeout: float = HEALTHY_TIMEOUT_S) -> Iterator[Any]:
    """Each engine healthy and answering one completion (checked when the run executes)."""
    if not executing():
        return
    for spec in host_specs(host):
        problem = wait_healthy(spec, timeout) or smoke_completion(spec, served_name)
        if problem:
            yield fail_host(problem + "\n  fix: see `docker logs` of the container on the host; the plan is in "
                            "/etc/gpufleet/host.json")
            return


def _memlock_limit(on: Any) -> str:
    """-1 (unlimited) unless dockerd itself runs with a lower hard memlock limit (then that)."""
    out = on.get_fact(
        Command,
        command=(
            "awk '/Max locked memory/ {print $5}' /proc/$(pidof dockerd | cut -d' ' -f1)/limits 2>/dev/null || true"
        ),
    )
    return "-1" if not out or out == "unlimited" or not out.isdigit() else out


def _host_cpus(on: Any) -> int | None:
    out = on.get_fact(Command, command="nproc 2>/dev/null || true")
    return int(out) if out and out.isdigit() else None


def host_specs(on: Any) -> list[ContainerSpec]:
    """The engine containers pyinfra host `on` should run (its facts fill in CPUs and memlock)."""
    fleet_host = on.data.gpufleet
    config = fleet_host.config
    return container_specs(
        config, fleet_host.plan, host_cpus=_host_cpus(on), memlock=_memlock_limit(on),
        log_max_size=config.docker.log_max_size, log_max_file=config.docker.log_max_file,
        hf_token=HF_TOKEN_FILE if config.engine.hf_token_file is not None else None,
    )


@deploy("inference")
def apply() -> None:
    fleet_host = host.data.gpufleet
    config = fleet_host.config
    token = config.engine.hf_token_file
    instances = fleet_host.plan.instances  # each operation computes its instance's spec when it runs
    image_present(name="engine image", image=config.engine.image, archive_url=config.engine.image_archive)
    if token is not None:
        files.directory(name="secrets folder", path=SECRETS_DIR, user="root", group="root", mode="700")
        if fleet_host.hf_token is None:  # load_fleet reads and checks it, unless told not to read secrets
            raise RuntimeError(f"{fleet_host.name}: engine.hf_token_file was not read (check_secrets=False)")
        secret_file(name="Hugging Face token (0600)", dest=HF_TOKEN_FILE, content=fleet_host.hf_token + "\n")
    else:
        files.file(name="no Hugging Face token", path=HF_TOKEN_FILE, present=False)  # a removed setting
    files.directory(name="model cache", path=MODEL_CACHE_DIR, mode="755")
    for instance in instances:
        engine_container(name=f"engine {instance.index} (GPUs {','.join(map(str, instance.gpus))})",
                         instance=instance.index)
    stale_engines_removed(name="engines the layout no longer has",
                          keep=[container_name(instance.index) for instance in instances])
    engines_serving(name="engines healthy and answering", served_name=fleet_host.plan.served_name)
