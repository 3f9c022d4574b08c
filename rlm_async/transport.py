"""The wire: one abstract method, `complete(request) -> Completion`.

`OpenAITransport` speaks OpenAI-compatible chat completions (OpenAI, vLLM, SGLang,
llama.cpp's server, Ollama, the bundled simulator) with httpx and the standard `json`
module. `OpenAISDKTransport` does the same through the official `openai` SDK (2.x, on
httpx too: one HTTP stack), for users who want the SDK's own request handling.

Why the default does not go through the SDK: measured against the simulator at 200
requests in flight (`benchmarks/transport.py`), the SDK's parameter transformation and
pydantic parsing cost 0.7-0.9 ms of CPU per call on top of the HTTP work, most of the
budget of 1 ms of engine CPU per sub-call.

Both shard their connection pool over several `httpx.AsyncClient`s: httpcore's pool scans
every connection on every request event, so one pool with hundreds of connections in
flight costs O(N) per event, O(N^2) per fan-out (measured: several ms, up to tens of ms,
of CPU per request with one pool at 200 in flight; under 1 ms with 64 shards).

This is the only module that imports `openai` or `httpx`, and it translates their
exceptions into `rlm_async.exceptions` once, here. It never retries: the one retry layer
lives in the governor, and the SDK's own retries are off (`max_retries=0`).
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, NamedTuple, TypeVar

import httpx

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

__all__ = [
    "OpenAISDKTransport",
    "OpenAITransport",
    "ProbeResponse",
    "Transport",
    "parse_duration",
    "parse_rate_limit_headers",
]


class Transport(ABC):
    """Sends one chat-completion request and returns the completion, or raises a
    `TransportError` subclass. Implementations must be safe to call concurrently."""

    endpoint: str = "memory://"
    """Identifies the server, for rate-limit buckets and journal keys. Never holds a secret."""

    @abstractmethod
    async def complete(self, request: ModelRequest) -> Completion: ...

    async def probe(
        self, method: str, url: str, body: Mapping[str, Any] | None = None, *, timeout_s: float = 5.0
    ) -> ProbeResponse | None:
        """One small JSON request to the server beside chat completions (`GET /v1/models`,
        `POST /tokenize`), for identifying the server and counting tokens. `url` must be on
        the endpoint's own origin. `None` when the transport cannot probe (the default: test
        doubles, custom wires) or the server could not be reached; never raises for that."""
        return None

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


class ProbeResponse(NamedTuple):
    """What a probe got back: the status and the body as JSON (`None` if it was not JSON)."""

    status: int
    body: Any


def _same_origin(endpoint: str, url: str) -> bool:
    a, b = httpx.URL(endpoint), httpx.URL(url)
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


async def _probe(
    client: httpx.AsyncClient,
    endpoint: str,
    headers: Mapping[str, str],
    method: str,
    url: str,
    body: Mapping[str, Any] | None,
    timeout_s: float,
) -> ProbeResponse | None:
    if not _same_origin(endpoint, url):  # the key in `headers` goes only where it was meant to
        raise ValueError(f"probe {url} is not on the endpoint's origin {endpoint}")
    content = json.dumps(body).encode() if body is not None else None
    try:
        response = await client.request(
            method, url, content=content, headers=headers, timeout=httpx.Timeout(timeout_s)
        )
    except httpx.HTTPError:
        return None
    return ProbeResponse(response.status_code, _json_or_none(response.content))


_CONTEXT_LENGTH_HINTS = ("context_length_exceeded", "maximum context length", "context length")
DEFAULT_SHARDS = 64
_C = TypeVar("_C")


class _Shards(Generic[_C]):
    """Spreads requests over several pooled clients, so no one pool holds hundreds of
    connections. The least busy client wins, lowest index first: a trickle of calls (root
    turns, a one-at-a-time run) keeps reusing one warm keep-alive connection instead of
    rotating over cold pools and paying a TCP (and TLS) handshake per call."""

    def __init__(self, clients: list[_C]) -> None:
        self.clients = clients
        self._busy = [0] * len(clients)

    @contextmanager
    def use(self) -> Iterator[_C]:
        i = self._busy.index(min(self._busy))
        self._busy[i] += 1
        try:
            yield self.clients[i]
        finally:
            self._busy[i] -= 1


def _http_clients(shards: int, max_connections: int, timeout_s: float) -> list[httpx.AsyncClient]:
    per_shard = max(1, -(-max_connections // shards))
    # One TLS context for every shard: building one loads the CA bundle (~25 ms each).
    tls = httpx.create_ssl_context()
    return [
        httpx.AsyncClient(
            verify=tls,
            # Idle connections live 60 s (httpx's default is 5 s): a root turn that takes longer
            # than 5 s would otherwise find every connection closed.
            limits=httpx.Limits(
                max_connections=per_shard, max_keepalive_connections=per_shard, keepalive_expiry=60.0
            ),
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
        )
        for _ in range(shards)
    ]


def _resolve_key(endpoint: str, api_key: str | None, api_key_env: str | None) -> str | None:
    key = api_key or (os.environ.get(api_key_env) if api_key_env else None)
    if key:
        return key
    if not api_key_env or _is_loopback(endpoint):
        return None
    raise MissingAPIKey(
        f"no API key for {endpoint}: set the environment variable {api_key_env} "
        "(or pass api_key=..., or api_key_env=None for a server that needs no key)"
    )


def _is_loopback(url: str) -> bool:
    host = httpx.URL(url).host
    return host in ("localhost", "::1") or host.startswith("127.")


def _body(request: ModelRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [m.to_dict() for m in request.messages],
    }
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.prompt_cache_key is not None:
        body["prompt_cache_key"] = request.prompt_cache_key
    return body


class OpenAITransport(Transport):
    """OpenAI-compatible chat completions over httpx, JSON in and out.

    The key comes from `api_key` or from the environment variable named by `api_key_env`;
    a server on loopback, or `api_key_env=None`, needs none.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 600.0,
        max_connections: int = 1000,
        shards: int = DEFAULT_SHARDS,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.endpoint = base_url.rstrip("/")
        self._url = self.endpoint + "/chat/completions"
        key = _resolve_key(self.endpoint, api_key, api_key_env)
        self._headers = {
            "content-type": "application/json",
            "accept": "application/json",
            **(extra_headers or {}),
        }
        if key:
            self._headers["authorization"] = f"Bearer {key}"
        self._shards = _Shards(_http_clients(shards, max_connections, timeout_s))

    async def complete(self, request: ModelRequest) -> Completion:
        content = json.dumps(_body(request), ensure_ascii=False).encode()
        try:
            with self._shards.use() as client:
                response = await client.post(self._url, content=content, headers=self._headers)
        except httpx.TimeoutException:
            raise ConnectionFailed(f"request to {self.endpoint} timed out") from None
        except httpx.ConnectError as exc:
            raise ConnectionFailed(
                f"cannot reach {self.endpoint} ({exc}); check base_url and that the server is running"
            ) from None
        except httpx.HTTPError as exc:  # reset, dropped mid-body, protocol errors
            raise ConnectionFailed(
                f"connection to {self.endpoint} failed: {type(exc).__name__}: {exc}"
            ) from None
        if response.status_code >= 400:
            raise _status_error(
                response.status_code,
                response.headers,
                _json_or_none(response.content),
                response.text[:200],
                self.endpoint,
                request.model,
            )
        data = _json_or_none(response.content)
        if not isinstance(data, dict):
            raise ServerError(f"malformed response from {self.endpoint}: body is not a JSON object")
        return _parse_completion(data, response.headers, request.model, self.endpoint)

    async def probe(
        self, method: str, url: str, body: Mapping[str, Any] | None = None, *, timeout_s: float = 5.0
    ) -> ProbeResponse | None:
        with self._shards.use() as client:
            return await _probe(client, self.endpoint, self._headers, method, url, body, timeout_s)

    async def aclose(self) -> None:
        for client in self._shards.clients:
            await client.aclose()


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _parse_completion(
    data: dict[str, Any], headers: Mapping[str, str], model: str, endpoint: str
) -> Completion:
    try:
        choice = data["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content") or ""
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        u = Usage(
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            int(details.get("cached_tokens") or 0),
        )
        if not isinstance(text, str):
            raise TypeError("message content is not a string")
        return Completion(
            text=text,
            usage=u,
            model=data.get("model") or model,
            finish_reason=choice.get("finish_reason"),
            rate_limit=parse_rate_limit_headers(headers),
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ServerError(f"malformed response from {endpoint}: {type(exc).__name__}: {exc}") from None


def _status_error(
    code: int, headers: Mapping[str, str], body: Any, text: str, endpoint: str, model: str
) -> TransportError:
    detail = _error_detail(body) or text.strip() or "no detail"
    where = f"{endpoint} answered {code} for model {model!r}"
    if code == 429:
        return RateLimited(
            f"{where}: rate limited", status_code=code, retry_after=retry_after_seconds(headers)
        )
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
            f"{where}: prompt too long for the model's context window ({detail}); send smaller chunks",
            status_code=code,
        )
    return BadRequest(f"{where}: {detail}", status_code=code)


def _error_detail(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            parts = [str(err.get(k)) for k in ("code", "message") if err.get(k)]
            return ": ".join(parts)
        if isinstance(err, str):
            return err
    return ""


class OpenAISDKTransport(Transport):
    """OpenAI-compatible chat completions through the official `openai` SDK (2.x, httpx).

    Slower than `OpenAITransport` (the SDK transforms parameters and builds pydantic models
    for every call) and otherwise equivalent; use it where the SDK's own request handling
    is wanted. Same key rules, same sharded pool, same error translation.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 600.0,
        max_connections: int = 1000,
        shards: int = DEFAULT_SHARDS,
    ) -> None:
        import openai

        self._openai = openai
        self.endpoint = base_url.rstrip("/")
        key = self._key = _resolve_key(self.endpoint, api_key, api_key_env) or "unused"
        self._http = _http_clients(shards, max_connections, timeout_s)
        self._shards = _Shards(
            [
                openai.AsyncOpenAI(base_url=self.endpoint, api_key=key, max_retries=0, http_client=h)
                for h in self._http
            ]
        )

    async def complete(self, request: ModelRequest) -> Completion:
        openai = self._openai
        try:
            with self._shards.use() as client:
                raw = await client.chat.completions.with_raw_response.create(**_body(request))
            data = json.loads(raw.http_response.content)
        except openai.APIStatusError as exc:
            raise _status_error(
                exc.status_code,
                exc.response.headers,
                exc.body,
                exc.message or "",
                self.endpoint,
                request.model,
            ) from None
        except openai.APITimeoutError:
            raise ConnectionFailed(f"request to {self.endpoint} timed out") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise ConnectionFailed(
                f"cannot reach {self.endpoint} ({type(cause).__name__}: {cause}); "
                "check base_url and that the server is running"
            ) from None
        except ValueError as exc:
            raise ServerError(f"malformed response from {self.endpoint}: {exc}") from None
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"connection to {self.endpoint} failed: {exc}") from None
        if not isinstance(data, dict):
            raise ServerError(f"malformed response from {self.endpoint}: body is not a JSON object")
        return _parse_completion(data, raw.headers, request.model, self.endpoint)

    async def probe(
        self, method: str, url: str, body: Mapping[str, Any] | None = None, *, timeout_s: float = 5.0
    ) -> ProbeResponse | None:
        headers = {"content-type": "application/json", "authorization": f"Bearer {self._key}"}
        # Probes are rare and small: the first pooled client, not the SDK's request handling.
        return await _probe(self._http[0], self.endpoint, headers, method, url, body, timeout_s)

    async def aclose(self) -> None:
        for client in self._http:
            await client.aclose()
