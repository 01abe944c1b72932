"""Locust users that stream LLM answers through the gateway and time every token exactly.

`OpenAIChatUser`, `OpenAICompletionsUser` and `TgiUser` each send one streamed request after
another (closed loop, no wait) with `Authorization: Bearer <key>`, and turn each answer into one
RequestRecord (gpufleet/loadtest/record.py) that reaches the master (collect.py).

The client is geventhttpclient, the engine of Locust's FastHttpUser, chosen by measurement
(docs/loadtest.md, "Timing"): it costs less CPU per streamed token than Locust's requests-based
HttpUser, and CPU spent per token is what delays the next token's timestamp. The body is read
one `recv` at a time (stream_io.read_body), not through `iter_content(1024)`, which waits until
1024 bytes have arrived and so would hold small SSE events back; `time.perf_counter()` is taken
the moment each `recv` returns, and the parsing waits until the process is idle
(stream_io.IdleParser), which then builds the record.

In Locust's UI each request shows as its real row (`POST <path>`, response time = E2E, or the
time to the failure) and, for successes, three synthetic rows under the same name: `TTFT` and
`TPOT` in ms, and `TOKENS` whose "response time" is the request's output tokens/s and whose
"size" is its output tokens. The synthetic rows count in Locust's "Aggregated" row, so its RPS is
about four times the real one and its failure ratio is diluted: read RPS and failures from the
`POST` row (docs/loadtest.md). The gate never reads Locust's numbers: it reads the raw records.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import gevent
from geventhttpclient.response import HTTPParseError, HTTPSocketPoolResponse
from geventhttpclient.url import URL
from locust import FastHttpUser, constant, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from gpufleet.loadtest import collect
from gpufleet.loadtest.apis import (
    DEFAULT_MAX_TOKENS,
    PATHS,
    PromptFields,
    PromptFn,
    Settings,
    SettingsError,
    as_fields,
    build_request,
    default_prompt,
    settings_from,
)
from gpufleet.loadtest.prompts import SEED_INPUT_LENGTHS, PromptSource, prompt_source
from gpufleet.loadtest.record import RequestRecord
from gpufleet.loadtest.shapes import OpenLoopDispatcher
from gpufleet.loadtest.sse import (
    APIS,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    TGI,
    RequestMeta,
    failed_record,
    http_error_message,
    interpreter_for,
)
from gpufleet.loadtest.stream_io import PARSER, DeferredReads, describe, read_body, read_error_body, report

log = logging.getLogger(__name__)

PROMPT_KINDS = ("synthetic", "chat-set")
SEED_INPUT_TOKENS = SEED_INPUT_LENGTHS[0]
_SETTINGS: weakref.WeakKeyDictionary[Environment, Settings] = weakref.WeakKeyDictionary()  # set at init, test start


# ---- the users ------------------------------------------------------------------------------------


class StreamingUser(FastHttpUser):
    """Streams one request after another to `host` and records each; subclasses fix the API.

    Plug a prompt source in by assigning any zero-argument callable that returns PromptFields, a
    `(fields, expected_input_tokens, expected_output_tokens)` tuple or a prompts.Prompt to the class
    attribute:
    `StreamingUser.prompt_source = source` (all users) or `OpenAIChatUser.prompt_source = source`.
    A request's step is `step_source()` when set, else the running load shape's
    `step_at_epoch(send time)` (shapes.py). An open-loop dispatcher calls `send(prompt,
    intended_epoch, step)` (shapes.Sender), possibly many at once on one user.
    """

    abstract = True
    api: ClassVar[str] = OPENAI_CHAT
    wait_time = constant(0)
    prompt_source: ClassVar[PromptFn | None] = None
    step_source: ClassVar[Callable[[], str] | None] = None
    connection_timeout = 10.0  # seconds to connect
    network_timeout = 120.0  # seconds without a byte before a read fails (a prefill may be long)
    request_timeout_s: ClassVar[float] = 900.0  # the most one request may take, start to end

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        base = URL(self.host)
        self._base_path = base.path.rstrip("/")
        self._http = self.client.client.clientpool.get_client(base)  # FastHttpUser's pool and timeouts
        self._worker = _worker_name(environment)

    @property
    def settings(self) -> Settings:
        return settings_of(self.environment, self.api)

    @task
    def stream(self) -> None:
        self.stream_request()

    def send(self, prompt: Any, intended_epoch: float, step: str) -> None:
        """One open-loop request (shapes.Sender): sent now, recorded against its intended time."""
        self.stream_request(prompt, intended_epoch=intended_epoch, step=step)

    def next_prompt(self) -> PromptFields:
        source = type(self).prompt_source or default_prompt  # via the class: a function stays unbound
        return as_fields(source())

    def step_at(self, epoch: float) -> str:
        """The load shape's step for a request sent at `epoch`: `step_source`, else the running shape's."""
        source = type(self).step_source
        if source is not None:
            return source()
        shape = getattr(self.environment, "shape_class", None)
        step_at_epoch = getattr(shape, "step_at_epoch", None)
        return step_at_epoch(epoch) if callable(step_at_epoch) else ""

    def stream_request(self, prompt: Any = None, intended_epoch: float | None = None,
                       step: str | None = None) -> RequestRecord:
        """Send one streamed request, record it, report it to Locust; its record.

        `prompt` (default: the next from `prompt_source`) may be anything a prompt source returns.
        Several may run at once on one user (an open-loop dispatcher's greenlets): nothing here is
        per-user state but the connection pool.
        """
        settings = self.settings
        fields = self.next_prompt() if prompt is None else as_fields(prompt)
        path, body = build_request(self.api, fields, settings.model, settings.max_tokens)
        payload = json.dumps(body).encode()
        headers = settings.headers()
        start_epoch = time.time()
        sent = time.perf_counter()
        meta = RequestMeta(api=self.api, sent=sent, start_epoch=start_epoch,
                           step=self.step_at(start_epoch) if step is None else step, intended_epoch=intended_epoch,
                           expected_input_tokens=fields.expected_input_tokens,
                           expected_output_tokens=fields.expected_output_tokens, worker=self._worker)
        return self._exchange(self._base_path + path, payload, headers, meta)

    def finish(self, record: RequestRecord, size: int, ended: float) -> None:
        """A finished request: Locust's events (`report`), then the run's records (collect.py)."""
        elapsed = ended - float(record.extra["sent_perf_counter"])
        report(self.environment.events.request.fire, record, PATHS[self.api], size, elapsed)
        collector = collect.collector_of(self.environment)
        if collector is not None:
            collector.add(record)

    def _exchange(self, path: str, payload: bytes, headers: dict[str, str], meta: RequestMeta) -> RequestRecord:
        """POST and read the answer within request_timeout_s; its record, reported and collected."""
        deadline = gevent.Timeout(self.request_timeout_s)
        deadline.start()
        response: HTTPSocketPoolResponse | None = None
        reads: DeferredReads | None = None
        try:
            response = self._http.request("POST", path, body=payload, headers=headers)
            headers_at = time.perf_counter()
            status = response.status_code
            content_type = str(response.get("content-type") or "")
            if status != 200 or not content_type.startswith("text/event-stream"):
                body = read_error_body(response, headers_at)
                error = (http_error_message(status, body) if status != 200
                         else f"expected an event stream, got {content_type or 'no content type'}")
                return self._finish_now(failed_record(meta, error, status, headers_at), len(body))
            reads = DeferredReads(interpreter_for(meta, status, headers_at), self.finish)
            read_body(response, reads.add, headers_at, idle_timeout_s=self.network_timeout)
            deadline.cancel()  # the answer is in: waiting for the parser is not the request's time
            return reads.close()
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            return self._failed(meta, reads, f"timed out after {self.request_timeout_s:g} s")
        except (OSError, HTTPParseError) as exc:
            return self._failed(meta, reads, describe(exc))
        finally:
            deadline.cancel()
            if response is not None:
                response.release()  # back to the pool when complete, closed otherwise

    def _finish_now(self, record: RequestRecord, size: int) -> RequestRecord:
        self.finish(record, size, time.perf_counter())
        return record

    def _failed(self, meta: RequestMeta, reads: DeferredReads | None, error: str) -> RequestRecord:
        """The record of a request cut off by `error`, with what arrived before it."""
        if reads is None:
            return self._finish_now(failed_record(meta, error), 0)
        return reads.close(error)


class OpenAIChatUser(StreamingUser):
    """POST /v1/chat/completions, streamed with usage (vLLM, TGI's OpenAI route, OpenAI)."""

    abstract = False
    api = OPENAI_CHAT


class OpenAICompletionsUser(StreamingUser):
    """POST /v1/completions, streamed with usage."""

    abstract = False
    api = OPENAI_COMPLETIONS


class TgiUser(StreamingUser):
    """POST /generate_stream (TGI's own API), with `details` for the token count."""

    abstract = False
    api = TGI


USER_CLASSES: dict[str, type[StreamingUser]] = {
    OPENAI_CHAT: OpenAIChatUser,
    OPENAI_COMPLETIONS: OpenAICompletionsUser,
    TGI: TgiUser,
}


# ---- wiring to Locust -----------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    """The `--gpufleet-*` options (the `init_command_line_parser` listener)."""
    group = parser.add_argument_group("gpufleet", "gpufleet's LLM streaming users")
    group.add_argument("--gpufleet-api-key-file", metavar="PATH", default=None,
                       help="file (mode 0600) holding the gateway API key alone on one line; no key on the command "
                            "line. Without it requests carry no Authorization header")
    group.add_argument("--gpufleet-model", metavar="NAME", default=None,
                       help="the `model` of OpenAI requests (default: none sent; the server's own)")
    group.add_argument("--gpufleet-api", choices=APIS, default=OPENAI_CHAT,
                       help="the API to load when no user class is named on the command line (default openai-chat)")
    group.add_argument("--gpufleet-max-tokens", metavar="N", type=int, default=DEFAULT_MAX_TOKENS,
                       help=f"max_tokens unless the prompt source sets it (default {DEFAULT_MAX_TOKENS})")
    group.add_argument("--gpufleet-records-file", metavar="PATH", default=None,
                       help="write every request's raw record as JSON lines here when Locust quits (master or "
                            "single process)")
    group.add_argument("--gpufleet-prompts", choices=PROMPT_KINDS, default=None,
                       help="synthetic: prompts of exactly --gpufleet-input-tokens tokens and outputs forced to "
                            "--gpufleet-max-tokens; chat-set: the shipped chat prompts, each with its own length "
                            "(default: one short fixed prompt)")
    group.add_argument("--gpufleet-input-tokens", metavar="N", type=int, default=SEED_INPUT_TOKENS,
                       help=f"input length of synthetic prompts (default {SEED_INPUT_TOKENS}, the seed's)")
    group.add_argument("--gpufleet-seed", metavar="N", type=int, default=0,
                       help="seed of the prompts (each load generator process draws its own sequence from it)")


def install(events: Any) -> None:
    """Register the options and the listeners on Locust's `events` (loadtests/locustfile.py does this)."""
    events.init_command_line_parser.add_listener(add_arguments)
    events.init.add_listener(_on_init)
    events.init.add_listener(count_run_time_from_now)
    events.test_start.add_listener(_on_test_start)
    events.test_stopping.add_listener(finish_records)
    events.test_stop.add_listener(finish_records)
    events.quitting.add_listener(_on_quitting)


def settings_of(environment: Environment, api: str = OPENAI_CHAT) -> Settings:
    """The `--gpufleet-*` settings of this environment's run (defaults before `install`'s listeners ran)."""
    return _SETTINGS.get(environment) or Settings(api=api)


def _worker_name(environment: Environment) -> str:
    runner = environment.runner
    return runner.client_id if isinstance(runner, WorkerRunner) else "local"


def _on_init(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        collect.attach(environment, collect.RecordCollector(collect.MASTER))
    elif isinstance(runner, WorkerRunner):
        collector = collect.attach(environment, collect.RecordCollector(collect.WORKER, runner.send_message))
        runner.greenlet.spawn(_flush_every_second, collector)
        return  # a worker's options come from the master with each spawn: read at test start
    else:
        collect.attach(environment, collect.RecordCollector(collect.LOCAL))
    options = environment.parsed_options
    if options is None:
        return
    try:
        settings = settings_from(options)
    except SettingsError as exc:
        log.error("%s", exc)
        sys.exit(2)
    _SETTINGS[environment] = settings
    try:
        configure_prompts(options, settings.api)
    except ValueError as exc:
        log.error("%s", exc)
        sys.exit(2)
    if not options.user_classes:  # none named: run the one of --gpufleet-api among ours
        chosen = USER_CLASSES[settings.api]
        environment.user_classes[:] = [c for c in environment.user_classes if not issubclass(c, StreamingUser)
                                       or c is chosen or (issubclass(c, OpenLoopDispatcher) and c.api == chosen.api)]


def count_run_time_from_now(**_: Any) -> None:
    """Read gevent's clock afresh, so that Locust's `--run-time` counts from the start of the run.

    Locust times `--run-time` with a gevent timer, which counts from the event loop's cached
    clock, last read when the loop last ran: before the locustfiles were imported. Their import
    (1.6 s here, more on a busy host) came off every run: a 3 s run on a CPU-starved host ended
    8 ms after its users started, before any request finished. Locust arms the timer right after
    the init listeners.
    """
    gevent.get_hub().loop.update_now()


def _on_test_start(environment: Environment, **_: Any) -> None:
    collector = collect.collector_of(environment)
    if collector is not None:
        collector.clear()
    freeze_heap()
    if environment.parsed_options is None:
        return
    runner = environment.runner
    try:
        settings = _SETTINGS[environment] = settings_from(environment.parsed_options)
        configure_prompts(environment.parsed_options, settings.api,
                          runner.worker_index if isinstance(runner, WorkerRunner) else 0)
    except ValueError as exc:  # a worker's key file, read where the worker runs
        log.error("%s", exc)
        if runner is not None:
            runner.quit()


def configure_prompts(options: Any, api: str, process_index: int = 0) -> PromptSource | None:
    """Plug the `--gpufleet-prompts` source into every user class; None (the default prompt) without it.

    Each load-generator process reseeds with its index, so two workers never send the same
    sequence of prompts (identical prompts would be served from the prefix cache). ValueError
    for lengths or kinds that cannot be built.
    """
    kind = getattr(options, "gpufleet_prompts", None)
    if kind is None:
        return None
    seed = int(getattr(options, "gpufleet_seed", 0) or 0)
    output_tokens = getattr(options, "gpufleet_max_tokens", None) or DEFAULT_MAX_TOKENS
    if kind == "chat-set":
        if api != OPENAI_CHAT:
            raise ValueError(f"--gpufleet-prompts chat-set: the chat set is chat messages; --gpufleet-api {api} "
                             "takes text (use --gpufleet-prompts synthetic)")
        source = prompt_source("chat-set", None, None, seed)
    else:
        synthetic = "synthetic-chat" if api == OPENAI_CHAT else "synthetic-text"
        source = prompt_source(synthetic, getattr(options, "gpufleet_input_tokens", SEED_INPUT_TOKENS),
                               output_tokens, seed)
    source.reseed(seed * 1_000 + process_index)
    StreamingUser.prompt_source = source
    return source


def freeze_heap() -> None:
    """Move what exists before the users start (Locust, gevent, imports) out of the collector's scans.

    A full collection walks every tracked object, tens of thousands in a Locust process, and
    pauses every stream while it does: the same reason `vllm bench serve` calls
    `freeze_gc_heap()` before it measures. Only objects made during the run are scanned after it.
    """
    gc.collect()
    gc.freeze()


def finish_records(environment: Environment, **_: Any) -> None:
    """A test is stopping, has stopped, or the process quits: finish every record, send a worker's batch."""
    PARSER.finish_all()
    collector = collect.collector_of(environment)
    if collector is not None:
        collector.flush()


def _flush_every_second(collector: collect.RecordCollector) -> None:
    while True:
        gevent.sleep(collector.interval_s / 4)
        collector.flush_due()


def _on_quitting(environment: Environment, **_: Any) -> None:
    finish_records(environment)
    options = environment.parsed_options
    path = getattr(options, "gpufleet_records_file", None) if options is not None else None
    if path and not isinstance(environment.runner, WorkerRunner):
        write_records(Path(path), collect.collected_records(environment))


def write_records(path: Path, records: list[RequestRecord]) -> None:
    """Raw records as JSON lines (one record's `to_dict()` a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record.to_dict()) + "\n")
    log.info("wrote %d request records to %s", len(records), path)
