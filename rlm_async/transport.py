"""The wire: one abstract method, `complete(request) -> Completion`.

`OpenAITransport` speaks OpenAI-compatible chat completions (OpenAI, vLLM, SGLang,
llama.cpp's server, Ollama, the bundled simulator). It is the only module that imports
`openai` or `httpx`, and it translates their exceptions into `rlm_async.exceptions` once,
here. It never retries: the SDK's own retries are off (`max_retries=0`) because the one
retry layer lives in the governor.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import httpx
import openai

from ._types import Completion, ModelRequest, RateLimitInfo, Usage
from .exceptions import (
    AuthenticationFailed,
    BadRequest,
    ConnectionFailed,
    ContextLengthExceeded,
    MissingAPIKey,
    ModelNotFound,
    RateLimited,
    ServerError,
    TransportError,
)

__all__ = ["OpenAITransport", "Transport", "parse_duration", "parse_rate_limit_headers"]


class Transport(ABC):
    """Sends one chat-completion request and returns the completion, or raises a
    `TransportError` subclass. Implementations must be safe to call concurrently."""

    endpoint: str = "memory://"
    """Identifies the server, for rate-limit buckets and journal keys. Never holds a secret."""

    @abstractmethod
    async def complete(self, request: ModelRequest) -> Completion: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing
        """Release connections. Safe to call twice."""


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str | None) -> float | None:
    """Parse a Go duration as OpenAI sends in `x-ratelimit-reset-*` ("12ms", "6m0s", "1.5s")."""
    if not text:
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitInfo | None:
    """Read OpenAI's `x-ratelimit-*` headers; `None` when the server sent none."""
    if not any(k.lower().startswith("x-ratelimit-") for k in headers):
        return None
    return RateLimitInfo(
        limit_requests=_int_header(headers, "x-ratelimit-limit-requests"),
        remaining_requests=_int_header(headers, "x-ratelimit-remaining-requests"),
        reset_requests_s=parse_duration(headers.get("x-ratelimit-reset-requests")),
        limit_tokens=_int_header(headers, "x-ratelimit-limit-tokens"),
        remaining_tokens=_int_header(headers, "x-ratelimit-remaining-tokens"),
        reset_tokens_s=parse_duration(headers.get("x-ratelimit-reset-tokens")),
    )


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """`retry-after-ms` wins over `retry-after` (seconds), as in OpenAI's SDK."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    return parse_duration(headers.get("retry-after"))


_CONTEXT_LENGTH_HINTS = ("context_length_exceeded", "maximum context length", "context length")


class OpenAITransport(Transport):
    """OpenAI-compatible chat completions over one pooled `httpx.AsyncClient`.

    The key comes from `api_key` or, by default, from the environment variable named by
    `api_key_env`; a server on loopback needs no key.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 600.0,
        max_connections: int = 1000,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.endpoint = base_url.rstrip("/")
        key = api_key or (os.environ.get(api_key_env) if api_key_env else None)
        if not key:
            if _is_loopback(self.endpoint):
                key = "unused-on-loopback"
            else:
                raise MissingAPIKey(
                    f"no API key for {self.endpoint}: set the environment variable "
                    f"{api_key_env or 'OPENAI_API_KEY'} (or pass api_key=...)"
                )
        # One pool for the whole process' calls to this endpoint. Keep-alive matters: a
        # 1000-way fan-out must not open 1000 fresh connections per wave.
        self._http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
        )
        self._client = openai.AsyncOpenAI(
            base_url=self.endpoint,
            api_key=key,
            max_retries=0,
            http_client=self._http,
            default_headers=dict(extra_headers or {}),
        )

    async def complete(self, request: ModelRequest) -> Completion:
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": [m.to_dict() for m in request.messages],
        }
        if request.max_tokens is not None:
            kwargs["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.prompt_cache_key is not None:
            kwargs["prompt_cache_key"] = request.prompt_cache_key
        try:
            raw = await self._client.chat.completions.with_raw_response.create(**kwargs)
            parsed = raw.parse()
        except openai.APIStatusError as exc:
            raise _translate_status(exc, self.endpoint, request.model) from None
        except openai.APITimeoutError:
            raise ConnectionFailed(f"request to {self.endpoint} timed out") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise ConnectionFailed(
                f"cannot reach {self.endpoint} ({type(cause).__name__}: {cause}); "
                "check base_url and that the server is running"
            ) from None
        except (ValueError, TypeError, KeyError) as exc:  # a body that is not a completion
            raise ServerError(f"malformed response from {self.endpoint}: {exc}") from None
        except httpx.HTTPError as exc:  # raised while reading a body the SDK did not wrap
            raise ConnectionFailed(f"connection to {self.endpoint} failed: {exc}") from None
        return _to_completion(parsed, raw.headers, request.model, self.endpoint)

    async def aclose(self) -> None:
        await self._http.aclose()


def _is_loopback(url: str) -> bool:
    host = httpx.URL(url).host
    return host in ("localhost", "::1") or host.startswith("127.")


def _to_completion(parsed: Any, headers: Mapping[str, str], model: str, endpoint: str) -> Completion:
    choices = getattr(parsed, "choices", None)
    if not choices:
        raise ServerError(f"malformed response from {endpoint}: no choices")
    choice = choices[0]
    text = choice.message.content if choice.message is not None else None
    usage = parsed.usage
    if usage is None:
        u = Usage()
    else:
        details = getattr(usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) or 0
        u = Usage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0), int(cached))
    return Completion(
        text=text or "",
        usage=u,
        model=getattr(parsed, "model", None) or model,
        finish_reason=choice.finish_reason,
        rate_limit=parse_rate_limit_headers(headers),
    )


def _translate_status(exc: openai.APIStatusError, endpoint: str, model: str) -> TransportError:
    code = exc.status_code
    headers = exc.response.headers
    detail = _error_detail(exc)
    where = f"{endpoint} answered {code} for model {model!r}"
    if code == 429:
        return RateLimited(f"{where}: rate limited", status_code=code, retry_after=retry_after_seconds(headers))
    if code in (408, 409) or code >= 500:
        return ServerError(f"{where}: {detail}", status_code=code, retry_after=retry_after_seconds(headers))
    if code in (401, 403):
        return AuthenticationFailed(
            f"{where}: {detail}; check the API key in your environment", status_code=code
        )
    if code == 404:
        return ModelNotFound(
            f"{where}: {detail}; check the model name (GET {endpoint}/models lists them)", status_code=code
        )
    if any(h in detail.lower() for h in _CONTEXT_LENGTH_HINTS):
        return ContextLengthExceeded(
            f"{where}: prompt too long for the model's context window ({detail}); "
            "send smaller chunks",
            status_code=code,
        )
    return BadRequest(f"{where}: {detail}", status_code=code)


def _error_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            parts = [str(err.get(k)) for k in ("code", "message") if err.get(k)]
            if parts:
                return ": ".join(parts)
    return exc.message or "no detail"
