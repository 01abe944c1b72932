"""One simulator server: an engine, its metrics and faults, and the vLLM or TGI HTTP surface.

`SimServer.start()` starts the engine, waits the simulated load time (`profile.startup_s`, or the
`--startup-delay` fault) and only then binds the port, so until the "model" is loaded clients get
connection refused, exactly as with vLLM, whose HTTP server starts after weights load and CUDA
graphs are captured. `wait()` returns the process exit status: 0 after a stop, 1 after a simulated
crash.

The server is a labelled stand-in: it logs that it is a simulator when it starts, /version says
`gpufleet-sim <version>`, and /metrics carries `gpufleet_sim_info`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from aiohttp import web

from gpufleet import __version__
from gpufleet.sim import tgi_api, vllm_api
from gpufleet.sim.faults import CRASH_EXIT_CODE, FaultController, FaultSettings, TokenLog, add_admin_routes
from gpufleet.sim.metrics import CONTENT_TYPE, TgiMetrics, VllmMetrics
from gpufleet.sim.types import (
    EngineListener,
    EngineStats,
    GenerationParams,
    RequestHandle,
    SimConfig,
)

log = logging.getLogger("gpufleet.sim")

ApiKind = Literal["vllm", "tgi"]
SHUTDOWN_TIMEOUT_S = 5.0


def hf_token_status(environ: Mapping[str, str]) -> str | None:
    """What the simulator says at start-up about the Hugging Face token file HF_TOKEN_PATH names
    (None when it names none): whether this process can read it and the token's length, never
    the token. A real engine reads the file when it downloads; the simulator downloads nothing.
    """
    path = environ.get("HF_TOKEN_PATH")
    if not path:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return f"HF_TOKEN_PATH {path}: no such file"
    except PermissionError:
        try:
            info = os.stat(path)
            what = f"mode {info.st_mode & 0o777:04o}, owner uid {info.st_uid}"
        except OSError as exc:
            what = exc.strerror or str(exc)
        return f"HF_TOKEN_PATH {path}: present but unreadable by uid {os.getuid()} ({what})"
    except (OSError, UnicodeDecodeError) as exc:
        return f"HF_TOKEN_PATH {path}: cannot be read ({type(exc).__name__})"
    return f"HF_TOKEN_PATH {path}: readable, a token of {len(token)} characters"


class Engine(Protocol):
    """What the server needs of the engine (engine.AsyncEngine implements it)."""

    extra_step_delay_s: float

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def submit(self, request_id: str, params: GenerationParams) -> RequestHandle: ...

    def stats(self) -> EngineStats: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


@dataclass
class ServeOptions:
    """Everything `gpufleet sim serve` was told, resolved (see cli/sim_cmd.py for the flags)."""

    config: SimConfig
    profile: str  # the profile's name (metrics label, logs)
    served_names: tuple[str, ...] = ()
    api: ApiKind = "vllm"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    faults: FaultSettings = field(default_factory=FaultSettings)
    max_concurrent_requests: int = 128  # TGI only
    cache_dtype: str = "auto"
    num_gpu_blocks_override: int | None = None
    token_log_tokens: int = 200_000
    profile_source: str | None = None  # what load_profile is given: a name or a YAML path (default: profile)

    def __post_init__(self) -> None:
        if not self.served_names:
            self.served_names = (self.config.served_model_name,)

    @property
    def max_input_tokens(self) -> int:
        return self.config.max_model_len - 1

    @property
    def max_total_tokens(self) -> int:
        return self.config.max_model_len


def _ignore(value: float) -> None:
    return None


class SimState:
    """What the HTTP surfaces share: the engine, its configuration, metrics, faults and token log."""

    def __init__(self, options: ServeOptions, engine: Engine, faults: FaultController, token_log: TokenLog,
                 vllm_metrics: VllmMetrics | None, tgi_metrics: TgiMetrics | None) -> None:
        self.options = options
        self.config = options.config
        self.served_names = options.served_names
        self.engine = engine
        self.faults = faults
        self.token_log = token_log
        self.vllm_metrics = vllm_metrics
        self.tgi_metrics = tgi_metrics
        self.metrics_content_type = CONTENT_TYPE
        self._numbers = itertools.count(1)
        # per-token observations the surfaces make while streaming; TGI has no such series
        self.observe_ttft: Callable[[float], None] = vllm_metrics.ttft.observe if vllm_metrics else _ignore
        self.observe_itl: Callable[[float], None] = vllm_metrics.itl.observe if vllm_metrics else _ignore

    def healthy(self) -> bool:
        return not self.faults.engine_dead and not self.faults.crashed

    def render_metrics(self) -> bytes:
        if self.vllm_metrics is not None:
            return self.vllm_metrics.render()
        assert self.tgi_metrics is not None
        return self.tgi_metrics.render()

    def next_request_number(self) -> int:
        return next(self._numbers)


class SimServer:
    """Build, start and stop one simulator server; see the module docstring."""

    def __init__(self, options: ServeOptions) -> None:
        from gpufleet.sim.engine import AsyncEngine
        from gpufleet.sim.profile import load_profile

        self.options = options
        self.profile = load_profile(options.profile_source or options.profile)
        config = options.config
        clock = time.monotonic  # the engine's schedule and the token log's write times share it
        if options.api == "tgi":
            vllm_metrics = None
            tgi_metrics: TgiMetrics | None = TgiMetrics(
                config, self._stats, profile=options.profile, max_input_tokens=options.max_input_tokens,
                max_total_tokens=options.max_total_tokens, clock=clock)
            metrics_listener: EngineListener = tgi_metrics
        else:
            tgi_metrics = None
            vllm_metrics = VllmMetrics(config, self._stats, profile=options.profile, api=options.api,
                                       cache_dtype=options.cache_dtype,
                                       num_gpu_blocks_override=options.num_gpu_blocks_override, clock=clock)
            metrics_listener = vllm_metrics
        self.engine: Engine = AsyncEngine(config, self.profile, clock=clock, listener=metrics_listener)
        self.faults = FaultController(options.faults, self.engine, on_crash=self._crashed, seed=config.seed,
                                      clock=clock)
        self.token_log = TokenLog(options.token_log_tokens)
        self.state = SimState(options, self.engine, self.faults, self.token_log, vllm_metrics, tgi_metrics)
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._stopping: asyncio.Event | None = None
        self.exit_code = 0
        self.port: int | None = None

    def _stats(self) -> EngineStats:
        return self.engine.stats()

    def _build_app(self) -> web.Application:
        options = self.options
        middlewares = []
        if options.api_key:
            if options.api == "tgi":
                middlewares.append(tgi_api.tgi_api_key_middleware(options.api_key))
            else:
                middlewares.append(vllm_api.api_key_middleware(options.api_key, vllm_api.vllm_protected,
                                                               vllm_api.vllm_unauthorized))
        app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
        if options.api == "tgi":
            tgi_api.add_routes(app, self.state, options.max_concurrent_requests, options.max_input_tokens,
                               options.max_total_tokens)
        else:
            vllm_api.add_routes(app, self.state)
        add_admin_routes(app, self.faults, self.token_log)
        return app

    @property
    def startup_delay_s(self) -> float:
        delay = self.options.faults.startup_delay_s
        return float(self.profile.startup_s if delay is None else delay)

    async def start(self) -> None:
        """Start the engine, wait out the simulated load, then bind (connection refused until then)."""
        options = self.options
        self._stopping = asyncio.Event()
        log.warning(
            "gpufleet-sim %s: this is a SIMULATED %s engine (profile %s, model %s), not an inference engine; "
            "loading for %.1f s before binding %s:%d",
            __version__, "TGI" if options.api == "tgi" else "vLLM", options.profile, options.config.model,
            self.startup_delay_s, options.host, options.port,
        )
        token_line = hf_token_status(os.environ)
        if token_line is not None:
            log.info("%s", token_line)
        await self.engine.start()
        if self.startup_delay_s > 0:
            # a stop during the load ends it: wait() then shuts down without ever binding
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.startup_delay_s)
            if self._stopping.is_set():
                return
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, options.host, options.port, backlog=2048)
        await self._site.start()
        addresses = self._runner.addresses
        self.port = addresses[0][1] if addresses else options.port
        self.faults.serving_started()
        log.info("gpufleet-sim serving on http://%s:%d (%s API)", options.host, self.port, options.api)

    def request_stop(self) -> None:
        """Ask `wait()` to stop the server gracefully (SIGTERM, SIGINT)."""
        if self._stopping is not None:
            self._stopping.set()

    def _crashed(self, reason: str) -> None:
        """A simulated engine death: drop every connection now and exit non-zero."""
        self.exit_code = CRASH_EXIT_CODE
        if self._runner is not None and self._runner.server is not None:
            for connection in self._runner.server.connections:
                if connection.transport is not None:
                    connection.transport.abort()
        self.request_stop()

    async def wait(self) -> int:
        """Serve until stopped or crashed, then shut down; the process exit status."""
        assert self._stopping is not None, "start() first"
        await self._stopping.wait()
        await self.stop()
        return self.exit_code

    async def stop(self) -> None:
        self.faults.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            if self.exit_code:
                await runner.shutdown()
            await runner.cleanup()
        await self.engine.stop()


async def serve(options: ServeOptions, install_signal_handlers: bool = True) -> int:
    """Run a server until SIGTERM/SIGINT (exit 0) or a simulated crash (exit 1)."""
    server = SimServer(options)
    if install_signal_handlers:
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
    # Everything built so far lives for the whole run: keep it out of the collector's scans, and
    # collect young objects less often, so collection pauses don't delay tokens past their time.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", options.host, options.port, exc)
        await server.engine.stop()
        return 1
    return await server.wait()
