"""The users' hot path, without importing Locust: reading a streamed body, parsing it later, reporting it.

`read_body` reads an HTTP response's body one `recv` at a time and stamps each read with
`time.perf_counter()` the moment `recv` returns, before geventhttpclient parses the HTTP chunk
framing and before the SSE is parsed. `DeferredReads` keeps the stamped reads and the process's
`IdleParser` parses them when nothing else is ready. `report` turns one RequestRecord into
Locust's request events. users.py uses them; they live here so unit tests can drive them with
fakes and gevent alone (importing Locust would patch the test process with gevent).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.socket
from geventhttpclient.response import HTTPParseError

from gpufleet.loadtest.record import RequestRecord
from gpufleet.loadtest.sse import StreamInterpreter

if TYPE_CHECKING:
    from geventhttpclient.response import HTTPSocketPoolResponse

log = logging.getLogger(__name__)

ERROR_BODY_LIMIT = 65536  # bytes of a non-200 body read for its error message
READ_SIZE = 65536  # the most one recv may return; a read returns whatever has arrived


class StreamError(Exception):
    """A failed request in Locust's failure table: the record's error, verbatim."""


# ---- reading the body -----------------------------------------------------------------------------


def read_body(response: HTTPSocketPoolResponse, on_read: Callable[[bytes, float], None], headers_at: float,
              clock: Callable[[], float] = time.perf_counter, idle_timeout_s: float | None = None) -> int:
    """Hand each read of the body to `on_read(bytes, arrived)`; the body's size in bytes.

    `arrived` is `clock()` taken as soon as the socket's `recv` returned, before the HTTP chunk
    framing is parsed; bytes that came in with the headers carry `headers_at`. `idle_timeout_s`:
    the most time between two reads (TimeoutError after it). Raises ConnectionError when the
    connection ends before the body does, OSError or HTTPParseError as the socket and parser do.

    On a plain (not TLS) gevent socket the loop waits on one IO watcher of its own and reads the
    underlying non-blocking socket: gevent's `socket.recv` would arm a Timeout object and raise
    and catch EWOULDBLOCK on every read, a quarter of a read's cost (benchmarks/README.md).
    """
    buffered = response._body_buffer  # geventhttpclient's parsed, not yet consumed, body bytes
    total = 0
    if buffered:
        total += _hand_over(buffered, on_read, headers_at)
    if response.message_complete:
        return total
    sock = response._sock
    if sock is None:
        raise ConnectionError("the connection was released before the body ended")
    with _Receiver(sock, idle_timeout_s) as receive:
        while not response.message_complete:
            data = receive()
            arrived = clock()
            if not data:  # the peer closed: the end of a body delimited by the connection, or a cut one
                with contextlib.suppress(HTTPParseError):
                    response.feed(data)
                if response.message_complete:
                    break
                raise ConnectionError("the server closed the connection before the body ended")
            response.feed(data)
            if buffered:
                total += _hand_over(buffered, on_read, arrived)
    return total


def _hand_over(buffered: bytearray, on_read: Callable[[bytes, float], None], arrived: float) -> int:
    chunk = bytes(buffered)
    del buffered[:]
    on_read(chunk, arrived)
    return len(chunk)


class _Receiver:
    """`recv` for one body: a watcher-based read on plain gevent sockets, the socket's own otherwise."""

    def __init__(self, sock: Any, idle_timeout_s: float | None) -> None:
        self.sock = sock
        self.hub = gevent.get_hub()
        plain = type(sock) is gevent.socket.socket and getattr(sock, "_sock", None) is not None
        self.raw = sock._sock if plain else None  # the non-blocking socket under gevent's
        self.watcher = self.hub.loop.io(sock.fileno(), 1) if plain else None
        self.timer = None
        if idle_timeout_s is not None:
            # one repeating timer restarted by every read, instead of a Timeout armed per read
            self.timer = self.hub.loop.timer(idle_timeout_s, idle_timeout_s)
            self.expired = TimeoutError(f"no data for {idle_timeout_s:g} s")
            self.timer.start(gevent.getcurrent().throw, self.expired)

    def __enter__(self) -> Callable[[], bytes]:
        return self.receive if self.raw is not None else self.receive_plainly

    def __exit__(self, *exc: object) -> None:
        if self.watcher is not None:
            self.watcher.close()
        if self.timer is not None:
            self.timer.close()

    def receive(self) -> bytes:
        raw, wait, watcher = self.raw, self.hub.wait, self.watcher
        while True:
            wait(watcher)
            try:
                data = raw.recv(READ_SIZE)
                break
            except BlockingIOError:
                continue  # woken without data (another reader took it): wait again
        if self.timer is not None:
            self.timer.again(gevent.getcurrent().throw, self.expired)
        return data

    def receive_plainly(self) -> bytes:
        data = self.sock.recv(READ_SIZE)
        if self.timer is not None:
            self.timer.again(gevent.getcurrent().throw, self.expired)
        return data


def read_error_body(response: HTTPSocketPoolResponse, headers_at: float) -> bytes:
    """A non-200 body, at most ERROR_BODY_LIMIT bytes of it (its message is all a record keeps)."""
    parts: list[bytes] = []
    size = 0

    def keep(chunk: bytes, _arrived: float) -> None:
        nonlocal size
        if size < ERROR_BODY_LIMIT:
            parts.append(chunk)
            size += len(chunk)

    with contextlib.suppress(OSError, HTTPParseError):  # the status says enough; a cut-off body shortens the message
        read_body(response, keep, headers_at)
    return b"".join(parts)[:ERROR_BODY_LIMIT]


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "network timeout (no data within the user's network_timeout)"
    text = str(exc) or type(exc).__name__
    return f"connection failed: {text}"


# ---- reporting to Locust --------------------------------------------------------------------------


def report(fire: Callable[..., Any], record: RequestRecord, name: str, size: int, elapsed_s: float) -> None:
    """Fire Locust's request events for one record: the real row, then TTFT, TPOT and TOKENS rows.

    Response times are in ms as Locust expects, except TOKENS: output tokens per second of the
    request (tokens / E2E), with its output tokens as the row's size. Failures fire the real row
    only, so the synthetic rows never count a failure.
    """
    ok = record.ok
    real_ms = (record.e2e_s if ok and record.e2e_s is not None else elapsed_s) * 1000.0
    fire(request_type="POST", name=name, response_time=real_ms, response_length=size,
         exception=None if ok else StreamError(record.error or "failed"), context={})
    if not ok or record.ttft_s is None or record.e2e_s is None:
        return
    fire(request_type="TTFT", name=name, response_time=record.ttft_s * 1000.0, response_length=0, exception=None,
         context={})
    tpot = record.tpot_s
    if tpot is not None:
        fire(request_type="TPOT", name=name, response_time=tpot * 1000.0, response_length=0, exception=None,
             context={})
    tokens = record.output_tokens
    rate = tokens / record.e2e_s if record.e2e_s > 0 else 0.0
    fire(request_type="TOKENS", name=name, response_time=rate, response_length=tokens, exception=None, context={})


# ---- parsing later --------------------------------------------------------------------------------


Finish = Callable[[RequestRecord, int, float], None]  # (record, body bytes, perf_counter at its end)


class DeferredReads:
    """A stream's stamped reads, kept raw while streams are hot and parsed when the process is idle.

    One load-generator process serves every stream, and a model's step releases a token to all of
    them within a millisecond or two: each read's own work delays the reads queued behind it. So
    a read only appends (bytes, time); the SSE and JSON parsing (~13 us an event) is done by the
    process's one `IdleParser`, a slice at a time when gevent's loop has no ready socket. A
    stream is handed to it when it ends (`close`) or, for long answers, once `BATCH` reads wait,
    so memory stays bounded. Under saturation parsing waits, which delays the user's next
    request, never a timestamp. The parser, not the user, builds the record and hands it to
    `finish` (Locust's events, the collector), so a test that stops while records wait for their
    parsing still gets them (`IdleParser.finish_all`).
    """

    BATCH = 256

    __slots__ = ("closed", "done", "ended", "error", "finish", "interpreter", "parser", "pending", "queued", "record")

    def __init__(self, interpreter: StreamInterpreter, finish: Finish, parser: IdleParser | None = None) -> None:
        self.interpreter = interpreter
        self.finish = finish
        self.parser = parser if parser is not None else PARSER
        self.pending: deque[tuple[bytes, float]] = deque()
        self.queued = False  # in the parser's queue
        self.closed = False  # the stream is over: the record follows its last parsed read
        self.error: str | None = None  # what cut the stream off, if anything
        self.ended = 0.0  # perf_counter when the stream ended
        self.done = gevent.event.Event()
        self.record: RequestRecord | None = None

    def add(self, chunk: bytes, arrived: float) -> None:
        self.pending.append((chunk, arrived))
        if len(self.pending) >= self.BATCH and not self.queued:
            self.parser.submit(self)

    def close(self, error: str | None = None) -> RequestRecord:
        """The stream is over (cut off by `error`, if given): its record, once parsed and finished."""
        self.error = error
        self.ended = time.perf_counter()
        self.closed = True
        if not self.queued:
            self.parser.submit(self)
        self.done.wait()
        assert self.record is not None
        return self.record

    def parse_slice(self, size: int) -> bool:
        """Feed up to `size` reads to the interpreter; True when none is left."""
        feed, pending = self.interpreter.feed, self.pending
        for _ in range(min(size, len(pending))):
            chunk, arrived = pending.popleft()
            feed(chunk, arrived)
        return not pending

    def complete(self) -> None:
        """Everything is parsed and the stream closed: build the record and hand it on."""
        self.record = self.interpreter.record(self.error)
        try:
            self.finish(self.record, self.interpreter.parser.bytes_read, self.ended)
        finally:
            self.done.set()


class IdleParser:
    """The process's parsing of deferred reads: one greenlet, one slice per idle moment of the loop.

    One greenlet rather than one per stream: gevent runs every idle watcher that is due in the
    same loop iteration, so 64 streams ending together would parse back to back without a look
    at the sockets in between.
    """

    SLICE = 16  # reads per slice: ~0.2 ms of parsing between two looks at the sockets

    def __init__(self) -> None:
        self.queue: deque[DeferredReads] = deque()
        self.greenlet: gevent.Greenlet | None = None

    def submit(self, reads: DeferredReads) -> None:
        reads.queued = True
        self.queue.append(reads)
        if self.greenlet is None or self.greenlet.dead:
            self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        queue = self.queue
        while queue:
            gevent.idle()
            if not queue:  # finish_all emptied it meanwhile
                break
            reads = queue[0]
            if reads.parse_slice(self.SLICE):
                self._done(queue.popleft())

    def finish_all(self) -> None:
        """Parse everything queued now, without waiting for idle moments (a test is stopping)."""
        while self.queue:
            reads = self.queue.popleft()
            reads.parse_slice(len(reads.pending))
            self._done(reads)

    @staticmethod
    def _done(reads: DeferredReads) -> None:
        reads.queued = False
        if reads.closed:
            try:
                reads.complete()
            except Exception:  # a failing listener must not stop the parsing of the other streams
                log.exception("finishing a request record failed")


PARSER = IdleParser()
