"""The load-test users' parts that need no server: request bodies, settings, body reads, Locust
events, and the records' way to the master (batching, the wire, merging) with a fake runner.

Locust itself is not imported here (it patches the process with gevent): users.py only wires
these parts to it, and the integration tests run real Locust processes.
"""

from __future__ import annotations

import itertools
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gevent
import gevent.socket
import msgpack
import pytest
from geventhttpclient.response import HTTPSocketResponse

from gpufleet.loadtest import collect
from gpufleet.loadtest.apis import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PROMPT,
    ApiError,
    PromptFields,
    Settings,
    SettingsError,
    as_fields,
    build_request,
    default_prompt,
    read_api_key,
    settings_from,
)
from gpufleet.loadtest.record import RequestRecord
from gpufleet.loadtest.sse import OPENAI_CHAT, OPENAI_COMPLETIONS, TGI, RequestMeta, interpreter_for
from gpufleet.loadtest.stream_io import (
    ERROR_BODY_LIMIT,
    DeferredReads,
    IdleParser,
    StreamError,
    read_body,
    read_error_body,
    report,
)

# ---- request bodies -------------------------------------------------------------------------------


def test_chat_body_from_a_text_prompt() -> None:
    path, body = build_request(OPENAI_CHAT, default_prompt(), "qwen", 64)
    assert path == "/v1/chat/completions"
    assert body == {"model": "qwen", "max_tokens": 64, "messages": [{"role": "user", "content": DEFAULT_PROMPT}],
                    "stream": True, "stream_options": {"include_usage": True}}


def test_chat_body_keeps_messages_and_the_prompts_own_lengths() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    fields = {"messages": messages, "max_tokens": 512, "min_tokens": 512, "ignore_eos": True, "temperature": 0}
    _, body = build_request(OPENAI_CHAT, PromptFields(fields, 30, 512), None, 64)
    assert "model" not in body  # the server's own model when none is configured
    assert body["messages"] == messages and body["max_tokens"] == 512 and body["min_tokens"] == 512
    assert body["ignore_eos"] is True and body["temperature"] == 0
    assert fields == {"messages": messages, "max_tokens": 512, "min_tokens": 512, "ignore_eos": True,
                      "temperature": 0}  # the source's dict is not changed


def test_openai_bodies_always_stream_with_usage() -> None:
    fields = {"prompt": "x", "stream": False,
              "stream_options": {"include_usage": False, "continuous_usage_stats": True}}
    for api in (OPENAI_CHAT, OPENAI_COMPLETIONS):
        _, body = build_request(api, PromptFields(fields), None, 8)
        assert body["stream"] is True
        assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    _, body = build_request(OPENAI_CHAT, PromptFields({"prompt": "x", "max_completion_tokens": 3}), None, 8)
    assert "max_tokens" not in body and body["max_completion_tokens"] == 3


def test_completions_body() -> None:
    path, body = build_request(OPENAI_COMPLETIONS, PromptFields({"prompt": "Once", "ignore_eos": True}), "m", 16)
    assert path == "/v1/completions"
    assert body == {"model": "m", "max_tokens": 16, "prompt": "Once", "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
    with pytest.raises(ApiError, match="not chat `messages`"):
        build_request(OPENAI_COMPLETIONS, PromptFields({"messages": []}), None, 16)
    with pytest.raises(ApiError, match="needs a `prompt`"):
        build_request(OPENAI_COMPLETIONS, PromptFields({}), None, 16)


def test_tgi_body_translates_the_openai_fields() -> None:
    fields = {"prompt": "Hello", "max_tokens": 40, "min_tokens": 40, "ignore_eos": True, "temperature": 0.7,
              "seed": 3, "parameters": {"top_n_tokens": 2}}
    path, body = build_request(TGI, PromptFields(fields), "ignored-model", 128)
    assert path == "/generate_stream"
    assert body == {"inputs": "Hello", "stream": True,
                    "parameters": {"max_new_tokens": 40, "temperature": 0.7, "seed": 3, "top_n_tokens": 2,
                                   "details": True}}
    _, body = build_request(TGI, PromptFields({"prompt": "Hi"}), None, 128)
    assert body["parameters"] == {"max_new_tokens": 128, "details": True}
    with pytest.raises(ApiError, match="not chat `messages`"):
        build_request(TGI, PromptFields({"messages": []}), None, 8)


def test_chat_needs_something_to_say() -> None:
    with pytest.raises(ApiError, match="needs `messages` or a text `prompt`"):
        build_request(OPENAI_CHAT, PromptFields({"max_tokens": 3}), None, 8)
    with pytest.raises(ApiError, match="unknown API 'grpc'"):
        build_request("grpc", default_prompt(), None, 8)


# ---- what prompt sources may return ---------------------------------------------------------------


@dataclass(frozen=True)
class PromptsModulePrompt:
    """Shaped like gpufleet.loadtest.prompts.Prompt (the colleague's exact-length prompts)."""

    messages: list[dict[str, Any]] | None
    text: str | None
    expected_input_tokens: int
    max_tokens: int
    min_tokens: int | None

    @property
    def expected_output_tokens(self) -> int | None:
        return self.max_tokens if self.min_tokens is not None else None


def test_prompt_sources_may_return_tuples_or_prompt_objects() -> None:
    assert as_fields(({"prompt": "a"}, 3, None)) == PromptFields({"prompt": "a"}, 3, None)
    assert as_fields(({"prompt": "a"},)) == PromptFields({"prompt": "a"}, None, None)
    assert as_fields(default_prompt()) == PromptFields({"prompt": DEFAULT_PROMPT})
    chat = PromptsModulePrompt([{"role": "user", "content": "hi"}], None, 512, 64, 64)
    assert as_fields(chat) == PromptFields(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "min_tokens": 64, "ignore_eos": True},
        512, 64)
    text = PromptsModulePrompt(None, "once", 9, 32, None)
    assert as_fields(text) == PromptFields({"prompt": "once", "max_tokens": 32}, 9, None)
    with pytest.raises(ApiError, match="returned int"):
        as_fields(7)


# ---- settings and the key file ----------------------------------------------------------------


def key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "key"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def options(**values: Any) -> SimpleNamespace:
    base = {"gpufleet_api": OPENAI_CHAT, "gpufleet_model": None, "gpufleet_max_tokens": DEFAULT_MAX_TOKENS,
            "gpufleet_api_key_file": None}
    return SimpleNamespace(**{**base, **values})


def test_the_key_comes_from_a_private_file(tmp_path: Path) -> None:
    path = key_file(tmp_path, "\n  sk-gf-secret-key-123  \n\n")
    assert read_api_key(path) == "sk-gf-secret-key-123"
    settings = settings_from(options(gpufleet_api_key_file=str(path), gpufleet_model="qwen", gpufleet_max_tokens=7))
    assert settings == Settings(api=OPENAI_CHAT, model="qwen", max_tokens=7, api_key="sk-gf-secret-key-123")
    assert settings.headers() == {"Content-Type": "application/json", "Accept": "text/event-stream",
                                  "Authorization": "Bearer sk-gf-secret-key-123"}
    assert "Authorization" not in Settings().headers()


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("sk-gf-x\n", 0o644, "is readable by others (mode 0644); fix: chmod 600"),
        ("sk-gf-x\nsk-gf-y\n", 0o600, "must hold one key alone on one line (it holds 2 non-empty lines)"),
        ("\n\n", 0o600, "(it holds 0 non-empty lines)"),
        ("sk gf\n", 0o600, "must hold one key alone on one line"),
    ],
)
def test_bad_key_files_are_refused_without_quoting_the_key(tmp_path: Path, text: str, mode: int,
                                                          message: str) -> None:
    path = key_file(tmp_path, text, mode)
    with pytest.raises(SettingsError, match=r"^--gpufleet-api-key-file: ") as caught:
        read_api_key(path)
    assert message in str(caught.value) and "sk-gf-x" not in str(caught.value)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_other_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        settings_from(options(gpufleet_api_key_file=str(tmp_path / "missing")))
    with pytest.raises(SettingsError, match="--gpufleet-api: 'grpc' is not one of"):
        settings_from(options(gpufleet_api="grpc"))
    with pytest.raises(SettingsError, match="--gpufleet-max-tokens: -3"):
        settings_from(options(gpufleet_max_tokens=-3))
    assert settings_from(SimpleNamespace()) == Settings()  # a worker before the master's options arrive


# ---- reading a body one recv at a time ------------------------------------------------------------


class ScriptedSocket:
    """A socket whose recv returns the scripted pieces, one per call, then b"" (the peer closed)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self.closed = False

    def recv(self, size: int) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""

    def close(self) -> None:
        self.closed = True


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def ticking_clock(start: float = 10.0, step: float = 1.0) -> Iterator[float]:
    return itertools.count(start, step)


def read_all(pieces: list[bytes]) -> tuple[list[tuple[bytes, float]], int, HTTPSocketResponse]:
    response = HTTPSocketResponse(ScriptedSocket(pieces), method="POST")
    reads: list[tuple[bytes, float]] = []
    clock = ticking_clock()
    size = read_body(response, lambda chunk, t: reads.append((chunk, t)), 5.0, clock=lambda: next(clock))
    return reads, size, response


def test_each_recv_is_stamped_before_the_chunk_framing_is_parsed() -> None:
    one, two = b"data: 1\n\n", b"data: 2\n\ndata: [DONE]\n\n"
    reads, size, response = read_all([HEAD, chunked(one), chunked(two) + b"0\r\n\r\n"])
    assert reads == [(one, 10.0), (two, 11.0)]
    assert size == len(one) + len(two) and response.message_complete


def test_a_recv_of_framing_only_gives_no_read_and_a_split_event_gives_two() -> None:
    frame = chunked(b"data: 123\n\n")
    reads, _, _ = read_all([HEAD, frame[:2], frame[2:7], frame[7:], b"0\r\n", b"\r\n"])
    # recv 1 (10.0) brought only the chunk size line; the body bytes came with recvs 2 and 3
    assert reads == [(b"data", 11.0), (b": 123\n\n", 12.0)]


def test_body_bytes_that_came_with_the_headers_carry_the_header_time() -> None:
    reads, _, _ = read_all([HEAD + chunked(b"data: early\n\n"), chunked(b"data: late\n\n") + b"0\r\n\r\n"])
    assert reads == [(b"data: early\n\n", 5.0), (b"data: late\n\n", 10.0)]


def test_a_connection_that_ends_mid_body_raises() -> None:
    with pytest.raises(ConnectionError, match="closed the connection before the body ended"):
        read_all([HEAD, chunked(b"data: 1\n\n")])


def test_a_body_delimited_by_the_connection_end() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    reads, size, response = read_all([head, b"data: 1\n\n", b"data: [DONE]\n\n"])
    assert reads == [(b"data: 1\n\n", 10.0), (b"data: [DONE]\n\n", 11.0)] and size == 23
    assert response.message_complete


def test_reads_drive_the_interpreter_end_to_end() -> None:
    events = [b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
              b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n',
              b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":" there"},"finish_reason":"length"}]}\n\n'
              b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\ndata: [DONE]\n\n']
    response = HTTPSocketResponse(ScriptedSocket([HEAD, chunked(events[0]), chunked(events[1]), b"0\r\n\r\n"]))
    interpreter = interpreter_for(RequestMeta(api=OPENAI_CHAT, sent=9.0, start_epoch=1.0), headers_at=9.5)
    clock = ticking_clock()
    read_body(response, interpreter.feed, 9.5, clock=lambda: next(clock))
    record = interpreter.record()
    assert record.ok and record.ttft_s == 1.0 and record.itl_s == (1.0,) and record.e2e_s == 2.0
    assert record.usage_output_tokens == 2 and record.extra["response_id"] == "c1"


def test_an_error_body_is_read_up_to_a_limit() -> None:
    big = b"x" * (ERROR_BODY_LIMIT + 5000)
    head = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n" % len(big)
    response = HTTPSocketResponse(ScriptedSocket([head, big[:40000], big[40000:]]))
    assert read_error_body(response, 1.0) == big[:ERROR_BODY_LIMIT]
    cut = HTTPSocketResponse(ScriptedSocket([b"HTTP/1.1 429 Too Many\r\nContent-Length: 100\r\n\r\n{\"err"]))
    assert read_error_body(cut, 1.0) == b'{"err'  # what came before the connection dropped


def gevent_pair(pieces: list[bytes], gap_s: float = 0.005) -> tuple[Any, Any]:
    """A gevent socket pair; a greenlet writes `pieces` into the far end, `gap_s` apart, then stalls."""
    near, far = gevent.socket.socketpair()

    def write() -> None:
        for piece in pieces:
            far.sendall(piece)
            gevent.sleep(gap_s)

    return near, (far, gevent.spawn(write))


def test_plain_gevent_sockets_are_read_through_a_watcher_of_their_own() -> None:
    events = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    near, (far, writer) = gevent_pair([HEAD, *(chunked(e) for e in events), b"0\r\n\r\n"])
    response = HTTPSocketResponse(near, method="POST")
    reads: list[tuple[bytes, float]] = []
    clock = ticking_clock()
    size = read_body(response, lambda chunk, t: reads.append((chunk, t)), 5.0, clock=lambda: next(clock),
                     idle_timeout_s=1.0)
    writer.join()
    assert [chunk for chunk, _ in reads] == events  # one recv per event: the writer paused between them
    assert [t for _, t in reads] == sorted(t for _, t in reads) and size == sum(map(len, events))
    assert response.message_complete
    near.close()
    far.close()


def test_a_stream_that_goes_quiet_times_out_and_a_slow_one_does_not() -> None:
    slow = [chunked(b"data: %d\n\n" % i) for i in range(5)]
    near, (far, writer) = gevent_pair([HEAD, *slow, b"0\r\n\r\n"], gap_s=0.03)
    size = read_body(HTTPSocketResponse(near, method="POST"), lambda chunk, t: None, 5.0, idle_timeout_s=0.1)
    assert size == 5 * len(b"data: 0\n\n")  # 30 ms apart, under the 100 ms idle limit each time
    writer.join()
    near.close()
    far.close()
    near, (far, writer) = gevent_pair([HEAD, chunked(b"data: 1\n\n")], gap_s=5.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no data for 0\.1 s"):
        read_body(HTTPSocketResponse(near, method="POST"), lambda chunk, t: None, 5.0, idle_timeout_s=0.1)
    assert 0.09 <= time.monotonic() - started < 1.0
    writer.kill()
    near.close()
    far.close()


# ---- Locust's request events ----------------------------------------------------------------------


def ok_record(tokens: int = 11) -> RequestRecord:
    return RequestRecord(start_epoch=1.0, api=OPENAI_CHAT, ttft_s=0.2, itl_s=(0.03,) * 9, e2e_s=0.5,
                         content_chunks=10, usage_output_tokens=tokens, status=200)


def test_a_success_shows_as_four_rows() -> None:
    fired: list[dict[str, Any]] = []
    report(lambda **kw: fired.append(kw), ok_record(), "/v1/chat/completions", 2345, elapsed_s=0.51)
    assert [(e["request_type"], e["name"]) for e in fired] == [
        ("POST", "/v1/chat/completions"), ("TTFT", "/v1/chat/completions"), ("TPOT", "/v1/chat/completions"),
        ("TOKENS", "/v1/chat/completions")]
    post, ttft, tpot, tokens = fired
    assert post["response_time"] == pytest.approx(500.0) and post["response_length"] == 2345
    assert all(e["exception"] is None for e in fired)
    assert ttft["response_time"] == pytest.approx(200.0)
    assert tpot["response_time"] == pytest.approx(30.0)  # (0.5 - 0.2) / (11 - 1)
    assert tokens["response_time"] == pytest.approx(22.0) and tokens["response_length"] == 11  # 11 tokens / 0.5 s


def test_a_single_token_answer_has_no_tpot_row() -> None:
    fired: list[dict[str, Any]] = []
    one = RequestRecord(start_epoch=1.0, api=TGI, ttft_s=0.2, e2e_s=0.2, content_chunks=1, usage_output_tokens=1,
                        status=200)
    report(lambda **kw: fired.append(kw), one, "/generate_stream", 100, elapsed_s=0.21)
    assert [e["request_type"] for e in fired] == ["POST", "TTFT", "TOKENS"]


def test_a_failure_shows_only_in_the_real_row() -> None:
    fired: list[dict[str, Any]] = []
    failed = RequestRecord(start_epoch=1.0, api=OPENAI_CHAT, status=429, error="HTTP 429: Too many requests")
    report(lambda **kw: fired.append(kw), failed, "/v1/chat/completions", 80, elapsed_s=0.004)
    assert len(fired) == 1 and fired[0]["request_type"] == "POST"
    assert fired[0]["response_time"] == pytest.approx(4.0)
    exception = fired[0]["exception"]
    assert isinstance(exception, StreamError) and str(exception) == "HTTP 429: Too many requests"


# ---- records on their way to the master ----------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEnvironment:
    """Locust's Environment as the collector sees it (weak-referenceable, with a runner)."""

    def __init__(self, runner: Any = None) -> None:
        self.runner = runner


class FakeRunner:
    """What the collector touches of Locust's runners: send_message, register_message, and the wire."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.handlers: dict[str, Any] = {}

    def send_message(self, msg_type: str, data: Any = None) -> None:
        # Locust's rpc packs messages with msgpack: the data must survive it
        self.sent.append((msg_type, msgpack.unpackb(msgpack.packb(data), raw=False)))

    def register_message(self, msg_type: str, listener: Any) -> None:
        assert msg_type not in self.handlers
        self.handlers[msg_type] = listener


def records(n: int, worker: str = "w") -> list[RequestRecord]:
    return [RequestRecord(start_epoch=1000.0 + i, api=OPENAI_CHAT, ttft_s=0.1 + i / 100, itl_s=(0.02, 0.03),
                          e2e_s=0.2, content_chunks=3, usage_output_tokens=3, status=200, worker=worker,
                          extra={"response_id": f"c{i}", "chunk_events": [1, 2]}) for i in range(n)]


def test_a_worker_batches_and_sends_at_most_once_a_second() -> None:
    runner, clock = FakeRunner(), FakeClock()
    worker = collect.RecordCollector(collect.WORKER, runner.send_message, clock=clock)
    batch = records(3)
    for record in batch:
        worker.add(record)
    clock.now = 0.5
    assert not worker.flush_due() and runner.sent == []
    clock.now = 1.0
    assert worker.flush_due()
    assert runner.sent == [(collect.MESSAGE, [r.to_dict() for r in batch])]
    assert worker.batch == [] and worker.sent == 3
    clock.now = 2.5
    assert not worker.flush_due()  # nothing new: nothing sent
    worker.add(records(1)[0])
    clock.now = 2.7
    assert not worker.flush_due()  # 0.2 s since the last (empty) flush
    assert worker.flush()  # a test stop sends at once
    assert len(runner.sent) == 2 and worker.sent == 4


def test_a_failed_send_keeps_the_batch() -> None:
    def broken(msg_type: str, data: Any) -> None:
        raise OSError("master gone")

    worker = collect.RecordCollector(collect.WORKER, broken)
    worker.add(records(1)[0])
    assert not worker.flush()
    assert len(worker.batch) == 1


def test_records_from_two_workers_merge_on_the_master() -> None:
    master_runner = FakeRunner()
    environment = FakeEnvironment(master_runner)
    master = collect.attach(environment, collect.RecordCollector(collect.MASTER))
    assert set(master_runner.handlers) == {collect.MESSAGE}
    wire = FakeRunner()
    sent = {name: records(4, worker=name) for name in ("w1", "w2")}
    for batch in sent.values():
        worker = collect.RecordCollector(collect.WORKER, wire.send_message)
        for record in batch:
            worker.add(record)
        worker.flush()
    for msg_type, data in wire.sent:  # as the master's runner delivers them
        master_runner.handlers[msg_type](environment=environment, msg=SimpleNamespace(type=msg_type, data=data))
    merged = collect.collected_records(environment)
    assert merged == sent["w1"] + sent["w2"]  # tuples and nested lists come back as they went
    assert all(isinstance(r.itl_s, tuple) for r in merged)
    merged.clear()
    assert len(collect.collected_records(environment)) == 8  # a copy: the collector's list is intact
    master.clear()
    assert collect.collected_records(environment) == []


def test_a_local_run_keeps_records_directly() -> None:
    environment = FakeEnvironment()
    local = collect.attach(environment, collect.RecordCollector(collect.LOCAL))
    batch = records(2)
    for record in batch:
        local.add(record)
    assert not local.flush()
    assert collect.collected_records(environment) == batch
    assert collect.collector_of(environment) is local


def test_no_records_without_a_collector_or_on_a_worker() -> None:
    assert collect.collected_records(FakeEnvironment()) == []
    environment = FakeEnvironment(FakeRunner())
    worker = collect.attach(environment, collect.RecordCollector(collect.WORKER, environment.runner.send_message))
    worker.add(records(1)[0])
    assert collect.collected_records(environment) == []
    assert environment.runner.handlers == {}  # only the master listens


def test_the_master_ignores_a_malformed_message() -> None:
    master = collect.RecordCollector(collect.MASTER)
    assert master.receive({"not": "a list"}) == 0 and master.records == []


def test_roles_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        collect.RecordCollector("observer")
    with pytest.raises(ValueError, match="needs `send`"):
        collect.RecordCollector(collect.WORKER)


# ---- parsing when the process is idle ----------------------------------------------------------------


def chat_reads() -> list[tuple[bytes, float]]:
    role = b'data: {"id":"c9","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    token = b'data: {"id":"c9","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    usage = b'data: {"id":"c9","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":300}}\n\ndata: [DONE]\n\n'
    reads = [(role + token, 10.0)] + [(token, 10.0 + i / 100) for i in range(1, 299)]
    return [*reads, (token + usage, 13.0)]


class Finished:
    def __init__(self) -> None:
        self.calls: list[tuple[RequestRecord, int, float]] = []

    def __call__(self, record: RequestRecord, size: int, ended: float) -> None:
        self.calls.append((record, size, ended))


def deferred(finished: Finished, parser: IdleParser) -> DeferredReads:
    return DeferredReads(interpreter_for(RequestMeta(api=OPENAI_CHAT, sent=9.9, start_epoch=1.0)), finished, parser)


def test_a_closed_stream_is_parsed_and_finished_once() -> None:
    finished, parser = Finished(), IdleParser()
    reads = deferred(finished, parser)
    for chunk, arrived in chat_reads()[:10]:
        reads.add(chunk, arrived)
    assert reads.interpreter.events == 0  # nothing parsed while the stream runs
    record = reads.close("connection failed: reset")
    assert record.error == "connection failed: reset" and record.content_chunks == 10
    assert [c[0] for c in finished.calls] == [record] and finished.calls[0][1] == reads.interpreter.parser.bytes_read
    assert not parser.queue


def test_a_long_stream_is_parsed_as_it_goes_in_idle_moments() -> None:
    finished, parser = Finished(), IdleParser()
    reads = deferred(finished, parser)
    for chunk, arrived in chat_reads()[:DeferredReads.BATCH]:
        reads.add(chunk, arrived)
    assert reads.queued and reads.interpreter.events == 0
    gevent.sleep(0.05)  # the loop is idle: the parser works through the batch
    assert not reads.queued and not reads.pending and reads.interpreter.events == DeferredReads.BATCH + 1
    assert finished.calls == []  # the stream has not ended
    for chunk, arrived in chat_reads()[DeferredReads.BATCH:]:
        reads.add(chunk, arrived)
    record = reads.close()
    assert record.ok and record.content_chunks == 300 and record.usage_output_tokens == 300
    assert record.ttft_s == pytest.approx(0.1) and record.e2e_s == pytest.approx(3.1)
    assert len(finished.calls) == 1


def test_parsing_waits_while_sockets_are_busy() -> None:
    finished, parser = Finished(), IdleParser()
    reads = deferred(finished, parser)
    for chunk, arrived in chat_reads():
        reads.add(chunk, arrived)
    closer = gevent.spawn(reads.close)
    busy_until = time.monotonic() + 0.05
    while time.monotonic() < busy_until:  # another greenlet that always has work ready
        gevent.sleep(0)
    assert reads.interpreter.events < 16 * 4  # at most a few slices got an idle moment
    closer.join(5)
    assert closer.value is not None and closer.value.ok


def test_records_waiting_for_the_parser_survive_a_stop() -> None:
    finished, parser = Finished(), IdleParser()
    streams = [deferred(finished, parser) for _ in range(3)]
    users = []
    for reads in streams:
        for chunk, arrived in chat_reads()[:5]:
            reads.add(chunk, arrived)
        users.append(gevent.spawn(reads.close))
    gevent.sleep(0)  # the users close their streams and wait for the parser...
    gevent.killall(users)  # ... and are stopped before it had an idle moment
    assert finished.calls == [] and len(parser.queue) == 3
    parser.finish_all()
    assert len(finished.calls) == 3 and all(record.content_chunks == 5 for record, _, _ in finished.calls)
    gevent.sleep(0.01)  # the parser's own greenlet finds nothing left to do
    assert len(finished.calls) == 3


def test_a_failing_finish_does_not_stop_the_parser(caplog: pytest.LogCaptureFixture) -> None:
    parser = IdleParser()

    def broken(record: RequestRecord, size: int, ended: float) -> None:
        raise RuntimeError("listener failed")

    first = DeferredReads(interpreter_for(RequestMeta(api=OPENAI_CHAT, sent=9.9, start_epoch=1.0)), broken, parser)
    finished = Finished()
    second = deferred(finished, parser)
    for reads in (first, second):
        reads.add(*chat_reads()[0])
    assert first.close().content_chunks == 1  # the record is still there for its user
    assert second.close().content_chunks == 1 and len(finished.calls) == 1
    assert "finishing a request record failed" in caplog.text
