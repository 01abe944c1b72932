"""`gpufleet gateway-exporter` on a real gateway: nginx with the role's files over simulators, on loopback.

The exporter runs as its systemd unit runs it (a process, `--log` the gateway's access log); requests
go through nginx (200s, 401s, a burst that gets 429s, 404s, a retry to a second instance) and every
counter scraped must equal what the clients got, by status and client. nginx's own log reopening
(`nginx -s reopen`, what logrotate's postrotate does) must lose nothing. Traffic goes to 127.0.0.1
only; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gpufleet.apikeys import ApiKey
from gpufleet.gatewaylog import metrics as m
from tests.integration.gateway_harness import (
    GPUFLEET,
    HOST,
    MODEL,
    Connection,
    NginxGateway,
    Reply,
    SimProcess,
    call,
    chat_body,
    find_nginx,
    free_port,
    new_key,
    running_sims,
)
from tests.unit.exporter_scrape import Scrape

pytestmark = pytest.mark.integration

TEAM_A = new_key("team-a")
TEAM_B = new_key("team-b")
KEYS = [TEAM_A, TEAM_B]
CHAT = "/v1/chat/completions"
NO_CLIENT = "-"


class GatewayExporter:
    """`gpufleet gateway-exporter --log LOG --listen 127.0.0.1:<free port> --model-name MODEL` in its own process."""

    def __init__(self, folder: Path, log: str, *flags: str) -> None:
        self.port = free_port()
        self.out = folder / f"gateway-exporter-{self.port}.log"
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(GPUFLEET), "gateway-exporter", "--log", log, "--listen", f"{HOST}:{self.port}",
                 "--model-name", MODEL, "--log-level", "debug", *flags],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def scrape(self) -> Scrape:
        return Scrape(httpx.get(f"http://{HOST}:{self.port}/metrics", timeout=5).text)

    def wait_for(self, check: Callable[[Scrape], bool], what: str, timeout: float = 20.0) -> Scrape:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the exporter exited {self.proc.returncode}:\n{self.output()}"
            with contextlib.suppress(httpx.TransportError):
                last = self.scrape()
                if check(last):
                    return last
            time.sleep(0.05)
        raise AssertionError(f"{what}: not within {timeout} s; last scrape:\n{last.text if last else None}\n"
                             f"{self.output()}")

    def wait_for_lines(self, count: int) -> Scrape:
        return self.wait_for(lambda s: s.value(m.LOG_LINES) >= count, f"{count} lines read")

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.out.read_text(errors="replace")


@contextlib.contextmanager
def gateway_exporter(folder: Path, log: str, *flags: str) -> Iterator[GatewayExporter]:
    proc = GatewayExporter(folder, log, *flags)
    try:
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SimProcess]]:
    find_nginx()  # fail at once, clearly, where nginx is missing
    with running_sims(tmp_path_factory.mktemp("sims"), 1) as started:
        yield started


def requests_by_status_and_client(scrape: Scrape) -> dict[tuple[str, str], int]:
    return {(lbl["status"], lbl["client"]): int(v) for lbl, v in scrape.find(m.REQUESTS, model_name=MODEL)}


def chat(port: int, key: ApiKey | None, max_tokens: int = 2) -> Reply:
    return call(port, "POST", CHAT, chat_body(max_tokens, stream=False), key=key.key if key else "sk-gf-wrong")


def burst(port: int, key: ApiKey, count: int) -> list[Reply]:
    """`count` requests of one key written within a millisecond or so, then their answers read."""
    body = json.dumps(chat_body(1, stream=False)).encode()
    conns = [Connection(port, timeout=30) for _ in range(count)]
    try:
        sent = [conn.send("POST", CHAT, body, {"Authorization": f"Bearer {key.key}"}, close=True) for conn in conns]
        assert sent[-1] - sent[0] < 0.2, f"the burst took {(sent[-1] - sent[0]) * 1e3:.1f} ms to send"
        return [conn.receive(at) for conn, at in zip(conns, sent, strict=True)]
    finally:
        for conn in conns:
            conn.close()


def test_counters_match_what_the_clients_got_by_status_and_client(sims: list[SimProcess], tmp_path: Path) -> None:
    with NginxGateway(tmp_path / "gateway", sims, KEYS, rate_per_second=2, burst=4, nodelay=True,
                      max_conns_per_key=64) as gw:
        assert chat(gw.port, TEAM_B).status == 200  # before the exporter starts: never counted
        gw.log_of(chat(gw.port, TEAM_B).headers["x-request-id"])  # both in the log

        with gateway_exporter(tmp_path, gw.paths.access_log) as exporter:
            idle = exporter.wait_for(lambda s: s.value(m.LOG_UP) == 1, "the log up")
            assert requests_by_status_and_client(idle) == {}
            assert idle.value(m.LOG_LINES) == 0

            time.sleep(1.1)  # team-b's allowance (burst 4) refills from the two requests above
            sent: Counter[tuple[str, str]] = Counter()
            for reply in burst(gw.port, TEAM_A, 10):  # rate 2/s, burst 4, nodelay: 5 pass, 5 get 429
                sent[(str(reply.status), "team-a")] += 1
            for _ in range(3):
                sent[(str(chat(gw.port, TEAM_B).status), "team-b")] += 1
            for _ in range(2):
                sent[(str(chat(gw.port, None).status), NO_CLIENT)] += 1  # an unknown key
            sent[(str(call(gw.port, "GET", "/nothing").status), NO_CLIENT)] += 1
            sent[(str(call(gw.port, "GET", "/metrics", key=TEAM_B.key).status), "team-b")] += 1
            assert sent == {("200", "team-a"): 5, ("429", "team-a"): 5, ("200", "team-b"): 3, ("401", "-"): 2,
                            ("404", "-"): 1, ("404", "team-b"): 1}, sent
            total = sum(sent.values())

            scrape = exporter.wait_for_lines(total)
            assert requests_by_status_and_client(scrape) == dict(sent)
            assert scrape.value(m.LOG_LINES) == total and scrape.value(m.LOG_MALFORMED_LINES) == 0
            assert scrape.value(m.REQUEST_DURATION + "_count", model_name=MODEL) == total
            # only the 200s reached the engine and have a time to its headers
            assert scrape.value(m.UPSTREAM_HEADER + "_count", model_name=MODEL) == 8
            assert scrape.value(m.UPSTREAM_RETRIES, model_name=MODEL) == 0
            assert abs(time.time() - scrape.value(m.LOG_LAST_LINE)) < 60
            assert scrape.value(m.LOG_ROTATIONS, kind="rename") == 0

            # the same as the log itself says, line by line
            logged = Counter((str(r["status"]), r["client"] or NO_CLIENT) for r in gw.access_log()[2:])
            assert logged == sent

            time.sleep(0.6)  # nothing is counted twice on later polls
            assert requests_by_status_and_client(exporter.scrape()) == dict(sent)
            assert exporter.terminate() == 0
            out = exporter.output()
            assert "serving the metrics of" in out and "stopping" in out
            assert "Traceback" not in out


def test_nginx_reopening_its_log_after_a_rename_loses_nothing(sims: list[SimProcess], tmp_path: Path) -> None:
    """logrotate's way: rename the log, then `nginx -s reopen` (SIGUSR1) creates the new one."""
    unlimited = {"rate_per_second": 1000, "burst": 1000, "max_conns_per_key": 64}
    with NginxGateway(tmp_path / "gateway", sims, KEYS, **unlimited) as gw, \
            gateway_exporter(tmp_path, gw.paths.access_log) as exporter:
        exporter.wait_for(lambda s: s.value(m.LOG_UP) == 1, "the log up")
        log = Path(gw.paths.access_log)
        assert chat(gw.port, TEAM_A).status == 200
        exporter.wait_for_lines(1)

        log.rename(log.with_name("access.log.1"))
        assert chat(gw.port, TEAM_A).status == 200  # nginx still writes to the renamed file
        assert chat(gw.port, None).status == 401
        down = exporter.wait_for_lines(3)
        assert down.value(m.LOG_UP) == 0  # no file at the path for now

        reopen = subprocess.run(gw.command("-s", "reopen"), capture_output=True, text=True, timeout=30)
        assert reopen.returncode == 0, reopen.stderr
        deadline = time.monotonic() + 10
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert log.exists(), "nginx did not create a new access log on reopen"
        for _ in range(3):
            assert chat(gw.port, TEAM_B).status == 200

        scrape = exporter.wait_for_lines(6)
        assert requests_by_status_and_client(scrape) == {("200", "team-a"): 2, ("401", "-"): 1, ("200", "team-b"): 3}
        assert scrape.value(m.LOG_ROTATIONS, kind="rename") == 1
        assert scrape.value(m.LOG_UP) == 1
        assert len(log.read_text().splitlines()) == 3  # the new file has the last three
        assert exporter.terminate() == 0


def test_a_retry_to_the_second_instance_is_counted(tmp_path: Path) -> None:
    with running_sims(tmp_path / "sims", 2) as two, \
            NginxGateway(tmp_path / "gateway", two, KEYS, rate_per_second=1000, burst=1000) as gw, \
            gateway_exporter(tmp_path, gw.paths.access_log) as exporter:
        exporter.wait_for(lambda s: s.value(m.LOG_UP) == 1, "the log up")
        two[0].kill()  # connections to it are refused: nginx tries the other (proxy_next_upstream error)
        statuses = [chat(gw.port, TEAM_A).status for _ in range(4)]
        assert statuses == [200] * 4
        records = gw.access_log()
        retried = [r for r in records if len(r["upstream"].split(", ")) > 1]
        assert len(retried) == 1, records  # then max_fails takes the dead one out for fail_timeout
        assert retried[0]["upstream_status"] == "502, 200"

        scrape = exporter.wait_for_lines(4)
        assert scrape.value(m.UPSTREAM_RETRIES, model_name=MODEL) == 1
        assert requests_by_status_and_client(scrape) == {("200", "team-a"): 4}
        # every request got headers from the engine that answered
        assert scrape.value(m.UPSTREAM_HEADER + "_count", model_name=MODEL) == 4
        assert exporter.terminate() == 0


def test_a_log_that_does_not_exist_yet_is_down_and_not_fatal(tmp_path: Path) -> None:
    missing = tmp_path / "nginx" / "access.log"
    with gateway_exporter(tmp_path, str(missing)) as exporter:
        scrape = exporter.wait_for(lambda s: s.has(m.LOG_UP), "log_up reported")
        assert scrape.value(m.LOG_UP) == 0
        missing.parent.mkdir()
        missing.write_text('{"status":503,"request_time":0.001,"client":"team-a"}\n')
        scrape = exporter.wait_for_lines(1)
        assert scrape.value(m.LOG_UP) == 1
        assert requests_by_status_and_client(scrape) == {("503", "team-a"): 1}
        assert exporter.terminate() == 0
        assert "waiting for it" in exporter.output()


def test_address_in_use_exits_1_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(GPUFLEET), "gateway-exporter", "--log", str(tmp_path / "access.log"), "--listen", f"{HOST}:{port}",
             "--model-name", MODEL],
            capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on {HOST}:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--listen", f"{HOST}:1"], "the following arguments are required: --model-name"),
        (["--model-name", MODEL, "--listen", "9145"], "--listen '9145': expected HOST:PORT"),
    ],
)
def test_bad_flags_exit_2_before_starting(flags: list[str], message: str) -> None:
    result = subprocess.run([str(GPUFLEET), "gateway-exporter", *flags], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "error: " in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_sigint_also_exits_0(tmp_path: Path) -> None:
    with gateway_exporter(tmp_path, str(tmp_path / "access.log")) as exporter:
        exporter.wait_for(lambda s: s.has(m.LOG_UP), "serving")
        exporter.proc.send_signal(signal.SIGINT)
        assert exporter.proc.wait(10) == 0
