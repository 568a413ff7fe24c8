"""HTTP guards for lanner's servers: OpenAI-style error bodies, the API key check, the
Host check (against DNS rebinding) and a bounded request body. Pure ASGI over Starlette,
no engine imports, so the router stays light."""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request

API_KEY_ENV = "LANNER_API_KEY"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def error_body(message: str, error_type: str, param: str | None, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class HTTPError(Exception):
    """An error the client gets as ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.status)


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
        await send_json(send, 401, error_body(message, "AuthenticationError", None, 401))


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


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 once it passes `max_bytes` (before reading it
    all when Content-Length says so)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, max_bytes: int) -> HTTPError:
    return HTTPError(
        413,
        f"the request body has at least {size} bytes, more than the {max_bytes} allowed "
        f"(--max-body-bytes)",
        "RequestTooLargeError",
    )
