"""Each engine container's spec, a pure function of the host's plan and settings.

One container per instance of the host's layout (`gpufleet plan` shows them). The spec is the
`docker create` options, the image and the engine's arguments; its hash goes into a label, so
the role can recreate a container exactly when its spec changed (pyinfra's docker.container
does not diff specs) and leave it alone otherwise.

What every engine container gets, and why:
- its GPUs only: `--gpus device=<indices>` (the simulator, which has no GPU, gets the same
  indices in CUDA_VISIBLE_DEVICES, as a process in the container would see them);
- memory with swap equal to it (an engine that swaps is slower than one that is killed), CPUs
  as a limit or a cpuset (`auto`: the host's cores split evenly across instances), a pids
  limit, shared memory for tensor parallelism (or the host's IPC namespace);
- memlock and stack ulimits as NVIDIA recommends for NCCL;
- its port published on engine.listen_address only (127.0.0.1 unless a gateway on other hosts
  must reach it): clients come through the gateway;
- restart unless stopped, json-file logs rotated like Docker's own (docker.log_max_*), a health
  check on the engine's /health, the model cache on the host (one download for all instances);
- with `engine.hf_token_file` set, the Hugging Face token as a read-only bind mount of the
  host's 0600 copy (the role uploads it) and `HF_TOKEN_PATH` naming it; never its value, which
  is in no argument, environment value, label or spec hash, so `docker inspect` and `ps` do not
  show it. The mount itself is in the hash: adding or removing the token recreates the engines,
  a new token value does not (see TOKEN_MOUNTS for where each engine reads it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

CONTAINER_PREFIX = "gpufleet-engine-"
SPEC_HASH_LABEL = "io.gpufleet.spec-hash"
ROLE_LABEL = "io.gpufleet.role"
INSTANCE_LABEL = "io.gpufleet.instance"
MODEL_CACHE = "/var/lib/gpufleet/model-cache"
STACK_BYTES = 67108864  # 64 MiB, NVIDIA's recommended stack ulimit for CUDA/NCCL containers

# where each engine listens inside its container, and keeps downloaded weights
CONTAINER_PORT = {"vllm": 8000, "tgi": 80, "sim": 8000}
CACHE_MOUNT = {"vllm": "/root/.cache/huggingface", "tgi": "/data", "sim": "/root/.cache/huggingface"}

# Where each engine reads the Hugging Face token file. huggingface_hub (vLLM's downloads, TGI's
# Python `download-weights` step, the simulator's start-up line) reads the file HF_TOKEN_PATH
# names (constants.HF_TOKEN_PATH, default $HF_HOME/token). TGI's Rust launcher and router use
# the hf-hub crate (0.4), which ignores HF_TOKEN_PATH and reads only $HF_HOME/token: HF_HOME is
# /data in TGI's images, so TGI gets the file there too (a mount inside the model cache's mount,
# which leaves an empty mount-point file `token` in the host's cache folder, never the token).
# The file is root's, mode 0600: vLLM's and TGI's images run as root; an image with a non-root
# USER (the simulator's, uid 10001) sees it but cannot read it.
HF_TOKEN_PATH = "/run/secrets/hf_token"
TOKEN_MOUNTS = {"vllm": (HF_TOKEN_PATH,), "tgi": (HF_TOKEN_PATH, "/data/token"), "sim": (HF_TOKEN_PATH,)}


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    options: tuple[str, ...]  # `docker create` options, labels included
    command: tuple[str, ...]  # the engine's arguments (after the image's entrypoint)
    instance: int
    gpus: tuple[int, ...]
    host_port: int
    spec_hash: str
    address: str = "127.0.0.1"  # where the engine's port is reached on its host

    @property
    def url(self) -> str:
        """The engine's base URL on its host (health checks, smoke completion, drain)."""
        return f"http://{_publish_address(self.address)}:{self.host_port}"

    def create_args(self) -> list[str]:
        return ["docker", "create", "--name", self.name, *self.options, self.image, *self.command]


def container_name(instance: int) -> str:
    return f"{CONTAINER_PREFIX}{instance}"


def cpusets(host_cpus: int, instances: int) -> list[str]:
    """The host's cores split into `instances` contiguous, equal ranges ('0-7', '8-15', ...)."""
    if host_cpus < instances:
        raise ValueError(f"{host_cpus} CPUs cannot be split across {instances} instances")
    share = host_cpus // instances
    return [f"{i * share}-{(i + 1) * share - 1}" if share > 1 else str(i * share) for i in range(instances)]


def _publish_address(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _reach(listen_address: str) -> str:
    """How the host itself reaches a port published on `listen_address` (all interfaces: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen_address, listen_address)


def _health_command(kind: str, port: int) -> str:
    # engines' images differ in tools (no curl in some); python3 is in all of them
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=5)"
    return f'python3 -c "{probe}"'


def _spec_hash(image: str, options: list[str], command: list[str]) -> str:
    canonical = json.dumps({"image": image, "options": options, "command": command}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def container_specs(config: Any, plan: Any, *, host_cpus: int | None = None, memlock: str = "-1",
                    log_max_size: str = "100m", log_max_file: int = 3,
                    hf_token: str | None = None) -> list[ContainerSpec]:
    """The engine containers of a GPU host (`config`: HostVars, `plan`: HostPlan).

    `host_cpus` is needed for `limits.cpuset: auto`. `memlock` is the memlock ulimit ("-1":
    unlimited), lowered only where the Docker daemon cannot grant more. `hf_token` is the path
    of the Hugging Face token file on the host (None: no token), mounted read-only.
    """
    kind = config.engine.kind
    limits = config.limits
    instances = plan.instances
    sets: list[str] | None = None
    if limits.cpuset == "auto":
        if host_cpus is None:
            raise ValueError("limits.cpuset auto needs the host's CPU count")
        sets = cpusets(host_cpus, len(instances))
    elif isinstance(limits.cpuset, list):
        if len(limits.cpuset) != len(instances):
            raise ValueError(f"limits.cpuset has {len(limits.cpuset)} entries for {len(instances)} instances")
        sets = list(limits.cpuset)
    port_inside = CONTAINER_PORT[kind]
    specs = []
    for instance in instances:
        devices = ",".join(str(gpu) for gpu in instance.gpus)
        options = [
            "--restart", "unless-stopped",
            "--memory", limits.memory, "--memory-swap", limits.memory,
            "--pids-limit", str(limits.pids),
            "--ulimit", f"memlock={memlock}", "--ulimit", f"stack={STACK_BYTES}",
            "--publish", f"{_publish_address(config.engine.listen_address)}:{instance.port}:{port_inside}",
            "--log-driver", "json-file",
            "--log-opt", f"max-size={log_max_size}", "--log-opt", f"max-file={log_max_file}",
            "--volume", f"{MODEL_CACHE}:{CACHE_MOUNT[kind]}",
        ]  # fmt: skip
        if sets is not None:
            options += ["--cpuset-cpus", sets[instance.index]]
        elif limits.cpus is not None:
            options += ["--cpus", f"{limits.cpus:g}"]
        options += ["--ipc", "host"] if limits.ipc_host else ["--shm-size", limits.shm_size]
        if hf_token is not None:
            for mount in TOKEN_MOUNTS[kind]:
                options += ["--volume", f"{hf_token}:{mount}:ro"]
            options += ["--env", f"HF_TOKEN_PATH={HF_TOKEN_PATH}"]
        if kind == "sim":
            options += ["--env", f"CUDA_VISIBLE_DEVICES={devices}"]  # the image's own HEALTHCHECK probes it
        else:
            options += ["--gpus", f'"device={devices}"']
            options += ["--health-cmd", _health_command(kind, port_inside), "--health-interval", "15s",
                        "--health-timeout", "5s", "--health-retries", "3", "--health-start-period", "900s"]
        command = list(instance.flags) + list(config.engine.extra_args)
        if kind == "sim":
            command = ["--host", "0.0.0.0", "--port", str(port_inside), "--gpu", plan.gpu.id, *command]
        elif kind == "vllm":
            command = [*command, "--host", "0.0.0.0", "--port", str(port_inside)]
        digest = _spec_hash(config.engine.image, options, command)
        labels = ["--label", f"{ROLE_LABEL}=inference", "--label", f"{INSTANCE_LABEL}={instance.index}",
                  "--label", f"{SPEC_HASH_LABEL}={digest}"]
        specs.append(ContainerSpec(
            name=container_name(instance.index), image=config.engine.image,
            options=tuple(options + labels), command=tuple(command), instance=instance.index,
            gpus=instance.gpus, host_port=instance.port, spec_hash=digest, address=_reach(config.engine.listen_address),
        ))
    return specs
