"""`lanner serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn).

This process speaks HTTP and detokenizes; request bodies are parsed, rendered and
tokenized in worker processes (workers.py) and the engine core runs in a child process
(engine/core_process.py), so neither a hostile request nor the device loop stalls the
event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

import lanner
from lanner.engine.async_llm import AsyncLLM, EngineDeadError
from lanner.engine.config import DEFAULT_MODEL_DIR, EngineConfig
from lanner.engine.core_client import AsyncCoreClient
from lanner.engine.data_parallel import make_engine
from lanner.engine.startup import format_phases, seconds_since_process_start
from lanner.entrypoints.http_guards import (
    ApiKeyMiddleware,
    CatchAllMiddleware,
    HostCheckMiddleware,
    OpenAIError,
    api_key_from,
    default_allowed_hosts,
    error_body,
    read_body,
)
from lanner.entrypoints.openai.limits import ServerLimits
from lanner.entrypoints.openai.prepare import PrepareContext
from lanner.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from lanner.entrypoints.openai.serving import OpenAIServing
from lanner.entrypoints.openai.workers import PrepareWorkers
from lanner.metrics.prometheus import ServerMetrics
from lanner.model.tokenizer import longest_token_chars

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "lanner-demo"
_JSON_TYPES = ("application/json", "application/x-ndjson")


@dataclass
class ServerOptions:
    engine: dict[str, Any]  # LLM(...) keyword arguments
    served_model_names: list[str]
    api_key: str | None = None
    max_queued_requests: int | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    # tool_choice "auto": the model's tool-call format (--tool-call-parser), or None.
    tool_call_parser: str | None = None
    # Host header values answered; None answers any (see default_allowed_hosts).
    allowed_hosts: list[str] | None = None
    data_parallel_size: int = 1  # engine cores, routed by data_parallel_policy
    data_parallel_policy: str = "cache_aware"
    # /metrics names: lanner:* or, for dashboards built on vLLM's, vllm:*.
    metrics_prefix: str = "lanner"


def default_model_name(model: str) -> str:
    return DEMO_MODEL_NAME if model == str(DEFAULT_MODEL_DIR) else model


class _RequestPreparer:
    """Turns an HTTP request's body into a PreparedRequest in a worker process."""

    def __init__(self, engine: AsyncLLM, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        config = engine.config
        self.workers = PrepareWorkers(
            config.load.tokenizer or config.load.model,
            config.load.trust_remote_code,
            options.limits.prepare_workers,
            options.limits.prepare_timeout_s,
        )
        self.context: PrepareContext | None = None

    def set_engine_ready(self) -> None:
        limits = self.options.limits
        max_chars = limits.max_prompt_chars or (
            self.engine.max_model_len * longest_token_chars(self.engine.tokenizer)
        )
        self.context = PrepareContext(
            tuple(self.options.served_model_names),
            self.engine.max_model_len,
            self.engine.ready.vocab_size,  # type: ignore[union-attr]
            limits,
            max_chars,
            self.engine.ready.model_max_len,  # type: ignore[union-attr]
            tuple(self.engine.generation_defaults.items()),
            self.options.tool_call_parser,
        )

    async def prepare(self, kind: str, request: Request) -> Any:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and content_type not in _JSON_TYPES and not content_type.endswith("+json"):
            # A browser sends text/plain or form bodies cross-site without asking first;
            # JSON only means a page on another site cannot make a visitor's browser post.
            raise OpenAIError(
                415,
                f"the request body must be JSON (Content-Type: application/json), got "
                f"{content_type[:100]!r}",
                "UnsupportedMediaType",
            )
        limit = self.options.limits.max_request_body_bytes
        raw = await read_body(request, limit, "--max-request-body-bytes")
        if self.context is None:
            raise OpenAIError(503, "the server is still starting", "ServiceUnavailable")
        return await self.workers.prepare(kind, raw, self.context)


def build_app(options: ServerOptions, core_client: AsyncCoreClient | None = None) -> FastAPI:
    """``core_client``: an engine core already launched for ``options.engine`` (one
    core: data parallelism starts its own)."""
    config = core_client.config if core_client else EngineConfig.from_kwargs(**options.engine)
    metrics = ServerMetrics(options.served_model_names[0], options.metrics_prefix)
    engine = (
        AsyncLLM(config, stat_logger=metrics, client=core_client)
        if core_client is not None
        else make_engine(config, metrics, options.data_parallel_size, options.data_parallel_policy)
    )
    serving = OpenAIServing(
        engine, options.served_model_names, config.max_num_seqs, options.max_queued_requests
    )
    preparer = _RequestPreparer(engine, options)
    watchers: list[asyncio.Future[None]] = []

    async def start() -> None:
        """Start the engine core and the request workers together."""
        phases = {"process start to server start (imports)": seconds_since_process_start() or 0}
        began = time.perf_counter()

        async def timed(name: str, starting: Any) -> None:
            await starting
            phases[name] = time.perf_counter() - began

        results = await asyncio.gather(
            timed("engine core ready (tokenizer loaded)", engine.start()),
            timed("request workers ready", preparer.workers.start()),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        preparer.set_engine_ready()
        logger.info("startup (server): %s", format_phases(phases))
        # What is alive now lives as long as the server: out of the collector's view, a
        # full collection scans only requests' objects. Otherwise each one held the event
        # loop ~170 ms (the imported libraries' 380k objects; the CPU machine).
        gc.collect()
        gc.freeze()
        watchers.append(asyncio.ensure_future(metrics.watch_event_loop()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # run_server starts the engine before uvicorn (so a failed start is one clear
        # error, not a lifespan traceback); anyone else serving the app gets it here.
        if engine.ready is None:
            await start()
        logger.info("serving %s", ", ".join(options.served_model_names))
        try:
            yield
        finally:
            # Runs after uvicorn has drained in-flight requests (SIGTERM, Ctrl-C).
            for watcher in watchers:
                watcher.cancel()
            preparer.workers.shutdown()
            await engine.shutdown()

    app = FastAPI(title="lanner", version=lanner.__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.serving = serving
    app.state.start = start
    app.state.workers = preparer.workers
    # Added innermost first: errors outermost, so nothing below escapes as a bare 500.
    if options.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=options.api_key)
    if options.allowed_hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed_hosts=options.allowed_hosts)
    app.add_middleware(CatchAllMiddleware)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        # No route parses a body through FastAPI; query parameters could still fail.
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())) or None
        message = f"{param}: {first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(message, "BadRequestError", param, 400), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(
            err.status_code, "BadRequestError"
        )
        return JSONResponse(
            error_body(str(err.detail), kind, None, err.status_code),
            err.status_code,
            headers=err.headers,  # 405 carries Allow
        )

    @app.get("/health")
    async def health() -> Response:
        if engine.is_dead:
            return JSONResponse(
                error_body("the engine core is not running", "EngineDeadError", None, 503), 503
            )
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": lanner.__version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "lanner",
                    "root": config.load.model,
                    "parent": None,
                    "max_model_len": engine.max_model_len,
                }
                for name in options.served_model_names
            ],
        }

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict[str, bool]:
        return {"emptied": await engine.reset_prefix_cache()}

    @app.post("/tokenize", openapi_extra=_json_body(TokenizeCompletionRequest, TokenizeChatRequest))
    async def tokenize(raw: Request) -> Response:
        """vLLM's: a prompt (or messages, through the chat template) as token ids."""
        return JSONResponse(await preparer.prepare("tokenize", raw))

    @app.post("/detokenize", openapi_extra=_json_body(DetokenizeRequest))
    async def detokenize(raw: Request) -> Response:
        return JSONResponse(await preparer.prepare("detokenize", raw))

    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(raw: Request) -> Response:
        request = await preparer.prepare("completion", raw)
        return _respond(await serving.create_completion(request, raw.is_disconnected))

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(raw: Request) -> Response:
        request = await preparer.prepare("chat", raw)
        return _respond(await serving.create_chat_completion(request, raw.is_disconnected))

    app.openapi = lambda: _openapi(app, preparer.context)  # type: ignore[method-assign]
    return app


def _json_body(*models: type) -> dict[str, Any]:
    """The route's request body (one of ``models``), for /openapi.json: routes read the
    body themselves (in a worker), so FastAPI cannot see its model."""
    refs = [{"$ref": f"#/components/schemas/{model.__name__}"} for model in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    }


def _openapi(app: FastAPI, context: PrepareContext | None) -> dict[str, Any]:
    """The schema, with this server's own bounds once the engine is up (its model names,
    n, context length and logprobs limits), so a client or a fuzzer reads what holds."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _, definitions = models_json_schema(
        [
            (m, "validation")
            for m in (
                CompletionRequest,
                ChatCompletionRequest,
                TokenizeCompletionRequest,
                TokenizeChatRequest,
                DetokenizeRequest,
            )
        ],
        ref_template="#/components/schemas/{model}",
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(definitions.get("$defs", {}))
    if context is None:
        return schema  # not cached: the bounds come once the engine is up
    bounds = {
        "model": {"enum": [*context.served_model_names, None]},
        "n": {"maximum": context.limits.max_n},
        "max_tokens": {"maximum": context.max_model_len - 1},
        "max_completion_tokens": {"maximum": context.max_model_len - 1},
        "logprobs": {"maximum": context.limits.max_logprobs},
        "top_logprobs": {"maximum": context.limits.max_logprobs},
        "prompt_logprobs": {"maximum": context.limits.max_logprobs},
    }
    for name in (CompletionRequest.__name__, ChatCompletionRequest.__name__):
        properties = components[name]["properties"]
        for field_name, extra in bounds.items():
            if field_name in properties and properties[field_name].get("type") != "boolean":
                properties[field_name].update(extra)
    app.openapi_schema = schema
    return schema


def _respond(result: dict[str, Any] | AsyncIterator[str]) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream")


def run_server(
    args: argparse.Namespace,
    engine_options: dict[str, Any],
    limits: ServerLimits,
    core_client: AsyncCoreClient | None = None,
) -> int:
    """Serve until SIGTERM or Ctrl-C; in-flight requests finish first."""
    model = engine_options["model"]
    if args.allowed_hosts is None:
        allowed = default_allowed_hosts(args.host)
    elif "*" in args.allowed_hosts:
        allowed = None
    else:
        allowed = list(args.allowed_hosts)
    options = ServerOptions(
        engine=engine_options,
        served_model_names=args.served_model_name or [default_model_name(model)],
        api_key=api_key_from(args.api_key),
        max_queued_requests=args.max_queued_requests,
        limits=limits,
        allowed_hosts=allowed,
        tool_call_parser=args.tool_call_parser,
        data_parallel_size=getattr(args, "data_parallel_size", 1),
        data_parallel_policy=getattr(args, "data_parallel_policy", "cache_aware"),
        metrics_prefix=getattr(args, "metrics_prefix", "lanner"),
    )
    if options.max_queued_requests is not None and options.max_queued_requests < 0:
        raise ValueError("--max-queued-requests must be >= 0")
    app = build_app(options, core_client)
    timeout = args.timeout_graceful_shutdown
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level.lower(),
            timeout_graceful_shutdown=int(timeout) if timeout is not None else None,
            timeout_keep_alive=5,
        )
    )

    async def serve() -> int:
        try:
            await app.state.start()
        except (EngineDeadError, ValueError, RuntimeError) as err:
            app.state.workers.shutdown()
            await app.state.engine.shutdown()
            print(f"lanner: error: {err}", file=sys.stderr)
            return 1
        await server.serve()
        return 0

    return asyncio.run(serve())
