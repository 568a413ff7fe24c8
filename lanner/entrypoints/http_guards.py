"""HTTP guards for lanner's servers (`lanner serve` and `lanner router`): OpenAI-style
errors, the API key check, the Host check (against DNS rebinding), a bounded request body
and the last-resort handler of unexpected errors. Pure ASGI over Starlette, no engine
imports, so the router stays light."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.requests import ClientDisconnect, Request

logger = logging.getLogger(__name__)

API_KEY_ENV = "LANNER_API_KEY"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def error_body(message: str, error_type: str, param: str | None, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class OpenAIError(Exception):
    """An error the client gets as ``{"error": {message, type, param, code}}`` with
    ``status`` (picklable: request workers raise it in their own processes)."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, error_type, param, headers)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.status)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "BadRequestError", param)


async def send_json(
    send: Any, status: int, body: Any, headers: dict[str, str] | None = None
) -> None:
    """A whole JSON response over raw ASGI."""
    payload = json.dumps(body).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def api_key_from(flag_value: str | None) -> str | None:
    """--api-key, else $LANNER_API_KEY (which keeps the key out of the process list)."""
    return flag_value or os.environ.get(API_KEY_ENV) or None


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
        message = "missing or wrong API key; send the header 'Authorization: Bearer <key>'"
        body = error_body(message, "AuthenticationError", None, 401)
        await send_json(send, 401, body, {"WWW-Authenticate": "Bearer"})


def default_allowed_hosts(bound_host: str) -> list[str] | None:
    """Bound to loopback, only loopback names may appear in Host (a web page that
    rebinds its own name to 127.0.0.1 cannot reach us); bound elsewhere, any."""
    if bound_host == "localhost":
        return list(LOOPBACK_NAMES)
    try:
        loopback = ipaddress.ip_address(bound_host).is_loopback
    except ValueError:
        return None
    return sorted({*LOOPBACK_NAMES, bound_host}) if loopback else None


def host_name(header: str) -> str:
    """'example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheckMiddleware:
    """Refuses requests whose Host header names no allowed host ('*' allows all)."""

    def __init__(self, app: Any, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed = {host_name(h) for h in allowed_hosts}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or "*" in self.allowed:
            await self.app(scope, receive, send)
            return
        raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host_name(raw) in self.allowed:
            await self.app(scope, receive, send)
            return
        message = (
            f"the Host header {raw[:100]!r} is not allowed here; allowed: "
            f"{sorted(self.allowed)} (change them with --allowed-hosts)"
        )
        await send_json(send, 400, error_body(message, "BadRequestError", None, 400))


async def read_body(request: Request, max_bytes: int, flag: str) -> bytes:
    """The request body, refused with 413 once it passes ``max_bytes`` (before reading it
    all when Content-Length says so; chunked uploads are counted as they arrive). ``flag``
    is the option that sets the limit, for the message."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes, flag)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes, flag)
        chunks.append(chunk)
    return b"".join(chunks)


async def receive_body(scope: dict, receive: Any, max_bytes: int, flag: str) -> bytes:
    """read_body for plain ASGI, where building a Request for it would be the only use
    of one (the router's forwarded endpoints); raises ClientDisconnect as Starlette does."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > max_bytes:
            raise _too_large(int(value), max_bytes, flag)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes, flag)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(size: int, max_bytes: int, flag: str) -> OpenAIError:
    return OpenAIError(
        413,
        f"the request body has at least {size} bytes, more than the {max_bytes} allowed ({flag})",
        "RequestTooLargeError",
        headers={"Connection": "close"},
    )


class CatchAllMiddleware:
    """Every exception nothing below handled becomes an OpenAI-style 500 (no paths, no
    input echoed), logged with its traceback and an error id; the connection stays
    usable. Starlette's own last-resort handler would re-raise, and uvicorn then drops
    the connection, so the client's next request on it would fail too."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = ended = False

        async def tracked_send(message: dict) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:  # noqa: BLE001 - the one place unexpected errors end up
            error_id = uuid.uuid4().hex[:12]
            logger.exception(
                "unhandled error in %s %s (error id %s)",
                scope.get("method"),
                scope.get("path"),
                error_id,
            )
            if started:
                # The status line is out: end the body, so the framing stays intact.
                if not ended:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            message = f"internal server error (error id {error_id}; the server log has details)"
            await send_json(send, 500, error_body(message, "InternalServerError", None, 500))
