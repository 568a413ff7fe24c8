"""`lanner serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn).

This process speaks HTTP, tokenizes and detokenizes; the engine core runs in a child
process (see engine/core_process.py), so HTTP work never stalls the device loop.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import lanner
from lanner.engine.async_llm import AsyncLLM, EngineDeadError
from lanner.engine.config import DEFAULT_MODEL_DIR, EngineConfig
from lanner.engine.data_parallel import make_engine
from lanner.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from lanner.entrypoints.openai.serving import OpenAIError, OpenAIServing, error_body
from lanner.metrics.prometheus import ServerMetrics

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "lanner-demo"


@dataclass
class ServerOptions:
    engine: dict[str, Any]  # LLM(...) keyword arguments
    served_model_names: list[str]
    api_key: str | None = None
    max_queued_requests: int | None = None
    data_parallel_size: int = 1  # engine cores, routed by data_parallel_policy
    data_parallel_policy: str = "cache_aware"


def default_model_name(model: str) -> str:
    return DEMO_MODEL_NAME if model == str(DEFAULT_MODEL_DIR) else model


def build_app(options: ServerOptions) -> FastAPI:
    config = EngineConfig.from_kwargs(**options.engine)
    metrics = ServerMetrics(options.served_model_names[0])
    engine = make_engine(config, metrics, options.data_parallel_size, options.data_parallel_policy)
    serving = OpenAIServing(
        engine, options.served_model_names, config.max_num_seqs, options.max_queued_requests
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # run_server starts the engine before uvicorn (so a failed start is one clear
        # error, not a lifespan traceback); anyone else serving the app gets it here.
        if engine.ready is None:
            await engine.start()
        logger.info("serving %s", ", ".join(options.served_model_names))
        try:
            yield
        finally:
            # Runs after uvicorn has drained in-flight requests (SIGTERM, Ctrl-C).
            await engine.shutdown()

    app = FastAPI(title="lanner", version=lanner.__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.serving = serving
    if options.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=options.api_key)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(part) for part in first.get("loc", ())]
        if first.get("type") == "json_invalid":
            message = f"malformed JSON in the request body: {first.get('ctx', {}).get('error')}"
            return JSONResponse(error_body(message, "BadRequestError", None, 400), 400)
        param = ".".join(loc[1:]) if loc[:1] == ["body"] else ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(err)
        if "input" in first and param:
            message += f" (got {json.dumps(first['input'], default=str)[:200]})"
        return JSONResponse(error_body(message, "BadRequestError", param, 400), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if err.status_code == 404 else "BadRequestError"
        return JSONResponse(
            error_body(str(err.detail), kind, None, err.status_code), err.status_code
        )

    @app.get("/health")
    async def health() -> Response:
        if engine.is_dead:
            return JSONResponse(
                error_body("the engine core is not running", "EngineDeadError", None, 503), 503
            )
        return Response(status_code=200)

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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        result = await serving.create_completion(body, raw.is_disconnected)
        return _respond(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        result = await serving.create_chat_completion(body, raw.is_disconnected)
        return _respond(result)

    return app


def _respond(result: dict[str, Any] | AsyncIterator[str]) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream")


class ApiKeyMiddleware:
    """Every endpoint but /health needs ``Authorization: Bearer <key>`` (pure ASGI, so
    streaming responses and disconnects pass through untouched)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/health" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        body = error_body(
            "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
            "AuthenticationError",
            None,
            401,
        )
        response = JSONResponse(body, status_code=401)
        await response(scope, receive, send)


def run_server(args: argparse.Namespace, engine_options: dict[str, Any]) -> int:
    """Serve until SIGTERM or Ctrl-C; in-flight requests finish first."""
    model = engine_options["model"]
    options = ServerOptions(
        engine=engine_options,
        served_model_names=args.served_model_name or [default_model_name(model)],
        api_key=args.api_key,
        max_queued_requests=args.max_queued_requests,
        data_parallel_size=getattr(args, "data_parallel_size", 1),
        data_parallel_policy=getattr(args, "data_parallel_policy", "cache_aware"),
    )
    if options.max_queued_requests is not None and options.max_queued_requests < 0:
        raise ValueError("--max-queued-requests must be >= 0")
    app = build_app(options)
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
        engine: AsyncLLM = app.state.engine
        try:
            await engine.start()
        except EngineDeadError as err:
            await engine.shutdown()
            print(f"lanner: error: {err}", file=sys.stderr)
            return 1
        await server.serve()
        return 0

    return asyncio.run(serve())
