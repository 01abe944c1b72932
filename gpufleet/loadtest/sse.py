"""Streamed LLM answers turned into RequestRecords: an incremental SSE parser and one interpreter per API.

The load-test user's hot path only reads the socket, takes `time.perf_counter()` the moment a read
returns and hands the bytes and that time to `StreamInterpreter.feed`; everything here runs after
the stamp, so parsing cost can delay the *next* read's stamp but never falsify this one.

An event's arrival time is the time of the read that completed it (its terminating blank line):
an event split over several reads became usable only with the last one, and several events that
came in one read share that read's time. A "chunk" in the record's sense is one read that carried
generated text: the events of one read count once (one ITL gap per chunk, as the record's
docstring defines), while the server's usage count still gives the tokens.

Pure code (no Locust, no sockets), so every case is unit-tested with byte-exact fixtures.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gpufleet.loadtest.record import RequestRecord

OPENAI_CHAT = "openai-chat"
OPENAI_COMPLETIONS = "openai-completions"
TGI = "tgi"
APIS = (OPENAI_CHAT, OPENAI_COMPLETIONS, TGI)

ERROR_TEXT_LIMIT = 300  # characters of a server's error message kept in a record


# ---- SSE framing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched SSE event: its data (data lines joined by newlines) and when its read returned."""

    data: str
    arrived: float
    event: str = ""  # the `event:` field; "" for the default "message" type


class SseParser:
    """The W3C EventSource framing, incrementally, over raw bytes as they were read.

    Lines end with CRLF, LF or CR (a CR ending a read ends its line at once, and an LF opening the
    next read is taken as its second half); a blank line dispatches the event; `:` lines are
    comments (keep-alive pings); `data:` values lose one leading space and accumulate across
    lines; an event without data is not dispatched. What is left when the stream ends is an
    incomplete event (`pending`), which the spec says to discard.
    """

    __slots__ = ("_buf", "_skip_lf", "bytes_read", "comments")

    def __init__(self) -> None:
        self._buf = b""  # the unterminated event so far, newlines already normalised to LF
        self._skip_lf = False  # the last read ended with CR: an LF opening the next one belongs to it
        self.bytes_read = 0
        self.comments = 0

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated by a blank line (newlines as LF)."""
        return self._buf

    def feed(self, chunk: bytes, arrived: float) -> list[SseEvent]:
        """The events this read completed, each stamped with `arrived` (the read's time)."""
        self.bytes_read += len(chunk)
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        blocks = buf.split(b"\n\n")
        self._buf = blocks.pop()
        events: list[SseEvent] = []
        for block in blocks:
            event = self._event(block, arrived)
            if event is not None:
                events.append(event)
        return events

    def _event(self, block: bytes, arrived: float) -> SseEvent | None:
        if block.startswith(b"data:") and b"\n" not in block:  # the usual case: one data line
            value = block[5:]
            return SseEvent(_decode(value[1:] if value[:1] == b" " else value), arrived)
        data: list[bytes] = []
        kind = b""
        for line in block.split(b"\n"):
            if not line:
                continue
            if line[:1] == b":":
                self.comments += 1
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                kind = value
        if not data:
            return None
        return SseEvent(_decode(b"\n".join(data)), arrived, _decode(kind))


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


# ---- what a request was ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestMeta:
    """What the user knew when it sent the request; copied into the record."""

    api: str
    sent: float  # time.perf_counter() right before the request was sent
    start_epoch: float  # time.time() at the same moment
    step: str = ""
    intended_epoch: float | None = None
    expected_input_tokens: int | None = None
    expected_output_tokens: int | None = None
    worker: str = ""

    def record(self, **fields: Any) -> RequestRecord:
        return RequestRecord(
            start_epoch=self.start_epoch, api=self.api, step=self.step, intended_epoch=self.intended_epoch,
            expected_input_tokens=self.expected_input_tokens, expected_output_tokens=self.expected_output_tokens,
            worker=self.worker, **fields,
        )


# ---- text-carrying chunks -------------------------------------------------------------------------


class ChunkClock:
    """Arrival times of text-carrying events, grouped by read: TTFT, ITL and E2E exactly as defined.

    Events that arrived in the same read (equal arrival times) form one chunk: the first of them
    opens it and the others only add to its event count, so coalesced events give one gap, not a
    run of zero gaps.
    """

    __slots__ = ("events_per_chunk", "first", "gaps", "last", "text_bytes", "text_events")

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.gaps: list[float] = []
        self.events_per_chunk: list[int] = []
        self.text_events = 0
        self.text_bytes = 0

    def text(self, arrived: float, text: str) -> None:
        self.text_events += 1
        self.text_bytes += len(text.encode("utf-8"))
        last = self.last
        if last is not None and arrived == last:
            self.events_per_chunk[-1] += 1
            return
        if last is None:
            self.first = arrived
        else:
            self.gaps.append(arrived - last)
        self.last = arrived
        self.events_per_chunk.append(1)

    @property
    def chunks(self) -> int:
        return len(self.events_per_chunk)

    def timing(self, sent: float) -> dict[str, Any]:
        """The record's timing fields, relative to `sent`."""
        if self.first is None or self.last is None:
            return {"ttft_s": None, "itl_s": (), "e2e_s": None, "content_chunks": 0}
        return {"ttft_s": self.first - sent, "itl_s": tuple(self.gaps), "e2e_s": self.last - sent,
                "content_chunks": self.chunks}

    def coalesced(self) -> list[int] | None:
        """Events per chunk when any chunk held more than one text event (else None: one each)."""
        return list(self.events_per_chunk) if self.text_events != self.chunks else None


# ---- the interpreters ----------------------------------------------------------------------------


class StreamInterpreter:
    """One streamed answer, fed read by read; `record()` gives its RequestRecord.

    Subclasses say what an event means for their API (`_on_event`); this class does the framing,
    the chunk clock, error precedence and the usage cross-check. Errors, first one wins within
    each kind: a transport failure (given to `record`), an error event from the server, a
    malformed event, a stream that ended before the API's final event, a stream without text.
    """

    end_marker = "the final event"  # what a complete stream ends with, for the error message

    def __init__(self, meta: RequestMeta, status: int = 200, headers_at: float | None = None) -> None:
        self.meta = meta
        self.status = status
        self.headers_at = headers_at  # perf_counter when the response headers had arrived
        self.parser = SseParser()
        self.clock = ChunkClock()
        self.complete = False
        self.server_error: str | None = None
        self.malformed: str | None = None
        self.response_id: str | None = None
        self.finish_reason: str | None = None
        self.usage_output_tokens: int | None = None
        self.usage_input_tokens: int | None = None
        self.events = 0

    def feed(self, chunk: bytes, arrived: float) -> None:
        """Bytes of one read and the perf_counter() taken when that read returned."""
        for event in self.parser.feed(chunk, arrived):
            self.events += 1
            self._on_event(event)

    def _on_event(self, event: SseEvent) -> None:
        raise NotImplementedError

    def _json(self, event: SseEvent) -> dict[str, Any] | None:
        try:
            obj = json.loads(event.data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            if self.malformed is None:
                self.malformed = f"malformed event: {event.data[:80]!r}"
            return None
        if obj.get("error") is not None or obj.get("object") == "error":  # vLLM's newer and older shapes
            if self.server_error is None:
                self.server_error = f"error event: {error_text(obj)}"
            return None
        return obj

    def _token_bounds(self) -> tuple[int, int]:
        """The fewest and the most output tokens the text events received could stand for."""
        raise NotImplementedError

    def error(self, transport_error: str | None = None) -> str | None:
        if transport_error is not None:
            return transport_error
        if self.server_error is not None:
            return self.server_error
        if self.malformed is not None:
            return self.malformed
        if not self.complete:
            return f"stream ended without {self.end_marker}"
        if self.clock.first is None:
            return "no text in the stream"
        return None

    def record(self, transport_error: str | None = None) -> RequestRecord:
        """The request's record; `transport_error` when the connection failed or timed out mid-stream."""
        extra: dict[str, Any] = {"sent_perf_counter": self.meta.sent, "text_events": self.clock.text_events}
        if self.headers_at is not None:
            extra["headers_s"] = self.headers_at - self.meta.sent
        if self.response_id is not None:
            extra["response_id"] = self.response_id
        if self.finish_reason is not None:
            extra["finish_reason"] = self.finish_reason
        coalesced = self.clock.coalesced()
        if coalesced is not None:
            extra["chunk_events"] = coalesced
        if self.parser.comments:
            extra["comments"] = self.parser.comments
        mismatch = self._mismatch()
        if mismatch is not None:
            extra["token_mismatch"] = mismatch
        return self.meta.record(
            **self.clock.timing(self.meta.sent),
            usage_output_tokens=self.usage_output_tokens,
            usage_input_tokens=self.usage_input_tokens,
            status=self.status,
            error=self.error(transport_error),
            extra=extra,
        )

    def _mismatch(self) -> dict[str, int] | None:
        usage = self.usage_output_tokens
        if usage is None or self.clock.text_events == 0:
            return None
        low, high = self._token_bounds()
        if low <= usage <= high:
            return None
        return {"usage_output_tokens": usage, "text_events": self.clock.text_events, "chunks": self.clock.chunks,
                "min_tokens": low, "max_tokens": high}


class OpenAIInterpreter(StreamInterpreter):
    """vLLM's (and OpenAI's) chat and completions streams.

    Text is `choices[0].delta.content` (or the reasoning fields) for chat, `choices[0].text` for
    completions; an empty string (chat's role-only first chunk, the EOS token's chunk) is not
    text. The usage chunk (`choices: []`, `usage`) gives the token counts; `data: [DONE]` ends a
    complete stream.
    """

    end_marker = "data: [DONE]"

    def __init__(self, meta: RequestMeta, status: int = 200, headers_at: float | None = None) -> None:
        super().__init__(meta, status, headers_at)
        self.chat = meta.api == OPENAI_CHAT
        self.silent_finish = 0  # events that ended the answer without text (the EOS token's)

    def _on_event(self, event: SseEvent) -> None:
        if event.data == "[DONE]":
            self.complete = True
            return
        obj = self._json(event)
        if obj is None:
            return
        if self.response_id is None and isinstance(obj.get("id"), str):
            self.response_id = obj["id"]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage_output_tokens = _count(usage.get("completion_tokens"))
            self.usage_input_tokens = _count(usage.get("prompt_tokens"))
        choices = obj.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        text = self._text(choice)
        if text:
            self.clock.text(event.arrived, text)
        reason = choice.get("finish_reason")
        if reason:
            self.finish_reason = str(reason)
            if not text:
                self.silent_finish += 1

    def _text(self, choice: dict[str, Any]) -> str:
        if not self.chat:
            text = choice.get("text")
            return text if isinstance(text, str) else ""
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return ""
        for key in ("content", "reasoning_content", "reasoning"):
            text = delta.get(key)
            if text and isinstance(text, str):
                return text
        return ""

    def _token_bounds(self) -> tuple[int, int]:
        # every text event holds at least one token; every token yields at least one byte of text,
        # except the EOS token that may end the answer in an event of its own
        return self.clock.text_events, self.clock.text_bytes + self.silent_finish


class TgiInterpreter(StreamInterpreter):
    """TGI's /generate_stream: one token per `data:` event (`token.text`, `token.special`).

    Special tokens (the EOS) and tokens with empty text are not text; the last event carries
    `generated_text` (and `details.generated_tokens` when `details` was asked for) and ends a
    complete stream.
    """

    end_marker = "TGI's final event (generated_text)"

    def __init__(self, meta: RequestMeta, status: int = 200, headers_at: float | None = None) -> None:
        super().__init__(meta, status, headers_at)
        self.token_events = 0

    def _on_event(self, event: SseEvent) -> None:
        obj = self._json(event)
        if obj is None:
            return
        token = obj.get("token")
        if isinstance(token, dict):
            self.token_events += 1
            text = token.get("text")
            if text and isinstance(text, str) and not token.get("special"):
                self.clock.text(event.arrived, text)
        details = obj.get("details")
        if isinstance(details, dict):
            self.usage_output_tokens = _count(details.get("generated_tokens"))
            self.usage_input_tokens = _count(details.get("input_length"))
            if details.get("finish_reason"):
                self.finish_reason = str(details["finish_reason"])
        if obj.get("generated_text") is not None or isinstance(details, dict):
            self.complete = True

    def _token_bounds(self) -> tuple[int, int]:
        return self.token_events, self.token_events  # TGI streams exactly one token per event


_INTERPRETERS: dict[str, type[StreamInterpreter]] = {
    OPENAI_CHAT: OpenAIInterpreter,
    OPENAI_COMPLETIONS: OpenAIInterpreter,
    TGI: TgiInterpreter,
}


def interpreter_for(meta: RequestMeta, status: int = 200, headers_at: float | None = None) -> StreamInterpreter:
    """The interpreter of `meta.api`'s streams (ValueError for an API it does not know)."""
    try:
        cls = _INTERPRETERS[meta.api]
    except KeyError:
        raise ValueError(f"unknown API {meta.api!r}: expected one of {', '.join(APIS)}") from None
    return cls(meta, status, headers_at)


def interpret(meta: RequestMeta, reads: Iterable[tuple[float, bytes]], *, headers_at: float | None = None,
              transport_error: str | None = None) -> RequestRecord:
    """The record of a 200 stream given as (arrival time, bytes) reads, in order."""
    interpreter = interpreter_for(meta, 200, headers_at)
    for arrived, chunk in reads:
        interpreter.feed(chunk, arrived)
    return interpreter.record(transport_error)


# ---- failures without a stream ----------------------------------------------------------------


def error_text(obj: Any) -> str:
    """The message of an error body: OpenAI/vLLM `{"error": {"message"}}`, TGI `{"error": "..."}`, ..."""
    if isinstance(obj, dict):
        error = obj.get("error")
        if isinstance(error, dict):
            message = error.get("message") or error.get("type")
            if message:
                return str(message)[:ERROR_TEXT_LIMIT]
        elif error:
            return str(error)[:ERROR_TEXT_LIMIT]
        for key in ("message", "detail"):
            if obj.get(key):
                return str(obj[key])[:ERROR_TEXT_LIMIT]
    return json.dumps(obj)[:ERROR_TEXT_LIMIT]


def http_error_message(status: int, body: bytes) -> str:
    """`HTTP 429: <the body's error message>` (the raw body, shortened, when it is not JSON)."""
    try:
        text = error_text(json.loads(body))
    except ValueError:
        text = body.decode("utf-8", errors="replace").strip()[:ERROR_TEXT_LIMIT]
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def failed_record(meta: RequestMeta, error: str, status: int | None = None,
                  headers_at: float | None = None) -> RequestRecord:
    """The record of a request that got no stream: a non-200 answer (`status`) or no answer at all."""
    extra: dict[str, Any] = {"sent_perf_counter": meta.sent}
    if headers_at is not None:
        extra["headers_s"] = headers_at - meta.sent
    return meta.record(status=status, error=error, extra=extra)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
