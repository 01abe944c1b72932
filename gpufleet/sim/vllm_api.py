"""vLLM's OpenAI-compatible HTTP surface, on aiohttp, with vLLM's exact SSE framing and error shapes.

Targets vLLM V1 0.10/0.11: errors use the newer `{"error": {"message", "type", "param", "code"}}`
shape; `--api-key` protects paths under /v1 only (401 `{"error": "Unauthorized"}`); /health and
/metrics are open. Streams are `data: <json>\\n\\n` events: chat's first event carries
`delta: {"role": "assistant", "content": ""}`, every token is one event, the last one carries the
finish reason, `stream_options.include_usage` adds `"usage": null` to every chunk and a final
chunk with `choices: []` and the usage, then `data: [DONE]`.

Streaming is the hot path (the target: 512 streams, 10,000+ tokens/s on one core, each token
written within a millisecond of its schedule), so chunks are built from per-request byte templates
(the JSON around the token text is serialised once per request, a token's text once per distinct
text) and written straight onto the socket (`SseWriter`).

The simulator answers n=1 only; batch prompts, logprobs, echo and beam search are refused with a
400 that says so, rather than answered with something that only looks right.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gpufleet import __version__
from gpufleet.sim import tokenizer
from gpufleet.sim.types import FinishReason, GenerationParams, RequestTiming, TokenEvent

if TYPE_CHECKING:
    from gpufleet.sim.faults import TokenRecord
    from gpufleet.sim.server import SimState

JSON = dict[str, Any]
SSE_DONE = b"[DONE]\n\n"
ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."
INJECTED_ERROR_MESSAGE = "Engine generation failed (simulated fault: gpufleet-sim --error-rate)"


class RequestError(Exception):
    """A request vLLM would refuse: the message, vLLM's error type and the HTTP status."""

    def __init__(self, message: str, err_type: str = "BadRequestError", status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.err_type = err_type
        self.status = status


def error_body(message: str, err_type: str, status: int) -> JSON:
    """vLLM's (>= 0.10.2) error shape; `param` is always null, as vLLM of that era sends it."""
    return {"error": {"message": message, "type": err_type, "param": None, "code": status}}


def json_dumps(value: Any) -> str:
    """Compact JSON, as FastAPI's JSONResponse writes it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=json_dumps)


def error_response(exc: RequestError) -> web.Response:
    return json_response(error_body(exc.message, exc.err_type, exc.status), status=exc.status)


# JSON string literals of token texts; the engine's vocabulary is small, so this stays small
_ESCAPED: dict[str, bytes] = {}
_ESCAPED_LIMIT = 50_000


def escaped(text: str) -> bytes:
    """`text` as a JSON string literal, UTF-8 (cached per distinct text)."""
    out = _ESCAPED.get(text)
    if out is None:
        out = json.dumps(text, ensure_ascii=False).encode("utf-8")
        if len(_ESCAPED) < _ESCAPED_LIMIT:
            _ESCAPED[text] = out
    return out


def is_token(event: TokenEvent) -> bool:
    """False only for the engine's abort notice, which carries no token (token_id -1)."""
    return event.token_id >= 0


# ---- request parsing ------------------------------------------------------------------------------


def _int_field(body: JSON, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise RequestError(f"{name}: Input should be a valid integer, got {value!r}")
    return value


def _number_field(body: JSON, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{name}: Input should be a valid number, got {value!r}")
    return float(value)


def _check_sampling(body: JSON) -> None:
    """The SamplingParams checks vLLM makes on the parameters it would use."""
    temperature = _number_field(body, "temperature")
    if temperature is not None and temperature < 0:
        raise RequestError(f"temperature must be non-negative, got {temperature}.")
    top_p = _number_field(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}.")
    n = _int_field(body, "n")
    if n is not None and n < 1:
        raise RequestError(f"n must be at least 1, got {n}.")
    if n is not None and n > 1:
        raise RequestError("the gpufleet simulator answers n=1 only")
    best_of = _int_field(body, "best_of")
    if best_of is not None and best_of > 1:
        raise RequestError("the gpufleet simulator does not implement best_of")
    if body.get("use_beam_search"):
        raise RequestError("the gpufleet simulator does not implement beam search")
    logprobs = body.get("logprobs")
    if logprobs not in (None, False) or body.get("top_logprobs") or body.get("prompt_logprobs"):
        raise RequestError("the gpufleet simulator does not produce logprobs")
    if body.get("echo"):
        raise RequestError("the gpufleet simulator does not implement echo")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"stream: Input should be a valid boolean, got {stream!r}")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise RequestError("Stream options can only be defined when `stream=True`.")
        if not isinstance(options, dict):
            raise RequestError("stream_options: Input should be a valid dictionary")


class Prepared:
    """A validated generation request: its token counts, limits and streaming options."""

    __slots__ = ("ignore_eos", "include_usage", "max_tokens", "min_tokens", "model", "prompt_tokens", "stream")

    def __init__(self, model: str, prompt_tokens: int, max_tokens: int, min_tokens: int, ignore_eos: bool,
                 stream: bool, include_usage: bool) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.ignore_eos = ignore_eos
        self.stream = stream
        self.include_usage = include_usage

    def params(self) -> GenerationParams:
        return GenerationParams(prompt_tokens=self.prompt_tokens, max_tokens=self.max_tokens,
                                min_tokens=self.min_tokens, ignore_eos=self.ignore_eos)


def completion_prompt_tokens(prompt: Any) -> int:
    """Tokens of a completions `prompt`: text, token ids, or a batch of exactly one of those."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.count_tokens(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise RequestError("the gpufleet simulator answers one prompt per request, not a batch")
    raise RequestError("prompt: Input should be a string, a list of token ids, or a list of one of those")


def chat_prompt_tokens(body: JSON) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: Field required (a non-empty list of messages)")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError("messages: each message must be an object with a role")
    try:
        return tokenizer.chat_prompt_tokens(messages, add_generation_prompt=body.get("add_generation_prompt", True)
                                            is not False)
    except ValueError as exc:
        raise RequestError(str(exc)) from None


def output_limit(body: JSON, prompt_tokens: int, max_model_len: int, chat: bool) -> int:
    """max_tokens after vLLM's context-length checks, with vLLM's messages."""
    if prompt_tokens == 0:
        raise RequestError("The decoder prompt cannot be empty")
    if prompt_tokens >= max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages."
        )
    asked = _int_field(body, "max_completion_tokens") if chat else None
    if asked is None:
        asked = _int_field(body, "max_tokens")
    if asked is None:
        return max_model_len - prompt_tokens
    if asked < 1:
        raise RequestError(f"max_tokens must be at least 1, got {asked}.")
    if prompt_tokens + asked > max_model_len:
        raise RequestError(
            f"'max_tokens' or 'max_completion_tokens' is too large: {asked}. This model's maximum context "
            f"length is {max_model_len} tokens and your request has {prompt_tokens} input tokens "
            f"({asked} > {max_model_len} - {prompt_tokens})."
        )
    return asked


# ---- the handlers -------------------------------------------------------------------------------

Admission = Callable[[], "web.Response | None"]


class OpenAIRoutes:
    """/v1/completions, /v1/chat/completions, /v1/models and /tokenize over one simulated engine.

    `sse_prefix` is b"data: " for vLLM and b"data:" for TGI's OpenAI routes; `admit` (TGI) may
    refuse a request before it reaches the engine and `release` is called when an admitted one ends.
    """

    def __init__(self, state: SimState, *, sse_prefix: bytes = b"data: ", owned_by: str = "vllm",
                 admit: Admission | None = None, release: Callable[[], None] | None = None) -> None:
        self.state = state
        self.sse_prefix = sse_prefix
        self.owned_by = owned_by
        self.admit = admit
        self.release = release
        self.model_json = json_dumps(state.served_names[0]).encode()
        self.done = sse_prefix + SSE_DONE

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)

    # ---- small endpoints ----------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        cards = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": self.owned_by,
                "root": self.state.config.model,
                "parent": None,
                "max_model_len": self.state.config.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{uuid.uuid4().hex}",
                        "object": "model_permission",
                        "created": created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in self.state.served_names
        ]
        return json_response({"object": "list", "data": cards})

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await _json_body(request)
            self._check_model(body)
            if "messages" in body:
                messages = body["messages"]
                if not isinstance(messages, list):
                    raise RequestError("messages: Input should be a valid list")
                tokens = tokenizer.chat_token_ids(messages, body.get("add_generation_prompt", True) is not False)
            elif isinstance(body.get("prompt"), str):
                tokens = [tokenizer.token_id(piece) for piece in tokenizer.tokenize(body["prompt"])]
            else:
                raise RequestError("prompt: Field required (a string), or messages")
        except RequestError as exc:
            return error_response(exc)
        except ValueError as exc:
            return error_response(RequestError(str(exc)))
        return json_response({"count": len(tokens), "max_model_len": self.state.config.max_model_len,
                                  "tokens": tokens, "token_strs": None})

    # ---- generation ---------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    def _check_model(self, body: JSON) -> str:
        model = body.get("model")
        if model is None:
            return self.state.served_names[0]
        if model not in self.state.served_names:
            raise RequestError(f"The model `{model}` does not exist.", "NotFoundError", 404)
        return model

    def _prepare(self, body: JSON, chat: bool) -> Prepared:
        model = self._check_model(body)
        _check_sampling(body)
        if chat and body.get("tools") and body.get("tool_choice", "auto") == "auto":
            raise RequestError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
        prompt_tokens = chat_prompt_tokens(body) if chat else completion_prompt_tokens(body.get("prompt"))
        max_tokens = output_limit(body, prompt_tokens, self.state.config.max_model_len, chat)
        min_tokens = _int_field(body, "min_tokens") or 0
        if min_tokens < 0:
            raise RequestError(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
        if min_tokens > max_tokens:
            raise RequestError(f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise RequestError(f"ignore_eos: Input should be a valid boolean, got {ignore_eos!r}")
        stream = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        include_usage = stream and bool(options.get("include_usage"))
        return Prepared(model, prompt_tokens, max_tokens, min_tokens, ignore_eos, stream, include_usage)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        state = self.state
        state.engine.catch_up()  # a burst of new requests must not hold up the tokens falling due
        try:
            body = await _json_body(request)
            prepared = self._prepare(body, chat)
        except RequestError as exc:
            return error_response(exc)
        if state.faults.engine_dead:
            return error_response(RequestError(ENGINE_DEAD_MESSAGE, "InternalServerError", 500))
        if self.admit is not None:
            refusal = self.admit()
            if refusal is not None:
                return refusal
        try:
            return await self._run(request, prepared, chat)
        finally:
            if self.release is not None:
                self.release()
            state.faults.request_done()

    async def _run(self, request: web.Request, prepared: Prepared, chat: bool) -> web.StreamResponse:
        state = self.state
        if state.faults.inject_error():
            return error_response(RequestError(INJECTED_ERROR_MESSAGE, "InternalServerError", 500))
        delay = state.faults.request_delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        handle = state.engine.submit(request_id, prepared.params())
        completed = False
        try:
            if prepared.stream:
                response, completed = await self._stream(request, handle, request_id, prepared, chat)
                return response
            response = await self._collect(handle, request_id, prepared, chat, request.path)
            completed = True
            return response
        except RequestError as exc:  # the engine aborted a non-streaming completion
            completed = True
            return error_response(exc)
        finally:
            if not completed:  # the client went away (or the server is stopping): free the engine's slot
                handle.abort()

    async def _collect(self, handle: Any, request_id: str, prepared: Prepared, chat: bool, route: str) -> web.Response:
        """A non-streaming answer: iterate the tokens, then one JSON body with usage."""
        state = self.state
        texts: list[str] = []
        reason: str | None = None
        tokens = 0
        on_token = _TokenObserver(state, handle.timing, request_id, route, prepared.prompt_tokens)
        async for event in handle:
            reason = event.finish_reason
            if is_token(event):
                tokens += 1
                texts.append(event.text)
                on_token(event.scheduled_at)
        on_token.close(reason)
        if reason == "abort" and not chat:
            raise RequestError("Request aborted by the engine", "BadRequestError", 400)
        created = int(time.time())
        usage = {"prompt_tokens": prepared.prompt_tokens, "total_tokens": prepared.prompt_tokens + tokens,
                 "completion_tokens": tokens, "prompt_tokens_details": None}
        text = "".join(texts)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                            "audio": None, "function_call": None, "tool_calls": [], "reasoning_content": None},
                "logprobs": None, "finish_reason": reason, "stop_reason": None,
            }
            body: JSON = {"id": request_id, "object": "chat.completion", "created": created, "model": prepared.model,
                          "choices": [choice], "service_tier": None, "system_fingerprint": None, "usage": usage,
                          "prompt_logprobs": None, "kv_transfer_params": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None,
                      "prompt_logprobs": None}
            body = {"id": request_id, "object": "text_completion", "created": created, "model": prepared.model,
                    "choices": [choice], "service_tier": None, "system_fingerprint": None, "usage": usage,
                    "kv_transfer_params": None}
        return web.Response(text=json_dumps(body), content_type="application/json")

    async def _stream(self, request: web.Request, handle: Any, request_id: str, prepared: Prepared,
                      chat: bool) -> tuple[web.StreamResponse, bool]:
        """Write one SSE event per token as the engine emits it (the hot path); False if the client left."""
        state = self.state
        writer = await SseWriter.open(request, {"Content-Type": "text/event-stream; charset=utf-8"})
        state.engine.catch_up()
        created = str(int(time.time())).encode()
        model = self.model_json if prepared.model == state.served_names[0] else json_dumps(prepared.model).encode()
        usage_null = b',"usage":null' if (prepared.include_usage or not chat) else b""
        head = (self.sse_prefix + b'{"id":"' + request_id.encode() + b'","object":'
                + (b'"chat.completion.chunk"' if chat else b'"text_completion"')
                + b',"created":' + created + b',"model":' + model + b',"choices":[')
        if chat:
            token_head = head + b'{"index":0,"delta":{"content":'
            token_tail = b'},"logprobs":null,"finish_reason":null}]' + usage_null + b"}\n\n"
            first = (head + b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                     b'"finish_reason":null}]' + usage_null + b"}\n\n")
            final_mid = b'},"logprobs":null,"finish_reason":'
        else:
            token_head = head + b'{"index":0,"text":'
            token_tail = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]' + usage_null + b"}\n\n"
            first = b""
            final_mid = b',"logprobs":null,"finish_reason":'
        record = state.token_log.open(request_id, request.path, prepared.prompt_tokens)
        usage_head = head if prepared.include_usage else None
        chunks = _SseChunks(self, writer, token_head, token_tail, first, final_mid, usage_null, usage_head, chat,
                            prepared.prompt_tokens, handle.timing.arrival, record)
        if writer.direct:
            handle.attach(chunks)  # from now on the engine's frontend writes the tokens itself
        reason: str | None = None
        try:
            # only what the sink did not take comes here: the end of the stream, an abort, or the
            # tokens that followed a detach (the client had fallen behind)
            async for event in handle:
                reason = event.finish_reason
                if chunks.ended:
                    continue
                if is_token(event):
                    behind = chunks(event.text, event.scheduled_at, event.finish_reason)
                else:
                    behind = chunks.end_without_token(event.finish_reason or "abort")
                if behind:
                    await writer.drain()
                if reason is None and writer.direct:
                    handle.attach(chunks)
            if reason is None:  # the engine ended the stream without a finish reason: close it properly
                writer.send(self.done)
            await writer.close()
        except ConnectionError:
            state.token_log.close(record, "abort")
            return writer.response, False
        state.token_log.close(record, reason)
        state.engine.catch_up()  # streams end in bursts too
        return writer.response, True

    def _final(self, token_head: bytes, final_mid: bytes, usage_null: bytes, text: str, reason: str, chat: bool,
               counted: bool) -> bytes:
        if reason == "abort" and not chat:
            # vLLM's completions stream turns an engine abort into an error event
            error = json_dumps(error_body("Request aborted by the engine", "BadRequestError", 400)).encode()
            return self.sse_prefix + error + b"\n\n"
        content = escaped(text if counted else "")
        return token_head + content + final_mid + b'"' + reason.encode() + b'","stop_reason":null}]' + usage_null \
            + b"}\n\n"

    def _usage_chunk(self, head: bytes, prompt_tokens: int, tokens: int) -> bytes:
        usage = f'{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens + tokens},' \
                f'"completion_tokens":{tokens}}}'
        return head + b'],"usage":' + usage.encode() + b"}\n\n"


class SseWriter:
    """A stream's events, written straight onto the transport as HTTP/1.1 chunks.

    aiohttp's StreamResponse.write costs about as much again as the socket send per call, and a
    stream writes once per token, so events go to the transport directly once aiohttp has sent the
    headers; `write_eof` (aiohttp's) ends the chunked body. Like uvicorn under vLLM, the headers go
    out at once, not with the first token. An HTTP/1.0 client (no chunked encoding) gets aiohttp's
    writer. A client that stops reading makes `send` return True: the caller then awaits `drain`.
    """

    __slots__ = ("_buffered", "_transport", "response")

    HIGH_WATER = 1 << 20
    LOW_WATER = 1 << 16

    def __init__(self, response: web.StreamResponse, transport: asyncio.Transport | None) -> None:
        self.response = response
        self._transport = transport
        self._buffered: list[bytes] = []

    @classmethod
    async def open(cls, request: web.Request, headers: dict[str, str]) -> SseWriter:
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        await response.write(b"")  # aiohttp holds the headers back until the first body bytes; send them now
        direct = response.headers.get("Transfer-Encoding") == "chunked"
        return cls(response, request.transport if direct else None)

    def send(self, data: bytes) -> bool:
        """Write one event; True when the client has fallen behind and the caller must `drain`."""
        transport = self._transport
        if transport is None:
            self._buffered.append(data)
            return True
        if transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return transport.get_write_buffer_size() > self.HIGH_WATER

    @property
    def direct(self) -> bool:
        """Whether `send` writes at once (so the engine's frontend may call it: types.TokenSink)."""
        return self._transport is not None

    async def drain(self) -> None:
        transport = self._transport
        if transport is None:
            buffered, self._buffered = self._buffered, []
            for data in buffered:
                await self.response.write(data)
            return
        while transport.get_write_buffer_size() > self.LOW_WATER:
            if transport.is_closing():
                raise ConnectionResetError("the client closed the connection")
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        await self.drain()
        await self.response.write_eof()


class _SseChunks:
    """One stream's SSE events, formatted and written synchronously (a types.TokenSink).

    The engine's frontend calls it for each token at the token's scheduled time, so a token costs
    a formatted chunk and a socket send, not a task switch; `_stream` calls it for whatever came
    as an event instead. The first token carries the chat role chunk and the TTFT observation;
    the last one the finish reason, the usage chunk and `[DONE]`. It asks to be detached when the
    client has fallen behind (or left), so that `_stream` can await the drain.
    """

    __slots__ = (
        "arrival",
        "chat",
        "count",
        "ended",
        "final_mid",
        "first",
        "head",
        "log_scheduled",
        "log_written",
        "observe_itl",
        "observe_ttft",
        "previous",
        "prompt_tokens",
        "routes",
        "tail",
        "usage_head",
        "usage_null",
        "writer",
    )

    def __init__(self, routes: OpenAIRoutes, writer: SseWriter, head: bytes, tail: bytes, first: bytes,
                 final_mid: bytes, usage_null: bytes, usage_head: bytes | None, chat: bool, prompt_tokens: int,
                 arrival: float, record: TokenRecord | None) -> None:
        self.routes = routes
        self.writer = writer
        self.head = head  # a token event up to its text
        self.tail = tail  # ... and after it
        self.first = first  # what goes before the first event (chat: the role chunk)
        self.final_mid = final_mid
        self.usage_null = usage_null
        self.usage_head = usage_head  # None: no usage chunk (stream_options.include_usage not set)
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.arrival = arrival
        self.observe_itl = routes.state.observe_itl
        self.observe_ttft = routes.state.observe_ttft
        self.previous = -1.0  # the last token's scheduled time; < 0 until the first token
        self.count = 0
        self.ended = False  # the last event and [DONE] are written
        self.log_scheduled = record.scheduled.append if record is not None else None
        self.log_written = record.written.append if record is not None else None

    def __call__(self, text: str, at: float, reason: FinishReason | None = None) -> bool:
        previous = self.previous
        if previous >= 0.0 and reason is None:  # the hot path: every token but the first and the last
            self.observe_itl(at - previous)
            chunk = self.head + (_ESCAPED.get(text) or escaped(text)) + self.tail
        else:
            if previous < 0.0:
                self.observe_ttft(at - self.arrival)
            else:
                self.observe_itl(at - previous)
            if reason is None:
                chunk = self.head + escaped(text) + self.tail
            else:
                chunk = self._last(text, reason, self.count + 1)
            if previous < 0.0:
                chunk = self.first + chunk
        self.previous = at
        self.count += 1
        try:
            behind = self.writer.send(chunk)
        except ConnectionError:
            return True  # `_stream` sees the closed connection with its next event
        if self.log_scheduled is not None:
            self.log_scheduled(at)
            self.log_written(time.monotonic())  # type: ignore[misc]
        return behind

    def end_without_token(self, reason: str) -> bool:
        """The stream ends with no token (an abort): the closing events; True if the client is behind."""
        chunk = self._last("", reason, self.count, counted=False)
        if self.previous < 0.0:
            chunk = self.first + chunk
        return self.writer.send(chunk)

    def _last(self, text: str, reason: str, count: int, counted: bool = True) -> bytes:
        routes = self.routes
        chunk = routes._final(self.head, self.final_mid, self.usage_null, text, reason, self.chat, counted)
        if self.usage_head is not None:
            chunk += routes._usage_chunk(self.usage_head, self.prompt_tokens, count)
        self.ended = True
        return chunk + routes.done


class _TokenObserver:
    """TTFT/ITL observations and the token log for one non-streaming request."""

    __slots__ = ("clock", "previous", "record", "state", "timing")

    def __init__(self, state: SimState, timing: RequestTiming, request_id: str, route: str, prompt_tokens: int):
        self.state = state
        self.timing = timing
        self.previous = -1.0
        self.record = state.token_log.open(request_id, route, prompt_tokens)
        self.clock = time.monotonic

    def __call__(self, scheduled_at: float) -> None:
        if self.previous < 0.0:
            self.state.observe_ttft(scheduled_at - self.timing.arrival)
        else:
            self.state.observe_itl(scheduled_at - self.previous)
        self.previous = scheduled_at
        if self.record is not None:
            self.record.scheduled.append(scheduled_at)
            self.record.written.append(self.clock())

    def close(self, reason: str | None) -> None:
        self.state.token_log.close(self.record, reason)


async def _json_body(request: web.Request) -> JSON:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


# ---- middleware and the small vLLM endpoints -------------------------------------------------------


def api_key_middleware(api_key: str, protected: Callable[[str], bool],
                       unauthorized: Callable[[], web.Response]) -> Any:
    """Require `Authorization: Bearer <api_key>` on the paths `protected` selects (vLLM: under /v1)."""
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if request.method != "OPTIONS" and protected(request.path):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return unauthorized()
        return await handler(request)

    return middleware


def vllm_protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def vllm_unauthorized() -> web.Response:
    return json_response({"error": "Unauthorized"}, status=401)


def add_routes(app: web.Application, state: SimState) -> OpenAIRoutes:
    """Mount vLLM's surface: the OpenAI routes, /health, /ping, /version, /tokenize and /metrics."""
    routes = OpenAIRoutes(state)
    routes.add_to(app)

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if state.healthy() else 503)

    async def version(request: web.Request) -> web.Response:
        return json_response({"version": f"gpufleet-sim {__version__}"})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=state.render_metrics(), headers={"Content-Type": state.metrics_content_type})

    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_post("/ping", health)
    app.router.add_get("/version", version)
    app.router.add_post("/tokenize", routes.tokenize)
    app.router.add_get("/metrics", metrics)
    return routes
