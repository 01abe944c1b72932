"""e2e fixtures: Docker brought up, images built on demand (cached), containers always removed.

A fresh machine needs nothing beyond `make setup`: the first e2e test starts Docker if no daemon
answers (scripts/docker.sh, as root), builds gpufleet/debian:bookworm and gpufleet/sim:<version>
(a few minutes once, then a cache check of under a second). GPUFLEET_E2E=0 skips the tier
explicitly; a machine that cannot run Docker otherwise fails the tests, with the reason.

Traffic goes only to ports published on 127.0.0.1 and to containers through `docker exec`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest

from gpufleet.testbed import images

E2E_LABEL = "io.gpufleet.e2e"  # on every container the e2e tests start, so strays can be found


@dataclass(frozen=True)
class Container:
    """A running container started by a test; `port` maps container ports to 127.0.0.1 ports."""

    name: str
    image: str
    ports: dict[int, int]

    def url(self, container_port: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[container_port]}{path}"

    def exec(self, *cmd: str, timeout: float = 30) -> str:
        """Run a command in the container; its stdout, stripped. Fails the test on a non-zero exit."""
        proc = docker("exec", self.name, *cmd, timeout=timeout, check=False)
        if proc.returncode != 0:
            pytest.fail(f"docker exec {self.name} {' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr}")
        return proc.stdout.strip()

    def inspect(self) -> dict:
        return json.loads(docker("inspect", self.name).stdout)[0]

    def logs(self) -> str:
        proc = docker("logs", "--tail", "60", self.name, check=False)
        return proc.stdout + proc.stderr

    def health_status(self) -> str | None:
        """The HEALTHCHECK's verdict (starting, healthy, unhealthy), None for an image without one."""
        return (self.inspect()["State"].get("Health") or {}).get("Status")

    def request(
        self, container_port: int, path: str, body: dict | None = None, timeout: float = 10
    ) -> tuple[int, bytes]:
        """GET (or POST JSON to) a published port on 127.0.0.1; (status, body), HTTP errors included."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        request = urllib.request.Request(self.url(container_port, path), data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_http_ok(self, container_port: int, path: str, timeout: float = 60) -> None:
        """Poll until `path` answers 200; fail at once, with the container's log, if the container exits."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            state = self.inspect()["State"]
            if not state["Running"]:
                pytest.fail(f"{self.name} exited ({state['ExitCode']}) before {path} answered:\n{self.logs()}")
            try:
                status, body = self.request(container_port, path, timeout=2)
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.3)
        pytest.fail(f"{path} did not answer 200 within {timeout:.0f}s ({last}); log:\n{self.logs()}")


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"docker {' '.join(args)}: exit {proc.returncode}\n{proc.stderr.strip()}")
    return proc


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (docker binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def docker_ready() -> None:
    """A Docker daemon that answers; started (and installed, as root) when there is none."""
    if os.environ.get("GPUFLEET_E2E") == "0":
        pytest.skip("GPUFLEET_E2E=0: e2e tests skipped on request")
    try:
        images.ensure_docker()
    except images.ImageError as exc:
        pytest.fail(f"e2e tests need Docker: {exc}\n(set GPUFLEET_E2E=0 to skip them)", pytrace=False)


@pytest.fixture(scope="session")
def memlock_ulimit(docker_ready: None) -> str:
    """The `--ulimit memlock=` value engine containers can get here: "-1" (unlimited, what the
    inference role asks for) when the daemon may grant it, else the daemon's own hard limit.

    A daemon can only hand out what it holds: raising RLIMIT_MEMLOCK needs CAP_SYS_RESOURCE, and
    some sandboxes (this test bed's VM among them) run every process with an 8 MiB hard limit and
    without that capability, so runc fails with "error setting rlimit type 8: operation not
    permitted". Everything else in the engine spec is used unchanged.
    """
    base = images.ensure_base_image()
    probe = docker("run", "--rm", "--network", "none", "--ulimit", "memlock=-1", "--entrypoint", "true", base,
                   check=False)  # fmt: skip
    if probe.returncode == 0:
        return "-1"
    if "rlimit" not in probe.stderr:
        pytest.fail(f"docker run --ulimit memlock=-1 failed:\n{probe.stderr}", pytrace=False)
    hard_kib = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", base, "-c", "ulimit -Hl").stdout.strip()
    hard = "-1" if hard_kib == "unlimited" else str(int(hard_kib) * 1024)
    return f"{hard}:{hard}"


@pytest.fixture(scope="session")
def sim_image(docker_ready: None) -> str:
    """The simulator image of this tree (its content tag), built now if the tree changed since the last build."""
    try:
        return images.ensure_sim_image()
    except images.ImageError as exc:
        pytest.fail(f"could not build the simulator image: {exc}", pytrace=False)


RunContainer = Callable[..., Container]


@contextlib.contextmanager
def container_runner() -> Iterator[RunContainer]:
    """A `run(image, args, options=..., ports=...)` that starts detached containers with their ports
    published on 127.0.0.1 only; every container it started is removed on exit, pass or fail."""
    names: list[str] = []

    def run(
        image: str, args: Sequence[str] = (), *, options: Sequence[str] = (), ports: Sequence[int] = ()
    ) -> Container:
        name = f"gpufleet-e2e-{uuid.uuid4().hex[:10]}"
        published = {port: free_port() for port in ports}
        publish = [arg for port, host in published.items() for arg in ("-p", f"127.0.0.1:{host}:{port}")]
        names.append(name)
        docker("run", "--detach", "--name", name, "--label", f"{E2E_LABEL}=1", *publish, *options, image, *args)
        return Container(name=name, image=image, ports=published)

    try:
        yield run
    finally:
        for name in names:
            with contextlib.suppress(subprocess.TimeoutExpired):
                docker("rm", "--force", "--volumes", name, check=False, timeout=60)


@pytest.fixture
def run_container(docker_ready: None) -> Iterator[RunContainer]:
    """container_runner() for one test: its containers are removed when the test ends."""
    with container_runner() as run:
        yield run


@pytest.fixture(scope="module")
def module_run_container(docker_ready: None) -> Iterator[RunContainer]:
    """container_runner() for a module's shared containers: removed after the module's last test."""
    with container_runner() as run:
        yield run
