"""The server's error type and OpenAI's error body: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from typing import Any


class OpenAIError(Exception):
    """An error the client gets as an OpenAI error body with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, error_type, param, headers)  # picklable as is
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.status)


def error_body(message: str, error_type: str, param: str | None, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "BadRequestError", param)
