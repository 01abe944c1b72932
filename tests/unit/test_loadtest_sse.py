"""The SSE parser and the per-API stream interpreters, on byte-exact streams read in every possible way.

The fixtures are the bytes vLLM (and the simulator) and TGI put on the wire. A read's time is what
the interpreter stamps the events it completes with, so each test says which read brought which
bytes and checks TTFT, ITL, E2E and the counts exactly, in seconds.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufleet.loadtest.calibration import StealWatch, compare, percentile, steal_ticks
from gpufleet.loadtest.record import RequestRecord
from gpufleet.loadtest.sse import (
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    TGI,
    ChunkClock,
    RequestMeta,
    SseEvent,
    SseParser,
    error_text,
    failed_record,
    http_error_message,
    interpret,
    interpreter_for,
)

SENT = 100.0  # perf_counter when the request was sent
EPOCH = 1_750_000_000.0

# ---- fixtures: the bytes on the wire ------------------------------------------------------------

CHAT_ID = "chatcmpl-5e1f0c2a9b8d4e7f"
_CHAT_HEAD = '{"id":"' + CHAT_ID + '","object":"chat.completion.chunk","created":1750000000,"model":"qwen","choices":['


def chat_event(content: str | None, finish: str | None = None, role: bool = False) -> bytes:
    """One vLLM chat chunk as the simulator writes it (`data: ` with a space, usage null)."""
    delta: dict[str, str] = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    reason = "null" if finish is None else f'"{finish}"'
    return (f"data: {_CHAT_HEAD}" + '{"index":0,"delta":' + json.dumps(delta, separators=(",", ":"))
            + f',"logprobs":null,"finish_reason":{reason}' + "}],\"usage\":null}\n\n").encode()


def chat_usage(prompt: int, completion: int) -> bytes:
    usage = f'{{"prompt_tokens":{prompt},"total_tokens":{prompt + completion},"completion_tokens":{completion}}}'
    return f"data: {_CHAT_HEAD}],\"usage\":{usage}}}\n\n".encode()


DONE = b"data: [DONE]\n\n"

# vLLM's chat stream of 4 tokens, as the simulator writes it, one write per token: the role chunk
# goes out with the first token; the last token's write carries the usage chunk and [DONE]
CHAT_WRITES: list[bytes] = [
    chat_event("", role=True) + chat_event(" The"),
    chat_event(" gateway"),
    chat_event(" routes"),
    chat_event(" requests", finish="length") + chat_usage(20, 4) + DONE,
]
CHAT_STREAM = b"".join(CHAT_WRITES)
CHAT_TEXT_EVENTS = (1, 2, 3, 4)  # indexes (in the stream's events) of the text-carrying events


def completion_event(text: str, finish: str | None = None) -> bytes:
    reason = "null" if finish is None else f'"{finish}"'
    return ('data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":'
            + json.dumps(text) + f',"logprobs":null,"finish_reason":{reason},"stop_reason":null'
            + '}],"usage":null}\n\n').encode()


def tgi_event(index: int, text: str, special: bool = False, final: int | None = None) -> bytes:
    """TGI's generate_stream event (`data:` without a space); `final` = generated_tokens of the last one."""
    token = {"id": 1000 + index, "text": text, "logprob": -1.0, "special": special}
    if final is None:
        tail = '"generated_text":null,"details":null,"top_tokens":null'
    else:
        details = {"finish_reason": "eos_token", "generated_tokens": final, "seed": None, "input_length": 9}
        tail = '"generated_text":"Hello world","details":' + json.dumps(details) + ',"top_tokens":null'
    return f'data:{{"index":{index},"token":{json.dumps(token)},{tail}}}\n\n'.encode()


TGI_STREAM = tgi_event(1, "Hello") + tgi_event(2, " world") + tgi_event(3, "<|im_end|>", special=True, final=3)


def meta(api: str = OPENAI_CHAT, **changes: object) -> RequestMeta:
    return RequestMeta(api=api, sent=SENT, start_epoch=EPOCH, **changes)  # type: ignore[arg-type]


def reads_at(*parts: tuple[float, bytes]) -> list[tuple[float, bytes]]:
    return list(parts)


# ---- the SSE parser ------------------------------------------------------------------------------


def feed_all(parser: SseParser, parts: Sequence[bytes]) -> list[SseEvent]:
    events: list[SseEvent] = []
    for i, part in enumerate(parts):
        events += parser.feed(part, float(i))
    return events


def test_one_event_per_read() -> None:
    parser = SseParser()
    assert parser.feed(b"data: hello\n\n", 1.5) == [SseEvent("hello", 1.5)]
    assert parser.feed(b"data:{\"a\":1}\n\n", 2.5) == [SseEvent('{"a":1}', 2.5)]
    assert parser.pending == b"" and parser.bytes_read == 27


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(newline: bytes) -> None:
    stream = b"data: one" + newline * 2 + b": ping" + newline * 2 + b"data: a" + newline + b"data: b" + newline * 2
    events = SseParser().feed(stream, 1.0)
    assert [e.data for e in events] == ["one", "a\nb"]


def test_several_events_in_one_read_share_its_time() -> None:
    events = SseParser().feed(b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n", 7.0)
    assert events == [SseEvent("1", 7.0), SseEvent("2", 7.0), SseEvent("[DONE]", 7.0)]


def test_an_event_split_across_reads_arrives_with_its_last_read() -> None:
    parser = SseParser()
    assert parser.feed(b"data: hel", 1.0) == []
    assert parser.pending == b"data: hel"
    assert parser.feed(b"lo\n", 2.0) == []
    assert parser.feed(b"\ndata: x\n\nda", 3.0) == [SseEvent("hello", 3.0), SseEvent("x", 3.0)]
    assert parser.pending == b"da"


def test_crlf_split_between_reads_is_one_line_ending() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\r", 1.0) == []
    assert parser.feed(b"\n\r", 2.0) == [SseEvent("a", 2.0)]  # the blank line's CR completes the event
    assert parser.feed(b"\n", 3.0) == []  # ... and this LF is only its second half
    assert parser.feed(b"data: z\n\n", 4.0) == [SseEvent("z", 4.0)]
    # a CR at the end of a read followed by something else is a line ending of its own
    parser = SseParser()
    assert parser.feed(b"data: b\r", 1.0) == []
    assert parser.feed(b"\rdata: c\n\n", 2.0) == [SseEvent("b", 2.0), SseEvent("c", 2.0)]


def test_comments_are_counted_not_dispatched() -> None:
    parser = SseParser()
    assert parser.feed(b": keep-alive\n\n:\n\ndata: x\n: inside\n\n", 1.0) == [SseEvent("x", 1.0)]
    assert parser.comments == 3


def test_fields_by_the_spec() -> None:
    parser = SseParser()
    stream = (b"event: delta\ndata:no-space\ndata:  two spaces\nid: 7\nretry: 10\n\n"  # one space is dropped
              b"data\n\n"  # a field name alone: empty data, still an event
              b"event: ping\n\n"  # no data: not dispatched
              b"\n\n\n")  # blank lines alone: nothing
    events = parser.feed(stream, 1.0)
    assert events == [SseEvent("no-space\n two spaces", 1.0, "delta"), SseEvent("", 1.0)]


def test_utf8_split_inside_a_character() -> None:
    data = "data: 你好\n\n".encode()
    cut = data.index("好".encode()) + 1
    parser = SseParser()
    assert parser.feed(data[:cut], 1.0) == []
    assert parser.feed(data[cut:], 2.0) == [SseEvent("你好", 2.0)]


def test_an_unterminated_event_stays_pending() -> None:
    parser = SseParser()
    assert parser.feed(b"data: [DONE]\n", 1.0) == []
    assert parser.pending == b"data: [DONE]\n"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_split_gives_the_same_events(data: st.DataObject) -> None:
    stream = data.draw(st.sampled_from([CHAT_STREAM, TGI_STREAM, CHAT_STREAM.replace(b"\n", b"\r\n")]))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=12)))
    parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert [e.data for e in feed_all(SseParser(), parts)] == [e.data for e in SseParser().feed(stream, 0.0)]


# ---- OpenAI chat ----------------------------------------------------------------------------------


def test_chat_stream_one_token_per_read() -> None:
    record = interpret(meta(), reads_at((100.120, CHAT_WRITES[0]), (100.150, CHAT_WRITES[1]),
                                        (100.185, CHAT_WRITES[2]), (100.215, CHAT_WRITES[3])), headers_at=100.002)
    assert record.ok and record.error is None and record.status == 200
    assert record.ttft_s == pytest.approx(0.120)
    assert record.itl_s == pytest.approx((0.030, 0.035, 0.030))
    assert record.e2e_s == pytest.approx(0.215)
    assert record.content_chunks == 4
    assert record.usage_output_tokens == 4 and record.usage_input_tokens == 20
    assert record.tpot_s == pytest.approx((0.215 - 0.120) / 3)
    assert record.api == OPENAI_CHAT and record.start_epoch == EPOCH
    assert record.extra["response_id"] == CHAT_ID
    assert record.extra["finish_reason"] == "length"
    assert record.extra["headers_s"] == pytest.approx(0.002)
    assert record.extra["sent_perf_counter"] == SENT
    assert record.extra["text_events"] == 4
    assert "chunk_events" not in record.extra and "token_mismatch" not in record.extra


def test_a_role_only_first_chunk_does_not_count_for_ttft() -> None:
    role, first = chat_event("", role=True), chat_event(" The")
    record = interpret(meta(), reads_at((100.001, role), (100.300, first), (100.330, CHAT_WRITES[1]),
                                        (100.360, CHAT_WRITES[2]), (100.390, CHAT_WRITES[3])))
    assert record.ttft_s == pytest.approx(0.300)
    assert record.itl_s == pytest.approx((0.030, 0.030, 0.030))
    assert record.content_chunks == 4


def test_several_tokens_in_one_read_count_as_one_chunk() -> None:
    # tokens 2 and 3 came in one read (TCP coalescing, or a speculative-decoding chunk)
    record = interpret(meta(), reads_at((100.100, CHAT_WRITES[0]), (100.170, CHAT_WRITES[1] + CHAT_WRITES[2]),
                                        (100.200, CHAT_WRITES[3])))
    assert record.itl_s == pytest.approx((0.070, 0.030))  # one gap for the chunk, no zero gap
    assert record.content_chunks == 3
    assert record.usage_output_tokens == 4 == record.output_tokens  # usage still counts the tokens
    assert record.extra["chunk_events"] == [1, 2, 1]
    assert record.extra["text_events"] == 4
    assert "token_mismatch" not in record.extra  # 3 chunks can hold 4 tokens


def test_a_whole_answer_in_one_read() -> None:
    record = interpret(meta(), reads_at((100.5, CHAT_STREAM),))
    assert record.ok and record.ttft_s == record.e2e_s == pytest.approx(0.5)
    assert record.itl_s == () and record.content_chunks == 1
    assert record.tpot_s == 0.0  # four tokens, all at once


def test_reasoning_deltas_carry_text() -> None:
    thinking = CHAT_WRITES[0].replace(b'"content":" The"', b'"reasoning_content":"Hmm"')
    later = chat_event("", role=False).replace(b'"content":""', b'"reasoning":"ok"')
    record = interpret(meta(), reads_at((100.2, thinking), (100.25, later), (100.3, CHAT_WRITES[3])))
    assert record.ok and record.ttft_s == pytest.approx(0.2) and record.content_chunks == 3


def test_the_eos_token_in_an_empty_chunk_is_not_text_but_counts_in_usage() -> None:
    writes = [CHAT_WRITES[0], CHAT_WRITES[1], chat_event("", finish="stop") + chat_usage(20, 3) + DONE]
    record = interpret(meta(), reads_at((100.1, writes[0]), (100.2, writes[1]), (100.3, writes[2])))
    assert record.ok and record.e2e_s == pytest.approx(0.2)  # the last text-carrying chunk
    assert record.content_chunks == 2 and record.usage_output_tokens == 3
    assert record.extra["finish_reason"] == "stop"
    assert "token_mismatch" not in record.extra


@pytest.mark.parametrize("usage", [1, 200])
def test_usage_that_the_chunks_cannot_hold_is_flagged(usage: int) -> None:
    # 4 text events of 4-9 bytes: at least 4 tokens, at most 30 (one per byte)
    writes = [*CHAT_WRITES[:3], chat_event(" requests", finish="length") + chat_usage(20, usage) + DONE]
    record = interpret(meta(), [(100.1 + i / 10, w) for i, w in enumerate(writes)])
    assert record.ok  # the timing stands; the count is suspect
    assert record.extra["token_mismatch"] == {"usage_output_tokens": usage, "text_events": 4, "chunks": 4,
                                              "min_tokens": 4, "max_tokens": len(" The gateway routes requests")}


def test_a_stream_without_done_failed() -> None:
    record = interpret(meta(), reads_at((100.1, CHAT_WRITES[0]), (100.2, CHAT_WRITES[1])))
    assert not record.ok and record.error == "stream ended without data: [DONE]"
    assert record.ttft_s == pytest.approx(0.1) and record.content_chunks == 2  # what did arrive is kept


def test_a_stream_without_text_failed() -> None:
    stream = chat_event("", role=True) + chat_event("", finish="stop") + chat_usage(9, 1) + DONE
    record = interpret(meta(), reads_at((100.1, stream),))
    assert record.error == "no text in the stream" and not record.ok
    assert record.ttft_s is None and record.e2e_s is None and record.content_chunks == 0


def test_an_error_event_fails_the_request() -> None:
    error = b'data: {"error":{"message":"Request aborted by the engine","type":"BadRequestError","param":null,' \
            b'"code":400}}\n\n'
    record = interpret(meta(), reads_at((100.1, CHAT_WRITES[0]), (100.2, error + DONE)))
    assert record.error == "error event: Request aborted by the engine"
    old_shape = b'data: {"object":"error","message":"boom","type":"InternalServerError","code":500}\n\n'
    assert interpret(meta(), reads_at((100.1, old_shape + DONE),)).error == "error event: boom"


def test_a_malformed_event_fails_the_request() -> None:
    record = interpret(meta(), reads_at((100.1, CHAT_WRITES[0] + b"data: {not json\n\n"), (100.2, CHAT_WRITES[3])))
    assert record.error == "malformed event: '{not json'"


def test_a_transport_error_wins_over_what_the_stream_says() -> None:
    record = interpret(meta(), reads_at((100.1, CHAT_WRITES[0]),), transport_error="connection failed: reset")
    assert record.error == "connection failed: reset" and record.ttft_s == pytest.approx(0.1)


def test_comment_pings_are_kept_out_of_the_timing() -> None:
    record = interpret(meta(), reads_at((100.05, b": ping\n\n"), (100.1, CHAT_WRITES[0]), (100.15, b": ping\n\n"),
                                        (100.2, b"".join(CHAT_WRITES[1:]))))
    assert record.ok and record.ttft_s == pytest.approx(0.1) and record.itl_s == pytest.approx((0.1,))
    assert record.extra["comments"] == 2


def test_meta_fields_reach_the_record() -> None:
    m = meta(step="concurrency=8", intended_epoch=EPOCH - 0.01, expected_input_tokens=20, expected_output_tokens=4,
             worker="w1")
    record = interpret(m, reads_at((100.1, CHAT_STREAM),))
    assert (record.step, record.intended_epoch, record.expected_input_tokens, record.expected_output_tokens,
            record.worker) == ("concurrency=8", EPOCH - 0.01, 20, 4, "w1")
    assert record.dispatch_lag_s == pytest.approx(0.01)


def test_records_survive_the_trip_to_the_master() -> None:
    record = interpret(meta(), reads_at((100.1, CHAT_WRITES[0]), (100.2, CHAT_WRITES[1] + CHAT_WRITES[2]),
                                        (100.3, CHAT_WRITES[3])))
    wire = json.loads(json.dumps(record.to_dict()))
    assert RequestRecord.from_dict(wire) == record


# ---- every way the sample stream can be cut into reads ---------------------------------------------


def _event_ends(stream: bytes) -> list[int]:
    """Offsets just past each event's terminating blank line (LF framing)."""
    ends, at = [], 0
    while (found := stream.find(b"\n\n", at)) >= 0:
        ends.append(found + 2)
        at = found + 2
    return ends


def _expected(arrivals: list[float]) -> tuple[float, tuple[float, ...], float, int]:
    """TTFT, ITLs, E2E and chunks from the text events' arrival times, restated from the definitions."""
    chunks = sorted(set(arrivals))
    gaps = tuple(b - a for a, b in itertools.pairwise(chunks))
    return chunks[0] - SENT, gaps, chunks[-1] - SENT, len(chunks)


def _check_cut(cuts: list[int]) -> None:
    stream = CHAT_STREAM
    bounds = [0, *cuts, len(stream)]
    times = [101.0 + i * 0.01 for i in range(len(bounds) - 1)]
    reads = [(t, stream[a:b]) for t, a, b in zip(times, bounds, bounds[1:], strict=False)]
    record = interpret(meta(), reads)
    ends = _event_ends(stream)

    def arrival(event: int) -> float:
        return next(t for t, b in zip(times, bounds[1:], strict=True) if ends[event] <= b)

    ttft, gaps, e2e, chunks = _expected([arrival(i) for i in CHAT_TEXT_EVENTS])
    assert record.ok, (cuts, record.error)
    assert record.ttft_s == pytest.approx(ttft, abs=1e-9)
    assert record.itl_s == pytest.approx(gaps, abs=1e-9)
    assert record.e2e_s == pytest.approx(e2e, abs=1e-9)
    assert record.content_chunks == chunks
    assert record.usage_output_tokens == 4 and record.extra["text_events"] == 4
    assert record.extra["response_id"] == CHAT_ID and "token_mismatch" not in record.extra


def test_a_cut_at_every_byte_position() -> None:
    for cut in range(1, len(CHAT_STREAM)):
        _check_cut([cut])


def test_a_read_per_byte() -> None:
    _check_cut(list(range(1, len(CHAT_STREAM))))


@settings(max_examples=400, deadline=None)
@given(st.sets(st.integers(1, len(CHAT_STREAM) - 1), max_size=20))
def test_any_cuts(cuts: set[int]) -> None:
    _check_cut(sorted(cuts))


# ---- OpenAI completions ---------------------------------------------------------------------------


def test_completions_stream() -> None:
    usage = (b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[],'
             b'"usage":{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3}}\n\n')
    record = interpret(meta(OPENAI_COMPLETIONS), reads_at(
        (100.2, completion_event(" one")), (100.25, completion_event("")),  # an empty text is not text
        (100.3, completion_event(" two")), (100.4, completion_event(" three", finish="length") + usage + DONE)))
    assert record.ok and record.api == OPENAI_COMPLETIONS
    assert record.ttft_s == pytest.approx(0.2) and record.itl_s == pytest.approx((0.1, 0.1))
    assert record.content_chunks == 3 and record.usage_output_tokens == 3 and record.usage_input_tokens == 5
    assert record.extra["response_id"] == "cmpl-1"


def test_completions_without_usage_fall_back_to_chunks() -> None:
    record = interpret(meta(OPENAI_COMPLETIONS), reads_at((100.2, completion_event(" one")),
                                                         (100.3, completion_event(" two") + DONE)))
    assert record.ok and record.usage_output_tokens is None and record.output_tokens == 2


# ---- TGI -------------------------------------------------------------------------------------------


def test_tgi_stream() -> None:
    writes = [tgi_event(1, "Hello"), tgi_event(2, " world"), tgi_event(3, "<|im_end|>", special=True, final=3)]
    record = interpret(meta(TGI), reads_at((100.1, writes[0]), (100.14, writes[1]), (100.18, writes[2])))
    assert record.ok and record.api == TGI
    assert record.ttft_s == pytest.approx(0.1) and record.itl_s == pytest.approx((0.04,))
    assert record.e2e_s == pytest.approx(0.14)  # the special EOS token is not text
    assert record.content_chunks == 2 and record.usage_output_tokens == 3 and record.usage_input_tokens == 9
    assert record.extra["finish_reason"] == "eos_token" and "token_mismatch" not in record.extra


def test_tgi_counts_one_token_per_event() -> None:
    wrong = tgi_event(1, "Hello") + tgi_event(2, " world", final=5)
    record = interpret(meta(TGI), reads_at((100.1, wrong),))
    assert record.extra["token_mismatch"]["min_tokens"] == record.extra["token_mismatch"]["max_tokens"] == 2


def test_tgi_without_the_final_event_failed() -> None:
    record = interpret(meta(TGI), reads_at((100.1, tgi_event(1, "Hello")), (100.2, tgi_event(2, " world"))))
    assert record.error == "stream ended without TGI's final event (generated_text)"


def test_tgi_error_event() -> None:
    error = b'data:{"error":"Request failed during generation: aborted","error_type":"generation"}\n\n'
    record = interpret(meta(TGI), reads_at((100.1, tgi_event(1, "Hello") + error),))
    assert record.error == "error event: Request failed during generation: aborted"


def test_tgi_split_at_every_byte() -> None:
    for cut in range(1, len(TGI_STREAM)):
        record = interpret(meta(TGI), [(101.0, TGI_STREAM[:cut]), (102.0, TGI_STREAM[cut:])])
        first_end = _event_ends(TGI_STREAM)[0]
        second_end = _event_ends(TGI_STREAM)[1]
        assert record.ok
        assert record.ttft_s == pytest.approx(1.0 if cut >= first_end else 2.0)
        assert record.e2e_s == pytest.approx(1.0 if cut >= second_end else 2.0)
        assert record.content_chunks == (2 if first_end <= cut < second_end else 1)


# ---- the chunk clock and the incremental interface ---------------------------------------------


def test_chunk_clock_groups_by_read_time() -> None:
    clock = ChunkClock()
    for t, text in [(1.0, "a"), (1.0, "b"), (1.5, "c"), (2.5, "dé")]:
        clock.text(t, text)
    assert clock.timing(0.5) == {"ttft_s": 0.5, "itl_s": (0.5, 1.0), "e2e_s": 2.0, "content_chunks": 3}
    assert clock.text_events == 4 and clock.text_bytes == 6 and clock.coalesced() == [2, 1, 1]


def test_interpreter_is_incremental() -> None:
    interpreter = interpreter_for(meta(), headers_at=100.001)
    for i, write in enumerate(CHAT_WRITES):
        interpreter.feed(write, 100.1 + i * 0.02)
    assert interpreter.record() == interpret(meta(), [(100.1 + i * 0.02, w) for i, w in enumerate(CHAT_WRITES)],
                                             headers_at=100.001)
    assert interpreter.parser.bytes_read == len(CHAT_STREAM) and interpreter.events == 7  # role, 4 tokens, usage, DONE


def test_unknown_api() -> None:
    with pytest.raises(ValueError, match="unknown API 'grpc'"):
        interpreter_for(meta("grpc"))


# ---- failures without a stream -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (400, b'{"error":{"message":"max_tokens must be at least 1, got -1.","type":"BadRequestError","param":null,'
              b'"code":400}}', "HTTP 400: max_tokens must be at least 1, got -1."),
        (401, b'{"error": "Unauthorized"}', "HTTP 401: Unauthorized"),
        (429, b'{"error":"Model is overloaded","error_type":"overloaded"}', "HTTP 429: Model is overloaded"),
        (503, b'{"message":"no upstream"}', "HTTP 503: no upstream"),
        (502, b"<html>502 Bad Gateway</html>\n", "HTTP 502: <html>502 Bad Gateway</html>"),
        (500, b"", "HTTP 500"),
        (422, b'{"detail":"bad"}', "HTTP 422: bad"),
    ],
)
def test_http_errors_keep_the_servers_message(status: int, body: bytes, message: str) -> None:
    assert http_error_message(status, body) == message


def test_error_text_is_bounded() -> None:
    assert len(error_text({"error": "x" * 5000})) == 300
    assert error_text([1, 2]) == "[1, 2]"


def test_failed_record() -> None:
    record = failed_record(meta(worker="w"), "HTTP 429: slow down", 429, headers_at=100.003)
    assert not record.ok and record.status == 429 and record.error == "HTTP 429: slow down"
    assert record.ttft_s is None and record.itl_s == () and record.worker == "w"
    assert record.extra == {"sent_perf_counter": SENT, "headers_s": pytest.approx(0.003)}
    unanswered = failed_record(meta(), "connection failed: [Errno 111] Connection refused")
    assert unanswered.status is None and not unanswered.ok


# ---- calibration: records against the simulator's token log ----------------------------------------


def _logged(written: list[float], finish: str = "length", request_id: str = CHAT_ID) -> dict[str, object]:
    return {request_id: {"id": request_id, "route": "/v1/chat/completions", "prompt_tokens": 20,
                         "finish_reason": finish, "scheduled": written, "written": written}}


def test_calibration_measures_the_delay_behind_each_write() -> None:
    record = interpret(meta(), reads_at((100.1005, CHAT_WRITES[0]), (100.1302, CHAT_WRITES[1]),
                                        (100.1601, CHAT_WRITES[2]), (100.1900, CHAT_WRITES[3])))
    errors = compare([record], _logged([100.1000, 100.1300, 100.1600, 100.1900]))
    assert errors.matched == 1 and errors.unmatched == errors.inconsistent == 0
    assert errors.ttft_ms == pytest.approx([0.5])
    assert errors.itl_ms == pytest.approx([-0.3, -0.1, -0.1])
    assert errors.lag_ms == pytest.approx([0.5, 0.2, 0.1, 0.0])
    summary = errors.summary()
    assert summary["ttft_ms"]["p99_abs"] == pytest.approx(0.5) and summary["itl_ms"]["max_abs"] == pytest.approx(0.3)


def test_calibration_counts_coalescing_as_error_of_the_later_token() -> None:
    # tokens 2 and 3 were written 30 ms apart but read together: the chunk is 30 ms late for token 2's gap
    record = interpret(meta(), reads_at((100.100, CHAT_WRITES[0]), (100.160, CHAT_WRITES[1] + CHAT_WRITES[2]),
                                        (100.190, CHAT_WRITES[3])))
    errors = compare([record], _logged([100.100, 100.130, 100.160, 100.190]))
    assert errors.coalesced_chunks == 1
    assert errors.itl_ms == pytest.approx([30.0, -30.0])


def test_calibration_drops_the_eos_of_a_stopped_answer_and_skips_what_it_cannot_match() -> None:
    writes = [CHAT_WRITES[0], chat_event("", finish="stop") + chat_usage(20, 2) + DONE]
    record = interpret(meta(), reads_at((100.1, writes[0]), (100.2, writes[1])))
    errors = compare([record], _logged([100.1, 100.2], finish="stop"))
    assert errors.matched == 1 and errors.ttft_ms == pytest.approx([0.0]) and errors.itl_ms == []
    assert compare([record], _logged([100.1, 100.2], finish="length")).inconsistent == 1  # 2 logged, 1 text event
    assert compare([record], _logged([100.1], request_id="other")).unmatched == 1
    failed = interpret(meta(), reads_at((100.1, CHAT_WRITES[0]),))
    assert compare([failed], _logged([100.1])).matched == 0  # failures are not compared


def test_percentile_interpolates() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_calibration_leaves_out_what_a_stolen_moment_touched() -> None:
    record = interpret(meta(), reads_at((100.1005, CHAT_WRITES[0]), (100.1302, CHAT_WRITES[1]),
                                        (100.1650, CHAT_WRITES[2]), (100.1900, CHAT_WRITES[3])))
    log = _logged([100.1000, 100.1300, 100.1600, 100.1900])
    errors = compare([record], log, exclude=[(100.15, 100.17)])  # the third token's write and arrival
    assert errors.excluded == 2  # the gaps into and out of the third chunk
    assert errors.itl_ms == pytest.approx([-0.3]) and errors.ttft_ms == pytest.approx([0.5])
    assert errors.lag_ms == pytest.approx([0.5, 0.2, 0.0])
    everything = compare([record], log, exclude=[(100.0, 100.125), (100.12, 101.0)])  # overlapping windows merge
    assert everything.excluded == 4 and everything.ttft_ms == everything.itl_ms == []


def test_pooled_errors_are_one_sample_of_both_runs() -> None:
    record = interpret(meta(), reads_at((100.1005, CHAT_WRITES[0]), (100.1302, CHAT_WRITES[1]),
                                        (100.1650, CHAT_WRITES[2]), (100.1900, CHAT_WRITES[3])))
    log = _logged([100.1000, 100.1300, 100.1600, 100.1900])
    quiet, stolen = compare([record], log), compare([record], log, exclude=[(100.15, 100.17)])
    pooled = quiet.pooled(stolen)
    assert pooled.matched == 2 and pooled.excluded == 2
    assert pooled.ttft_ms == pytest.approx([0.5, 0.5]) and pooled.itl_ms == pytest.approx([-0.3, 4.8, -5.0, -0.3])
    assert pooled.summary()["itl_ms"]["n"] == 4 and quiet.itl_ms == pytest.approx([-0.3, 4.8, -5.0])  # inputs kept


def test_steal_watch_marks_the_intervals_in_which_steal_moved(tmp_path: Path) -> None:
    stat = tmp_path / "stat"

    def write(steal0: int, steal1: int) -> None:
        stat.write_text(f"cpu  1 2 3 4 5 6 7 {steal0 + steal1} 0 0\n"
                        f"cpu0 1 0 1 100 0 0 0 {steal0} 0 0\ncpu1 1 0 1 100 0 0 0 {steal1} 0 0\n")

    write(5, 7)
    assert steal_ticks([0, 1], stat) == {0: 5, 1: 7}
    assert steal_ticks([1], stat) == {1: 7}
    now = [100.0]
    watch = StealWatch([1], interval_s=0.1, margin_s=0.02, stat=stat, clock=lambda: now[0])
    for at, steal0, steal1 in [(100.0, 5, 7), (100.1, 50, 7), (100.2, 50, 7), (100.3, 50, 9), (100.4, 50, 9)]:
        now[0] = at
        write(steal0, steal1)
        watch.sample()
    # another CPU's steal does not count; cpu1's two ticks moved between 100.2 and 100.3
    assert watch.samples == 4 and watch.stolen_ticks == 2
    assert watch.windows == [pytest.approx((100.2 - 0.1 - 0.02, 100.3 + 0.02))]
    assert watch.disturbed_share == 0.25


def test_steal_watch_samples_in_a_thread(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu0 1 0 1 100 0 0 0 3 0 0\n")
    with StealWatch([0], interval_s=0.005, stat=stat) as watch:
        time.sleep(0.05)
    assert watch.samples >= 2 and watch.windows == []
