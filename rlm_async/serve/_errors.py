"""Errors a client gets, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`
with the status that says what to do (400 fix the request, 401 send a key, 404 no such
thing, 413 smaller body, 429 retry later, 503 try another server)."""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "error_body"]

_TYPES = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "unavailable"),
}


class APIError(Exception):
    """Raised by a handler; the app turns it into the response. The message is for the
    client: it never holds a key or a stack."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind, default_code = _TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}
