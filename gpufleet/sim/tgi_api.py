"""Hugging Face TGI's HTTP surface (v3 router): /generate, /generate_stream, /info, /health, /metrics.

What a client or a monitor of TGI relies on, reproduced from its router (server.rs):

* SSE events are `data:{json}` (no space after the colon), one per token, the last carrying
  `generated_text` (and `details` when asked for); stream responses carry `X-Accel-Buffering: no`
  so an Nginx in front does not buffer them;
* at most `--max-concurrent-requests` generation requests at once, counting streams until they
  end; one more is answered 429 `{"error": "Model is overloaded", "error_type": "overloaded"}`
  (vLLM queues instead: see the fidelity notes in docs/simulator.md);
* validation errors are 422 `{"error": "Input validation error: ...", "error_type": "validation"}`;
* /health is 200 with no body, or 503 `{"error": "unhealthy", "error_type": "healthcheck"}`;
* `--api-key` protects the generation routes with a bare 401; info routes stay open.

The OpenAI routes TGI also serves (/v1/chat/completions, /v1/completions, /v1/models) reuse the
vLLM surface's code with TGI's `data:` framing and the same concurrency limit.

Token log-probabilities are not simulated: every token reports `logprob` -1.0.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gpufleet import __version__
from gpufleet.sim import tokenizer
from gpufleet.sim.types import GenerationParams
from gpufleet.sim.vllm_api import OpenAIRoutes, SseWriter, escaped, is_token, json_dumps, json_response

if TYPE_CHECKING:
    from gpufleet.sim.server import SimState

JSON = dict[str, Any]
TGI_FINISH = {"stop": "eos_token", "length": "length", "abort": "length"}
EOS_TEXT = "<|im_end|>"
LOGPROB = b"-1.0"


class TgiError(Exception):
    def __init__(self, message: str, error_type: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.status = status

    def response(self) -> web.Response:
        return json_response({"error": self.message, "error_type": self.error_type}, status=self.status)


def validation_error(message: str) -> TgiError:
    return TgiError(f"Input validation error: {message}", "validation", 422)


class TgiRoutes:
    """TGI's routes over one simulated engine, with its concurrency limit and metrics."""

    def __init__(self, state: SimState, max_concurrent_requests: int, max_input_tokens: int,
                 max_total_tokens: int) -> None:
        self.state = state
        self.max_concurrent = max_concurrent_requests
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        self.in_flight = 0
        self.metrics = state.tgi_metrics

    # ---- admission (shared with the OpenAI routes) ----------------------------------------------

    def admit(self) -> web.Response | None:
        """Take a concurrency slot, or the 429 TGI answers when none is free."""
        if self.in_flight >= self.max_concurrent:
            if self.metrics is not None:
                self.metrics.request_failed("overloaded")
            return TgiError("Model is overloaded", "overloaded", 429).response()
        self.in_flight += 1
        return None

    def release(self) -> None:
        self.in_flight -= 1

    # ---- info routes --------------------------------------------------------------------------

    async def info(self, request: web.Request) -> web.Response:
        return json_response({
            "model_id": self.state.config.model,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": self.max_concurrent,
            "max_best_of": 2,
            "max_stop_sequences": 4,
            "max_input_tokens": self.max_input_tokens,
            "max_total_tokens": self.max_total_tokens,
            "validation_workers": 2,
            "max_client_batch_size": 4,
            "router": "text-generation-router",
            "version": f"gpufleet-sim {__version__}",
            "sha": None,
            "docker_label": None,
        })

    async def health(self, request: web.Request) -> web.Response:
        if self.state.healthy():
            return web.Response(status=200)
        return TgiError("unhealthy", "healthcheck", 503).response()

    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(body=self.state.render_metrics(), headers={"Content-Type": self.state.metrics_content_type})

    # ---- generation ---------------------------------------------------------------------------

    def _validate(self, body: Any) -> tuple[str, JSON, GenerationParams]:
        if not isinstance(body, dict):
            raise TgiError("Failed to deserialize the JSON body into the target type: expected an object",
                           "validation", 422)
        inputs = body.get("inputs")
        if not isinstance(inputs, str):
            raise TgiError("Failed to deserialize the JSON body into the target type: missing field `inputs`",
                           "validation", 422)
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise TgiError("Failed to deserialize the JSON body into the target type: parameters: expected an "
                           "object", "validation", 422)
        input_length = tokenizer.count_tokens(inputs)
        if input_length == 0:
            raise validation_error("`inputs` cannot be empty")
        temperature = parameters.get("temperature")
        if temperature is not None and (not isinstance(temperature, int | float) or temperature <= 0):
            raise validation_error("`temperature` must be strictly positive")
        top_p = parameters.get("top_p")
        if top_p is not None and (not isinstance(top_p, int | float) or not 0 < top_p < 1):
            raise validation_error("`top_p` must be > 0.0 and < 1.0")
        best_of = parameters.get("best_of")
        if best_of not in (None, 1):
            raise validation_error("`best_of` is not simulated (the gpufleet simulator answers one sequence)")
        stop = parameters.get("stop") or []
        if not isinstance(stop, list) or len(stop) > 4:
            raise validation_error("`stop` supports up to 4 stop sequences.")
        if input_length > self.max_input_tokens:
            raise validation_error(
                f"`inputs` must have less than {self.max_input_tokens} tokens. Given: {input_length}"
            )
        max_new = parameters.get("max_new_tokens")
        if max_new is None:
            max_new = self.max_total_tokens - input_length
        elif isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0:
            raise validation_error("`max_new_tokens` must be strictly positive")
        if input_length + max_new > self.max_total_tokens:
            raise validation_error(
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        return inputs, parameters, GenerationParams(prompt_tokens=input_length, max_tokens=max_new)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, stream=False, compat=False)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, stream=True, compat=False)

    async def compat_generate(self, request: web.Request) -> web.StreamResponse:
        """POST /: /generate_stream when the body says "stream": true, else /generate answered as a list."""
        return await self._handle(request, stream=None, compat=True)

    async def _handle(self, request: web.Request, stream: bool | None, compat: bool) -> web.StreamResponse:
        state = self.state
        started = time.monotonic()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return TgiError(f"Failed to parse the request body as JSON: {exc}", "validation", 422).response()
        if stream is None:
            stream = bool(isinstance(body, dict) and body.get("stream"))
        if self.metrics is not None:
            self.metrics.request_received()
        if state.faults.engine_dead:
            if self.metrics is not None:
                self.metrics.request_failed("generation")
            return TgiError("Request failed during generation: Server error: engine unreachable", "generation",
                            424).response()
        refusal = self.admit()
        if refusal is not None:
            return refusal
        try:
            try:
                inputs, parameters, params = self._validate(body)
            except TgiError as exc:
                if self.metrics is not None:
                    self.metrics.request_failed("validation")
                return exc.response()
            if self.metrics is not None:
                self.metrics.validated(time.monotonic() - started, params.prompt_tokens, params.max_tokens)
            if state.faults.inject_error():
                if self.metrics is not None:
                    self.metrics.request_failed("generation")
                return TgiError("Request failed during generation: Server error: simulated fault (gpufleet-sim "
                                "--error-rate)", "generation", 424).response()
            delay = state.faults.request_delay_s
            if delay > 0:
                await asyncio.sleep(delay)
            return await self._run(request, inputs, parameters, params, stream, compat)
        finally:
            self.release()
            state.faults.request_done()

    async def _run(self, request: web.Request, inputs: str, parameters: JSON, params: GenerationParams,
                   stream: bool, compat: bool) -> web.StreamResponse:
        state = self.state
        request_id = f"tgi-{state.next_request_number()}"
        handle = state.engine.submit(request_id, params)
        completed = False
        try:
            if stream:
                response, completed = await self._stream(request, handle, request_id, parameters, params)
                return response
            response = await self._collect(request, handle, request_id, inputs, parameters, params, compat)
            completed = True
            return response
        finally:
            if not completed:
                handle.abort()

    async def _collect(self, request: web.Request, handle: Any, request_id: str, inputs: str, parameters: JSON,
                       params: GenerationParams, compat: bool) -> web.Response:
        state = self.state
        record = state.token_log.open(request_id, request.path, params.prompt_tokens)
        texts: list[str] = []
        tokens: list[JSON] = []
        reason: str | None = None
        async for event in handle:
            reason = event.finish_reason
            if not is_token(event):
                continue
            eos = reason == "stop" and not event.text
            if not eos:
                texts.append(event.text)
            tokens.append({"id": event.token_id, "text": EOS_TEXT if eos else event.text, "logprob": -1.0,
                           "special": eos})
            if record is not None:
                record.scheduled.append(event.scheduled_at)
                record.written.append(time.monotonic())
        state.token_log.close(record, reason)
        text = "".join(texts)
        if parameters.get("return_full_text"):
            text = inputs + text
        answer: JSON = {"generated_text": text}
        if parameters.get("details"):
            answer["details"] = {"finish_reason": TGI_FINISH.get(reason or "length", "length"),
                                 "generated_tokens": len(tokens), "seed": parameters.get("seed"),
                                 "prefill": [], "tokens": tokens}
        timing = handle.timing
        headers = _timing_headers(timing, params.prompt_tokens, len(tokens))
        return web.Response(text=json_dumps([answer] if compat else answer), content_type="application/json",
                            headers=headers)

    async def _stream(self, request: web.Request, handle: Any, request_id: str, parameters: JSON,
                      params: GenerationParams) -> tuple[web.StreamResponse, bool]:
        state = self.state
        writer = await SseWriter.open(request, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                "X-Accel-Buffering": "no", "x-compute-type": "gpufleet-sim"})
        clock = time.monotonic
        record = state.token_log.open(request_id, request.path, params.prompt_tokens)
        details = bool(parameters.get("details"))
        texts: list[str] = []
        index = 0
        reason: str | None = None
        try:
            async for event in handle:
                reason = event.finish_reason
                if not is_token(event):
                    break
                index += 1
                eos = reason == "stop" and not event.text
                if not eos:
                    texts.append(event.text)
                token = (b'{"id":' + str(event.token_id).encode() + b',"text":'
                         + escaped(EOS_TEXT if eos else event.text) + b',"logprob":' + LOGPROB
                         + (b',"special":true}' if eos else b',"special":false}'))
                if reason is None:
                    tail = b',"generated_text":null,"details":null,"top_tokens":null}\n\n'
                else:
                    generated = json_dumps("".join(texts)).encode()
                    stream_details = (
                        json_dumps({"finish_reason": TGI_FINISH.get(reason, "length"), "generated_tokens": index,
                                    "seed": parameters.get("seed"), "input_length": params.prompt_tokens}).encode()
                        if details else b"null")
                    tail = b',"generated_text":' + generated + b',"details":' + stream_details \
                        + b',"top_tokens":null}\n\n'
                if writer.send(b'data:{"index":' + str(index).encode() + b',"token":' + token + tail):
                    await writer.drain()
                if record is not None:
                    record.scheduled.append(event.scheduled_at)
                    record.written.append(clock())
            if reason == "abort":
                writer.send(b'data:{"error":"Request failed during generation: aborted","error_type":"generation"}'
                            b"\n\n")
            await writer.close()
        except ConnectionError:
            state.token_log.close(record, "abort")
            return writer.response, False
        state.token_log.close(record, reason)
        return writer.response, True


def _timing_headers(timing: Any, prompt_tokens: int, generated: int) -> dict[str, str]:
    """TGI's x-* timing headers on non-streaming answers, in milliseconds."""
    headers = {"x-compute-type": "gpufleet-sim", "x-prompt-tokens": str(prompt_tokens),
               "x-generated-tokens": str(generated)}
    if timing.last_token is not None:
        headers["x-total-time"] = str(int((timing.last_token - timing.arrival) * 1000))
        if timing.first_scheduled is not None:
            headers["x-queue-time"] = str(int((timing.first_scheduled - timing.arrival) * 1000))
            headers["x-inference-time"] = str(int((timing.last_token - timing.first_scheduled) * 1000))
        if generated > 0 and timing.first_scheduled is not None:
            per_token = (timing.last_token - timing.first_scheduled) / generated
            headers["x-time-per-token"] = str(int(per_token * 1000))
    return headers


def tgi_protected(path: str) -> bool:
    return path in ("/", "/generate", "/generate_stream", "/tokenize", "/invocations", "/vertex") \
        or path.startswith("/v1/")


def tgi_api_key_middleware(api_key: str) -> Any:
    """TGI's --api-key: a bare 401 on the generation routes without `Authorization: Bearer <key>`."""
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if request.method == "POST" and tgi_protected(request.path) and not hmac.compare_digest(given, expected):
            return web.Response(status=401)
        return await handler(request)

    return middleware


def add_routes(app: web.Application, state: SimState, max_concurrent_requests: int, max_input_tokens: int,
               max_total_tokens: int) -> TgiRoutes:
    routes = TgiRoutes(state, max_concurrent_requests, max_input_tokens, max_total_tokens)
    openai = OpenAIRoutes(state, sse_prefix=b"data:", owned_by=state.config.model, admit=routes.admit,
                          release=routes.release)
    openai.add_to(app)
    app.router.add_post("/generate", routes.generate)
    app.router.add_post("/generate_stream", routes.generate_stream)
    app.router.add_post("/", routes.compat_generate)
    app.router.add_get("/", routes.health)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/ping", routes.health)
    app.router.add_get("/info", routes.info)
    app.router.add_get("/metrics", routes.metrics_route)
    return routes
