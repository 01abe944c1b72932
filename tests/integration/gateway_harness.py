"""Real processes for the gateway tests: simulators and an nginx on loopback, and a lean HTTP client.

Each simulator is its own `gpufleet sim serve` process (so a kill is a real process death and the
simulator does not share the test's event loop); nginx runs from a temporary prefix with the files
roles/gateway/nginx_conf.py renders, included in a minimal nginx.conf, so nothing under /etc or
/var/lib/nginx is touched. The client speaks HTTP/1.1 over raw sockets and stamps every read with
time.monotonic() (the clock of the simulator's token log) before parsing it, so timings are the
network's and the servers', not a client library's.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.apikeys import KEY_PREFIX, ApiKey
from gpufleet.planner.gateway import Backend, GatewayPlan
from gpufleet.schema.sections import Gateway
from roles.gateway.nginx_conf import GatewayPaths, render, render_upstream

HOST = "127.0.0.1"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # the bench profile's model
REPO = Path(__file__).resolve().parents[2]
GPUFLEET = Path(sys.executable).parent / "gpufleet"
DEFAULTS = REPO / "roles" / "gateway" / "defaults.yml"
START_TIMEOUT_S = 20.0


def find_nginx() -> str:
    """nginx from PATH or /usr/sbin (not on a non-root PATH); a clear failure, not a skip, when absent."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        pytest.fail(
            "nginx is not installed (neither on PATH nor /usr/sbin/nginx): run scripts/bootstrap.sh "
            "as root, or apt-get install nginx-light",
            pytrace=False,
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def new_key(name: str) -> ApiKey:
    return ApiKey(name, KEY_PREFIX + secrets.token_urlsafe(32))


def gateway_settings(**changes: Any) -> Gateway:
    """The role's defaults with `changes`, validated by the schema as an inventory's would be."""
    defaults = yaml.safe_load(DEFAULTS.read_text(encoding="utf-8"))["gateway"]
    return Gateway(**{**defaults, **changes})


def _tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (nginx's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


# ---- CPU: pinning and other processes' load -------------------------------------------------------


@contextlib.contextmanager
def pinned(pids: Sequence[int], cpu: int) -> Iterator[None]:
    """Run `pids` on one CPU for the block (the calling process's own affinity is restored after)."""
    own = os.sched_getaffinity(0)
    try:
        for pid in pids:
            os.sched_setaffinity(pid, {cpu})
        yield
    finally:
        os.sched_setaffinity(0, own)


def _process_ticks(pid: int) -> int:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    return 0


def _busy_ticks(cpu: int) -> int:
    """Time one CPU was not idle, steal (taken by the hypervisor) included, in clock ticks."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return user + nice + system + irq + softirq + steal
    raise AssertionError(f"no cpu{cpu} in /proc/stat")


class ForeignLoad:
    """The share of one CPU that anything but `pids` took (or the hypervisor stole) over a block."""

    def __init__(self, pids: Sequence[int], cpu: int) -> None:
        self.pids = list(pids)
        self.cpu = cpu
        self.hz = os.sysconf("SC_CLK_TCK")
        self.share = 0.0

    def __enter__(self) -> ForeignLoad:
        self.start = (time.monotonic(), _busy_ticks(self.cpu), sum(map(_process_ticks, self.pids)))
        return self

    def __exit__(self, *exc: object) -> None:
        began, busy, ours = self.start
        elapsed = time.monotonic() - began
        foreign = (_busy_ticks(self.cpu) - busy) - (sum(map(_process_ticks, self.pids)) - ours)
        self.share = max(0.0, foreign / self.hz / elapsed)


# ---- the HTTP client -----------------------------------------------------------------------------


@dataclass
class Reply:
    """One HTTP response, with when its parts arrived (time.monotonic)."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; repeated ones joined by ", "
    body: bytes = b""
    complete: bool = False  # the whole body arrived (a cut stream is not complete)
    sent_at: float = 0.0  # the request's last byte was handed to the kernel
    head_at: float = 0.0  # the status line and headers had arrived
    reads: list[tuple[float, bytes]] = field(default_factory=list)  # body bytes, stamped per socket read
    error: str = ""

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[tuple[float, str]]:
        """Server-sent events' data lines, each stamped with the read that completed it."""
        found: list[tuple[float, str]] = []
        pending = b""
        for stamp, data in self.reads:
            pending += data
            *whole, pending = pending.split(b"\n\n")
            found += [(stamp, event.decode().removeprefix("data: ")) for event in whole if event.strip()]
        return found

    def tokens(self) -> list[tuple[float, dict[str, Any]]]:
        """The SSE chunks that carry generated text (content or text), parsed, with their stamps."""
        chunks = []
        for stamp, data in self.events():
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            choice = (chunk.get("choices") or [{}])[0]
            if choice.get("delta", {}).get("content") or choice.get("text"):
                chunks.append((stamp, chunk))
        return chunks

    @property
    def stream_done(self) -> bool:
        return self.complete and self.body.rstrip().endswith(b"data: [DONE]")


class Connection:
    """One keep-alive HTTP/1.1 connection, read with a small parser that stamps each read."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> float:
        """Send a request; returns when its last byte left (time.monotonic)."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{self.port}"]
        merged = {"Connection": "close"} if close else {}
        if body is not None:
            merged |= {"Content-Type": "application/json", "Content-Length": str(len(body))}
        merged |= headers or {}
        lines += [f"{name}: {value}" for name, value in merged.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        return time.monotonic()

    def _read(self) -> tuple[float, bytes]:
        data = self.sock.recv(262144)
        return time.monotonic(), data

    def receive(self, sent_at: float = 0.0, head_only: bool = False) -> Reply:
        """Read one response; a connection cut before its end gives complete=False (and the error)."""
        reply = Reply(sent_at=sent_at)
        try:
            while b"\r\n\r\n" not in self.buffer:
                stamp, data = self._read()
                if not data:
                    reply.error = "closed before the response head"
                    return reply
                self.buffer += data
                reply.head_at = stamp
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            reply.status = int(status_line.split()[1])
            for line in header_lines:
                name, _, value = line.partition(":")
                key = name.strip().lower()
                reply.headers[key] = f"{reply.headers[key]}, {value.strip()}" if key in reply.headers else value.strip()
            if head_only:
                return reply
            if reply.headers.get("transfer-encoding", "").lower() == "chunked":
                self._chunked(reply)
            elif "content-length" in reply.headers:
                self._sized(reply, int(reply.headers["content-length"]))
            else:
                self._until_close(reply)
        except OSError as exc:
            reply.error = f"{type(exc).__name__}: {exc}"
        reply.body = b"".join(data for _, data in reply.reads)
        return reply

    def _sized(self, reply: Reply, size: int) -> None:
        stamp = reply.head_at
        while len(self.buffer) < size:
            stamp, data = self._read()
            if not data:
                reply.reads.append((stamp, self.buffer))
                self.buffer = b""
                reply.error = "closed before the end of the body"
                return
            self.buffer += data
        reply.reads.append((stamp, self.buffer[:size]))
        self.buffer = self.buffer[size:]
        reply.complete = True

    def _until_close(self, reply: Reply) -> None:
        if self.buffer:
            reply.reads.append((reply.head_at, self.buffer))
            self.buffer = b""
        while True:
            stamp, data = self._read()
            if not data:
                break
            reply.reads.append((stamp, data))
        reply.complete = True

    def _chunked(self, reply: Reply) -> None:
        """Decode chunks as they come; each read's payload keeps that read's stamp."""
        stamp = reply.head_at
        while True:
            # a chunk: size line, payload, CRLF; collect what this buffer holds, then read more
            payload = b""
            while True:
                line_end = self.buffer.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(self.buffer[:line_end].split(b";")[0], 16)
                if len(self.buffer) < line_end + 2 + size + 2:
                    break
                if size == 0:
                    # the last chunk (no trailers expected)
                    if payload:
                        reply.reads.append((stamp, payload))
                    self.buffer = self.buffer[line_end + 4 :]
                    reply.complete = True
                    return
                payload += self.buffer[line_end + 2 : line_end + 2 + size]
                self.buffer = self.buffer[line_end + 2 + size + 2 :]
            if payload:
                reply.reads.append((stamp, payload))
            stamp, data = self._read()
            if not data:
                reply.error = "closed in the middle of the chunked body"
                return
            self.buffer += data


def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Reply:
    """One request on a new connection (closed after): a JSON body unless bytes are given."""
    merged = dict(headers or {})
    if key is not None:
        merged["Authorization"] = f"Bearer {key}"
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    with Connection(port, timeout) as conn:
        sent = conn.send(method, path, raw, merged, close=True)
        return conn.receive(sent)


def chat_body(max_tokens: int, stream: bool = True, content: str = "Say something about gateways.") -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


# ---- the simulator processes ---------------------------------------------------------------------


class SimProcess:
    """`gpufleet sim serve --profile bench` on a free loopback port, in its own process."""

    def __init__(self, folder: Path, *flags: str) -> None:
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / f"sim-{self.port}.log"
        args = [
            str(GPUFLEET),
            "sim",
            "serve",
            "--profile",
            "bench",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--startup-delay",
            "0",
            *flags,
        ]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def server(self) -> str:
        return f"{HOST}:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"simulator on port {self.port} exited {self.proc.returncode}:\n{_tail(self.log)}")
            with contextlib.suppress(OSError):
                if call(self.port, "GET", "/health", timeout=2).status == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(
            f"simulator on port {self.port} did not answer /health in {START_TIMEOUT_S} s:\n{_tail(self.log)}"
        )

    def kill(self) -> None:
        """SIGKILL: the process dies with its connections, as a crashed engine would."""
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        _stop(self.proc)

    def token_log(self, clear: bool = False) -> dict[str, dict[str, Any]]:
        """The simulator's token log by request id: when each token was scheduled and written."""
        reply = call(self.port, "GET", "/admin/token-log" + ("?clear=1" if clear else ""))
        assert reply.status == 200, reply.body
        return {record["id"]: record for record in reply.json()["requests"]}


@contextlib.contextmanager
def running_sims(folder: Path, count: int, *flags: str) -> Iterator[list[SimProcess]]:
    """`count` simulators started together, all stopped however the block ends."""
    sims: list[SimProcess] = []
    try:
        for _ in range(count):
            sims.append(SimProcess(folder, *flags))
        for sim in sims:
            sim.wait_ready()
        yield sims
    finally:
        for sim in sims:
            sim.stop()


def backends(sims: Sequence[SimProcess]) -> tuple[Backend, ...]:
    return tuple(
        Backend(host="localhost", instance=i, address=HOST, port=s.port, max_num_seqs=512) for i, s in enumerate(sims)
    )


# ---- nginx ---------------------------------------------------------------------------------------


class NginxGateway:
    """nginx with the role's rendered files, from a temporary prefix; a context manager."""

    def __init__(
        self,
        folder: Path,
        sims: Sequence[SimProcess],
        keys: Sequence[ApiKey],
        engine: str = "sim",
        max_concurrency: int = 64,
        drained: Collection[str] = (),
        **changes: Any,
    ) -> None:
        self.nginx = find_nginx()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.status_port = free_port()
        self.settings = gateway_settings(listen=f"{HOST}:{self.port}", status_port=self.status_port, **changes)
        self.plan = GatewayPlan(
            served_name=MODEL,
            engine=engine,
            backends=backends(sims),
            max_concurrency=max_concurrency,
            derived_cap=False,
        )
        self.keys = list(keys)
        self.paths = GatewayPaths(
            conf=str(folder / "gpufleet.conf"),
            upstream=str(folder / "upstream.conf"),
            keys_map=str(folder / "api_keys.map"),
            access_log=str(folder / "access.log"),
        )
        self.conf = folder / "nginx.conf"
        self.error_log = folder / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.write(drained)

    def write(self, drained: Collection[str] = ()) -> None:
        files = render(self.plan, self.settings, self.keys, self.paths, drained=drained)
        Path(self.paths.conf).write_text(files.conf, encoding="utf-8")
        Path(self.paths.upstream).write_text(files.upstream, encoding="utf-8")
        keys_map = Path(self.paths.keys_map)
        keys_map.touch(mode=0o600)
        keys_map.write_text(files.keys_map, encoding="utf-8")
        temp = self.folder / "temp"
        temp.mkdir(exist_ok=True)
        # as root, nginx's workers would run as nobody, who cannot enter pytest's 0700 folders
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"{user}worker_processes 1;\npid {self.folder}/nginx.pid;\nerror_log {self.error_log} warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n    access_log off;\n"
            + "".join(
                f"    {kind}_temp_path {temp}/{kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            + f"    include {self.paths.conf};\n}}\n",
            encoding="utf-8",
        )

    def drain(self, servers: Collection[str]) -> None:
        """Re-render only the upstream with `servers` down (as deploy/rollout.py does) and reload."""
        Path(self.paths.upstream).write_text(render_upstream(self.plan, self.settings, servers), encoding="utf-8")
        self.reload()

    def command(self, *args: str) -> list[str]:
        return [self.nginx, "-p", str(self.folder), "-c", str(self.conf), *args]

    def test_config(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self) -> NginxGateway:
        with (self.folder / "nginx.out").open("wb") as out:
            self.proc = subprocess.Popen(
                self.command("-g", "daemon off;"), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"nginx exited {self.proc.returncode}:\n{_tail(self.folder / 'nginx.out')}\n{_tail(self.error_log)}"
                )
            with contextlib.suppress(OSError):
                if call(self.port, "GET", "/healthz", timeout=2).status == 200:
                    return self
            time.sleep(0.02)
        raise AssertionError(f"nginx did not answer /healthz in {START_TIMEOUT_S} s:\n{_tail(self.error_log)}")

    def workers(self) -> list[int]:
        assert self.proc is not None
        return _children(self.proc.pid)

    def reload(self) -> None:
        """SIGHUP, then wait until the old workers have gone, so new connections meet the new config."""
        old = set(self.workers())
        result = subprocess.run(self.command("-s", "reload"), capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = set(self.workers())
            if now and not now & old:
                return
            time.sleep(0.02)
        raise AssertionError(f"nginx's old workers {old} did not exit after the reload:\n{_tail(self.error_log)}")

    def stop(self) -> None:
        if self.proc is None:
            return
        workers = self.workers()
        _stop(self.proc)  # SIGTERM: the master stops its workers
        for pid in workers:  # only if the master could not (it was SIGKILLed after the timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> NginxGateway:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON access log, one record per line; nginx writes each line whole at the request's end."""
        path = Path(self.paths.access_log)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def log_of(self, request_id: str, wait_s: float = 5.0) -> dict[str, Any]:
        """The access log record of one request (written when nginx finished it: wait a little)."""
        deadline = time.monotonic() + wait_s
        while True:
            found = [r for r in self.access_log() if r["request_id"] == request_id]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, f"{len(found)} access log records for request {request_id}"
                return found[0]
            time.sleep(0.02)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
