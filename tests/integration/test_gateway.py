"""The gateway as its clients meet it: a real nginx with the role's rendered files, over simulators.

Every simulator is its own `gpufleet sim serve --profile bench` process on a free loopback port,
every test gets a fresh nginx (fresh limit zones) from a temporary prefix, and every process is
stopped however the test ends (tests/integration/gateway_harness.py). Traffic goes to 127.0.0.1
only. Measured numbers are printed (`pytest -s` shows them). The gateway's added time to first
token is a benchmark, not a test: benchmarks/bench_gateway_ttft.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.gateway_harness import (
    MODEL,
    Connection,
    NginxGateway,
    Reply,
    SimProcess,
    call,
    chat_body,
    find_nginx,
    new_key,
    percentile,
    running_sims,
)

TEAM_A = new_key("team-a")
TEAM_B = new_key("team-b")
KEYS = [TEAM_A, TEAM_B]
CHAT = "/v1/chat/completions"
# limits high enough never to interfere where a test is about something else
UNLIMITED = {"rate_per_second": 1000, "burst": 1000, "max_conns_per_key": 64}

MakeGateway = Callable[..., NginxGateway]


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SimProcess]]:
    find_nginx()  # fail at once, clearly, where nginx is missing
    with running_sims(tmp_path_factory.mktemp("sims"), 2) as started:
        yield started


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[MakeGateway]:
    """make(sims, **settings) -> a started nginx over `sims`; all stopped at the test's end."""
    with contextlib.ExitStack() as stack:
        made = iter(range(100))

        def make(over: list[SimProcess], **changes: Any) -> NginxGateway:
            return stack.enter_context(NginxGateway(tmp_path / f"gateway-{next(made)}", over, KEYS, **changes))

        yield make


def error_of(reply: Reply, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error body nginx answers with, checked."""
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    error = reply.json()["error"]
    assert error["code"] == status and error["type"] and error["message"], error
    return error


# ---- keys ------------------------------------------------------------------------------------------


def test_a_key_is_required_and_a_good_key_is_served(sims: list[SimProcess], gateway: MakeGateway) -> None:
    gw = gateway(sims, **UNLIMITED)
    for key in (None, "sk-gf-" + "x" * 43, TEAM_A.key[:-1]):
        reply = call(gw.port, "POST", CHAT, chat_body(1, stream=False), key=key)
        error = error_of(reply, 401)
        assert error["type"] == "authentication_error" and "Bearer" in error["message"]
        assert reply.headers["www-authenticate"].startswith("Bearer")
    # not a Bearer credential at all
    basic = call(gw.port, "POST", CHAT, chat_body(1, stream=False), headers={"Authorization": "Basic dXNlcjpwdw=="})
    error_of(basic, 401)

    for key in KEYS:
        chat = call(gw.port, "POST", CHAT, chat_body(2, stream=False), key=key.key)
        assert chat.status == 200, chat.body
        assert chat.json()["object"] == "chat.completion" and chat.json()["usage"]["completion_tokens"] == 2
        completion = call(
            gw.port,
            "POST",
            "/v1/completions",
            {"model": MODEL, "prompt": "Once upon", "max_tokens": 2, "ignore_eos": True},
            key=key.key,
        )
        assert completion.status == 200, completion.body
        assert completion.json()["object"] == "text_completion"
        assert re.fullmatch(r"[0-9a-f]{32}", chat.headers["x-request-id"])
    assert gw.log_of(chat.headers["x-request-id"])["client"] == "team-b"


def test_a_key_with_its_case_changed_is_refused(sims: list[SimProcess], gateway: MakeGateway) -> None:
    """nginx's map compares plain strings without regard to case; the key map must not."""
    gw = gateway(sims, **UNLIMITED)
    assert call(gw.port, "GET", "/v1/models", key=TEAM_A.key).status == 200
    assert call(gw.port, "GET", "/v1/models", key=TEAM_A.key.swapcase()).status == 401


# ---- rate and concurrency limits -----------------------------------------------------------------


def test_a_burst_beyond_rate_and_burst_gets_429_and_other_keys_are_unaffected(
    sims: list[SimProcess], gateway: MakeGateway
) -> None:
    """rate 2 r/s, burst 4, nodelay: of 10 requests at once, 1 + 4 pass and 5 get 429.

    nginx's limit_req with nodelay admits a request while the key's excess (requests beyond the
    rate, leaking at 2/s) stays <= burst: the first 5 take it to 4, and a 6th is refused until
    500 ms have leaked one request away. So the count is exactly 5 by construction when all 10
    reach nginx within 500 ms: the 11 connections are opened first, then all requests are written
    in one tight loop (well under a millisecond, asserted), then the answers are read.
    """
    gw = gateway(sims, rate_per_second=2, burst=4, nodelay=True, max_conns_per_key=64)
    body = json.dumps(chat_body(1, stream=False)).encode()
    conns = [(key, Connection(gw.port, timeout=30)) for key in [TEAM_A] * 10 + [TEAM_B]]
    try:
        sent = [
            conn.send("POST", CHAT, body, {"Authorization": f"Bearer {key.key}"}, close=True) for key, conn in conns
        ]
        assert sent[-1] - sent[0] < 0.05, f"the 11 requests took {(sent[-1] - sent[0]) * 1e3:.1f} ms to send"
        replies = [conn.receive(at) for (_, conn), at in zip(conns, sent, strict=True)]
    finally:
        for _, conn in conns:
            conn.close()

    team_a, team_b = replies[:10], replies[10]
    assert sorted(r.status for r in team_a) == [200] * 5 + [429] * 5, [r.status for r in team_a]
    for refused in (r for r in team_a if r.status == 429):
        assert error_of(refused, 429)["type"] == "rate_limit_error"
        assert refused.headers["retry-after"] == "1"
    assert team_b.status == 200, team_b.body  # another key's allowance is its own
    records = [gw.log_of(r.headers["x-request-id"]) for r in replies]
    assert sorted(r["limit_req"] for r in records[:10] if r["status"] == 429) == ["REJECTED"] * 5
    assert all(r["client"] == "team-a" for r in records[:10]) and records[10]["client"] == "team-b"


def test_concurrent_streams_are_capped_per_key_and_across_the_gateway(
    sims: list[SimProcess], gateway: MakeGateway
) -> None:
    """max_conns_per_key 2 and a gateway-wide cap of 3: a third stream of one key, or a fourth in all, gets 429."""
    gw = gateway(sims, rate_per_second=1000, burst=1000, max_conns_per_key=2, max_concurrency=3)
    body = json.dumps(chat_body(2000)).encode()  # streams far longer than the test
    open_streams: list[Connection] = []

    def start(key: str) -> Reply:
        """A stream's head: once it is here, nginx is proxying the request (the engine answered)."""
        conn = Connection(gw.port, timeout=30)
        open_streams.append(conn)
        return conn.receive(conn.send("POST", CHAT, body, {"Authorization": f"Bearer {key}"}), head_only=True)

    def refused(key: str) -> Reply:
        return call(gw.port, "POST", CHAT, chat_body(2000), key=key)

    try:
        assert [start(TEAM_A.key).status for _ in range(2)] == [200, 200]
        third = refused(TEAM_A.key)
        assert error_of(third, 429)["type"] == "rate_limit_error" and third.headers["retry-after"] == "1"
        assert start(TEAM_B.key).status == 200  # team-b has its own allowance ...
        over_cap = refused(TEAM_B.key)  # ... but the gateway is full: 3 in flight
        error_of(over_cap, 429)
        for reply in (third, over_cap):
            assert gw.log_of(reply.headers["x-request-id"])["limit_conn"] == "REJECTED"

        # a client that hangs up frees its place (nginx notices and aborts the upstream request)
        open_streams.pop(0).close()
        deadline = time.monotonic() + 5
        while (retry := start(TEAM_B.key)).status == 429 and time.monotonic() < deadline:
            open_streams.pop().close()
            time.sleep(0.05)
        assert retry.status == 200
    finally:
        for conn in open_streams:
            conn.close()


def test_a_body_over_max_body_size_gets_413(sims: list[SimProcess], gateway: MakeGateway) -> None:
    # a Docker-style size the schema accepts; nginx gets it in its own syntax (16k)
    gw = gateway(sims, max_body_size="16KiB", **UNLIMITED)
    assert "client_max_body_size 16k;" in Path(gw.paths.conf).read_text()
    fits = call(gw.port, "POST", CHAT, chat_body(1, stream=False, content="word " * 2500), key=TEAM_A.key)
    assert fits.status == 200, fits.body
    too_large = call(gw.port, "POST", CHAT, chat_body(1, stream=False, content="word " * 4000), key=TEAM_A.key)
    error = error_of(too_large, 413)
    assert error["type"] == "invalid_request_error" and "too large" in error["message"]


# ---- what is reachable --------------------------------------------------------------------------


def test_only_the_serving_api_is_reachable_and_nginx_does_not_say_its_version(
    sims: list[SimProcess], gateway: MakeGateway
) -> None:
    gw = gateway(sims, **UNLIMITED)
    version = find_nginx_version()
    engine_paths = [
        ("GET", "/metrics"),
        ("GET", "/health"),
        ("GET", "/admin/token-log"),
        ("GET", "/admin/faults"),
        ("POST", "/admin/faults"),
        ("GET", "/v1/../metrics"),
        ("GET", "/version"),
        ("GET", "/"),
    ]
    for method, path in engine_paths:
        for key in (None, TEAM_A.key):
            body = {"crash": True} if method == "POST" else None
            reply = call(gw.port, method, path, body, key=key)
            assert error_of(reply, 404)["type"] == "not_found_error", (method, path)
    assert all(sim.proc.poll() is None for sim in sims)  # the crash fault never reached an engine
    models = call(gw.port, "GET", "/v1/models", key=TEAM_A.key)
    assert models.status == 200 and models.json()["data"][0]["id"] == MODEL

    healthz = call(gw.port, "GET", "/healthz")
    assert healthz.status == 200 and healthz.json() == {"status": "ok"}
    status = call(gw.status_port, "GET", "/stub_status")
    assert status.status == 200 and status.body.startswith(b"Active connections:"), status.body

    # server_tokens off: no version in headers, in nginx's own error pages, or in the JSON errors
    with Connection(gw.port) as conn:
        conn.sock.sendall(b"NOT HTTP\r\n\r\n")
        malformed = conn.receive()
    assert malformed.status == 400
    for reply in (healthz, models, malformed, call(gw.port, "GET", "/metrics")):
        assert reply.headers["server"] == "nginx", reply.headers
        assert version not in reply.body.decode(errors="replace")
        assert version not in json.dumps(reply.headers)


def find_nginx_version() -> str:
    out = subprocess.run([find_nginx(), "-v"], capture_output=True, text=True, timeout=30).stderr
    found = re.search(r"nginx/(\d+\.\d+\.\d+)", out)
    assert found, out
    return found.group(1)


# ---- streaming and latency -----------------------------------------------------------------------


def test_a_stream_arrives_token_by_token(sims: list[SimProcess], gateway: MakeGateway) -> None:
    """Each SSE chunk reaches the client as the engine writes it, not in a lump at the end.

    The simulator's token log says when it wrote each token (time.monotonic, the clock the client
    stamps reads with), so every chunk's arrival is compared with its own write time.
    """
    gw = gateway(sims[:1], **UNLIMITED)
    tokens = 40
    reply = call(gw.port, "POST", CHAT, chat_body(tokens), key=TEAM_A.key)
    assert reply.status == 200 and reply.stream_done, reply.error
    assert reply.headers["content-type"].startswith("text/event-stream")
    chunks = reply.tokens()
    assert len(chunks) == tokens
    written = sims[0].token_log()[chunks[0][1]["id"]]["written"]
    assert len(written) == tokens
    arrived = [stamp for stamp, _ in chunks]
    delays_ms = sorted((a - w) * 1e3 for a, w in zip(arrived, written, strict=True))
    # token i arrives before the engine even writes token i+1 (~6.6 ms later on the bench profile)
    in_time = sum(a < w for a, w in zip(arrived, written[1:], strict=False))
    spread, engine_spread = arrived[-1] - arrived[0], written[-1] - written[0]
    print(
        f"\nstream of {tokens} tokens through the gateway: delivery after the engine's write p50 "
        f"{percentile(delays_ms, 50):.3f} ms, max {delays_ms[-1]:.3f} ms; {in_time}/{tokens - 1} before the "
        f"next token was written; spread {spread * 1e3:.1f} ms (engine {engine_spread * 1e3:.1f} ms)"
    )
    assert in_time >= 0.9 * (tokens - 1)
    assert spread >= 0.9 * engine_spread and engine_spread > 0.1
    assert percentile(delays_ms, 50) < 2.0


# ---- failures and rollout ------------------------------------------------------------------------


@dataclass
class Outcome:
    started: float
    ended: float
    reply: Reply

    @property
    def ok(self) -> bool:
        return self.reply.status == 200 and self.reply.stream_done and len(self.reply.tokens()) == 20


def test_killing_an_instance_mid_load_fails_only_its_open_streams(
    tmp_path: Path, sims: list[SimProcess], gateway: MakeGateway
) -> None:
    """4 streaming clients over 3 instances; one is SIGKILLed mid-run. Every request that starts
    after the kill succeeds (nginx retries a refused connection on another instance and takes the
    dead one out of rotation); streams the dead instance was sending may be cut."""
    with running_sims(tmp_path / "victim", 1) as (victim,):
        gw = gateway([*sims, victim], **UNLIMITED, max_fails=1, fail_timeout_s=30)
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        body = json.dumps(chat_body(20)).encode()
        start = time.monotonic()
        stop_at = start + 6.0

        def client() -> None:
            while time.monotonic() < stop_at:
                began = time.monotonic()
                try:
                    with Connection(gw.port, timeout=15) as conn:
                        reply = conn.receive(
                            conn.send("POST", CHAT, body, {"Authorization": f"Bearer {TEAM_A.key}"}, close=True)
                        )
                except OSError as exc:
                    reply = Reply(error=f"{type(exc).__name__}: {exc}")
                with lock:
                    outcomes.append(Outcome(began, time.monotonic(), reply))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(2.5)
        kill_sent = time.monotonic()
        victim.kill()
        killed = time.monotonic()
        for thread in threads:
            thread.join(20)
        assert not any(t.is_alive() for t in threads)

    before = [o for o in outcomes if o.started < killed]
    after = [o for o in outcomes if o.started >= killed]
    failed_in_flight = [o for o in before if not o.ok]
    print(
        f"\nkill test: {len(outcomes)} streams, {len(before)} started before the kill "
        f"({len(failed_in_flight)} cut: in flight on the killed instance), {len(after)} after "
        f"({sum(not o.ok for o in after)} failed)"
    )
    assert len(after) >= 20
    assert all(o.ok for o in after), [(o.reply.status, o.reply.error) for o in after if not o.ok]
    assert all(o.ended >= kill_sent for o in failed_in_flight)  # only streams open at the kill may fail
    assert len(failed_in_flight) <= 4

    survivors = {s.server for s in sims}
    log_text = Path(gw.paths.access_log).read_text()
    records = {r["request_id"]: r for r in gw.access_log()}
    seen_before = {
        records[o.reply.headers["x-request-id"]]["upstream"].split(", ")[-1]
        for o in before
        if "x-request-id" in o.reply.headers
    }
    assert victim.server in seen_before  # the killed instance was taking its share until then
    retried = 0
    for outcome in after:
        record = records[outcome.reply.headers["x-request-id"]]
        assert set(record) >= {"request_id", "client", "status", "upstream", "upstream_header_time"}
        assert record["client"] == "team-a" and record["status"] == 200
        tried = record["upstream"].split(", ")
        assert tried[-1] in survivors, record
        retried += len(tried) > 1
        assert all(float(t) >= 0 for t in record["upstream_header_time"].split(", ") if t != "-"), record
    print(f"kill test: {retried} requests after the kill were retried on a survivor after the dead instance")
    for key in KEYS:
        assert key.key not in log_text
    assert "bearer" not in log_text.lower() and "authorization" not in log_text.lower()


@pytest.mark.parametrize("engine", ["vllm", "sim", "tgi"])
def test_the_rendered_config_passes_nginx_t(tmp_path: Path, sims: list[SimProcess], engine: str) -> None:
    for drained in ((), {sims[0].server}):
        gw = NginxGateway(tmp_path / f"drained-{len(drained)}", sims, KEYS, engine=engine, drained=drained)
        result = gw.test_config()
        assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr


def test_a_drained_instance_gets_no_requests_after_a_reload(sims: list[SimProcess], gateway: MakeGateway) -> None:
    gw = gateway(sims[:2], **UNLIMITED)

    def upstreams(count: int) -> list[str]:
        ids = []
        for _ in range(count):
            reply = call(gw.port, "POST", CHAT, chat_body(1, stream=False), key=TEAM_A.key)
            assert reply.status == 200, reply.body
            ids.append(reply.headers["x-request-id"])
        return [gw.log_of(i)["upstream"] for i in ids]

    assert set(upstreams(4)) == {sims[0].server, sims[1].server}
    gw.drain({sims[0].server})  # as deploy/rollout.py does: only the upstream file changes, then a reload
    assert "down;" in Path(gw.paths.upstream).read_text()
    assert set(upstreams(8)) == {sims[1].server}
    # with every instance down nginx answers 502 itself, in the same JSON shape
    gw.drain({sims[0].server, sims[1].server})
    error = error_of(call(gw.port, "POST", CHAT, chat_body(1, stream=False), key=TEAM_A.key), 502)
    assert error["type"] == "api_error"


def test_an_unlimited_client_is_not_rate_limited_while_others_still_are(
    sims: list[SimProcess], gateway: MakeGateway
) -> None:
    """gateway.unlimited_clients (a load test's key): 10 requests at once all pass at 2 r/s burst 4, and
    the same burst from a limited key still gets 5 x 429."""
    gw = gateway(sims, rate_per_second=2, burst=4, nodelay=True, max_conns_per_key=2,
                 unlimited_clients=[TEAM_B.name])
    body = json.dumps(chat_body(1, stream=False)).encode()
    conns = [(key, Connection(gw.port, timeout=30)) for key in [TEAM_B] * 10 + [TEAM_A] * 10]
    try:
        sent = [conn.send("POST", CHAT, body, {"Authorization": f"Bearer {key.key}"}, close=True)
                for key, conn in conns]
        assert sent[-1] - sent[0] < 0.05, f"the 20 requests took {(sent[-1] - sent[0]) * 1e3:.1f} ms to send"
        replies = [conn.receive(at) for (_, conn), at in zip(conns, sent, strict=True)]
    finally:
        for _, conn in conns:
            conn.close()
    assert [r.status for r in replies[:10]] == [200] * 10, [r.status for r in replies[:10]]
    assert sorted(r.status for r in replies[10:]).count(429) >= 5, [r.status for r in replies[10:]]
