"""The wire: one abstract method, `complete(request) -> Completion`.

`OpenAITransport` speaks OpenAI-compatible chat completions (OpenAI, vLLM, SGLang,
llama.cpp's server, Ollama, the bundled simulator) with orjson bodies: over `https://` on
aiohttp, over plain `http://` (a model server on loopback or a private network) on the lean
client in `_wire`, which sends the same requests for about 40 % less CPU each.
`OpenAISDKTransport` does the same through the official `openai` SDK (2.x), whose httpx
client runs on aiohttp too (`httpx-aiohttp`, the SDK's own `DefaultAioHttpClient`): one
HTTP stack, aiohttp's, with httpx only as the API the SDK is written against.

Why aiohttp: the engine spends its CPU on one event loop, serially, so at a fan-out of
thousands the client's CPU per request is the critical path. Measured with
`benchmarks/transport.py` (client CPU per request, hundreds in flight, 20K-character
prompts): httpx on its own httpcore transport costs several times what aiohttp does, and
its pool scans every connection on every request event (O(N) per event). aiohttp's
connector keeps its pool in dicts and parses HTTP in C. orjson encodes the 10-50 KB
request bodies several times faster than `json`. The README's library table has the numbers.
What aiohttp still costs, its layers around each request, is what `_wire` leaves out where
TLS, proxies and redirects are not needed (`wire="aiohttp"` keeps aiohttp for those too).

Why the default does not go through the SDK: its parameter transformation and pydantic
parsing cost more CPU per call than all of the rest of the wire.

Connections: one pool per transport, as large as the process's descriptor budget
(`_descriptors.connection_budget`: the soft RLIMIT_NOFILE is raised toward the hard one
first); requests beyond it wait in the pool for a connection, never fail with EMFILE.

aiohttp (and `_wire`) are asyncio-only: these transports need anyio's asyncio backend
(uvloop included). This is the only module that imports `aiohttp`, `httpx`, `openai` or
`_wire`, and it translates their exceptions into `rlm_async.exceptions` once, here. It
never retries: the one retry layer lives in the governor, and the SDK's own retries are
off (`max_retries=0`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

import aiohttp
import anyio
import orjson
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection
from yarl import URL

from ._descriptors import connection_budget
from ._text import decode_utf8, scrub
from ._types import Completion, ModelRequest, RateLimitInfo, Usage
from ._version import __version__
from ._wire import HttpPool, WireError, request_head
from .exceptions import (
    AuthenticationFailed,
    BadRequest,
    ConfigError,
    ConnectionFailed,
    ContextLengthExceeded,
    MissingAPIKey,
    ModelNotFound,
    RateLimited,
    ServerError,
    TransportError,
)

__all__ = [
    "Encoded",
    "OpenAISDKTransport",
    "OpenAITransport",
    "ProbeResponse",
    "Transport",
    "parse_duration",
    "parse_rate_limit_headers",
    "require_api_key",
]


class Encoded:
    """A request's body made before the request may be sent (`Transport.encode`), e.g. for a
    fan-out's followers while its warm-up call is in flight. It is sent once and let go of
    then (`take`), so it is not held while the answer is awaited; a retry encodes anew."""

    __slots__ = ("_body",)

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    @property
    def size(self) -> int:
        """Bytes held (0 once taken)."""
        return 0 if self._body is None else len(self._body)

    def take(self) -> bytes | None:
        """The body, once; `None` after that."""
        body, self._body = self._body, None
        return body


class Transport(ABC):
    """Sends one chat-completion request and returns the completion, or raises a
    `TransportError` subclass. Implementations must be safe to call concurrently."""

    endpoint: str = "memory://"
    """Identifies the server, for rate-limit buckets and journal keys. Never holds a secret."""

    @abstractmethod
    async def complete(self, request: ModelRequest) -> Completion: ...

    def encode(self, request: ModelRequest) -> Encoded | None:
        """`request`'s body, made now to be sent later by `complete_encoded`; `None` (the
        default) where the transport has nothing to make ahead. Must not send anything."""
        return None

    async def complete_encoded(self, request: ModelRequest, encoded: Encoded) -> Completion:
        """`complete`, sending the body `encode` made for this `request` if it was not sent
        yet. The default ignores it."""
        return await self.complete(request)

    async def preconnect(self, n: int) -> int:
        """Open up to `n` connections to the server now and leave them idle, for requests
        about to be sent (a fan-out's followers, while their warm-up is in flight); returns
        how many are ready. Sends no request. The default (test doubles, custom wires) opens
        nothing and returns 0. Cancelled, it keeps what it opened, and ends promptly: the
        followers are released only once it has ended, to find those connections."""
        return 0

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


_CONTEXT_LENGTH_HINTS = ("context_length_exceeded", "maximum context length", "context length")


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


def require_api_key(endpoint: str, api_key: str | None, api_key_env: str | None) -> None:
    """Raise `MissingAPIKey` (naming the variable to set) where `OpenAITransport` would have
    no key for `endpoint`: what `RLM(...)` checks at construction."""
    _resolve_key(endpoint.rstrip("/"), api_key, api_key_env)


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _pool_size(max_connections: int | None) -> int:
    return connection_budget().connections if max_connections is None else max(1, max_connections)


class ProbeResponse(NamedTuple):
    """What a probe got back: the status and the body as JSON (`None` if it was not JSON)."""

    status: int
    body: Any


def _check_origin(endpoint: str, url: str) -> None:
    """Probes carry the endpoint's key: they go only to the endpoint's own origin."""
    a, b = urlsplit(endpoint), urlsplit(url)
    if (a.scheme, a.hostname, a.port) != (b.scheme, b.hostname, b.port):
        raise ValueError(f"probe {url} is not on the endpoint's origin {endpoint}")


def _body(request: ModelRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": request.model,
        # Lone surrogates cannot be encoded as UTF-8 (nor sent by the SDK): replaced here.
        "messages": [{"role": m.role, "content": scrub(m.content)} for m in request.messages],
    }
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.prompt_cache_key is not None:
        body["prompt_cache_key"] = request.prompt_cache_key
    if request.sampling:
        body.update(request.sampling)
    return body


def encode_body(request: ModelRequest) -> bytes:
    """The request's JSON body, UTF-8 (orjson: several times faster than `json` on the
    10-50 KB bodies of a fan-out). `_body` has already replaced lone surrogates, which
    orjson refuses.

    Copied once into a bytes object of its exact size: orjson returns its growing output
    buffer as it is, about ten times the body (measured: 662 KB held for a 46 KB body),
    and the body stays alive until its response has been read, so a fan-out of 5,000 held
    gigabytes of address space and over 100 MB more of resident memory. The copy costs
    about 6 microseconds for 46 KB."""
    return bytes(memoryview(orjson.dumps(_body(request))))


class _EncodedOnWrite(aiohttp.payload.Payload):
    """A request body encoded when it is written to its connection, and let go of then.

    In a fan-out of thousands, requests wait for their connections (the server accepts them
    a few hundred at a time) and then for their answers; a body encoded up front lives
    through both, beside the prompt it was made from (66 MB at 5,000 sub-calls of 2K
    tokens, and orjson's buffer is about ten times the body). Here the body is encoded once
    to learn its length (the Content-Length header; that buffer is freed at once), and
    again as it is written: orjson is deterministic, and two encodings of 46 KB cost what
    one encoding plus an exact-size copy did. Until then it holds only the request (whose
    prompt the engine holds anyway), not the body's dicts. Writing it twice is a bug
    (aiohttp replays a body only for redirects, which `OpenAITransport` does not follow),
    so it raises.

    A body made ahead (`OpenAITransport.encode`: a fan-out's first followers, while the
    warm-up is in flight) is written as it is, with no encoding at all, and let go of then."""

    def __init__(self, request: ModelRequest, body: bytes | None = None) -> None:
        super().__init__(request, content_type="application/json")
        self._encoded = body
        """Made ahead (`OpenAITransport.encode`): written as it is, and let go of then."""
        self._size = len(orjson.dumps(_body(request))) if body is None else len(body)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return orjson.dumps(_body(self._value)).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        request, self._value = self._value, None
        if request is None:
            raise RuntimeError("a request body was written twice")
        data, self._encoded = self._encoded, None
        if data is None:
            data = orjson.dumps(_body(request))
        if len(data) != self._size:
            raise RuntimeError(f"a request body encoded to {len(data)} bytes, not the {self._size} announced")
        await writer.write(data if content_length is None else data[:content_length])


class _Deadlines:
    """The time limit of every request in flight on one transport, kept by one task.

    aiohttp's `ClientTimeout(total=...)` arms a timer for each request (a `TimerHandle`
    and aiohttp's handle around it, about 1.5 KB with the loop's own timer); at 5,000
    requests in flight that was 6 MB of the peak RSS and a timer set and cancelled per
    call. Here each request holds an unarmed `asyncio.timeout` and its expiry, and one
    task, alive only while requests are, expires those past it: a request times out
    between `timeout_s` and an eighth more (at most one second more) after it began."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._tick_s = min(1.0, max(timeout_s / 8, 0.01))
        self._live: dict[asyncio.Timeout, float] = {}
        """Each request's timeout, with the loop time it expires at."""
        self._keeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._live)

    def start(self) -> asyncio.Timeout:
        """A request's time limit, from now: enter it at once (`async with`), and `end` it
        when the request is over. Inside, `TimeoutError` once the limit is past."""
        loop = asyncio.get_running_loop()
        timeout = asyncio.timeout(None)
        self._live[timeout] = loop.time() + self.timeout_s
        keeper = self._keeper
        if keeper is None or keeper.done() or keeper.get_loop() is not loop:
            self._keeper = loop.create_task(self._keep(loop), name="rlm_async transport deadlines")
        return timeout

    def end(self, timeout: asyncio.Timeout) -> None:
        del self._live[timeout]

    def close(self) -> None:
        """Stop the keeper (the transport is closing; no request is in flight)."""
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None

    async def _keep(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._live:
            await asyncio.sleep(self._tick_s)
            now = loop.time()
            for timeout, expiry in list(self._live.items()):
                if expiry <= now and timeout.when() is None:
                    try:
                        timeout.reschedule(now)  # raises TimeoutError in the request's task
                    except RuntimeError:  # not entered, or already left: nothing to expire
                        pass


class _DirectConnector(aiohttp.TCPConnector):
    """aiohttp's connector, but a plain-HTTP connection to a single address is opened by the
    event loop's own `create_connection(host, port)`, not through aiohappyeyeballs (which
    makes the socket in Python, connects it with `sock_connect` and then wraps it). With one
    address there is nothing to race, and on uvloop that path is most of a connection's
    cost: 1,000 connections to the simulator through the pool measured 107-115 µs of CPU
    each on either loop, and through this path the same on asyncio and 56 on uvloop
    (`benchmarks/connect.py`). A fan-out's every concurrent sub-call opens one. TLS,
    several addresses (a name that resolves to IPv4 and IPv6), a scoped IPv6 address or a
    local address to bind: aiohttp's own path.

    `_wrap_create_connection` is aiohttp's private step: `_connector_class` uses this class
    only where its signature is the one overridden here (aiohttp 3.14's), else aiohttp's
    own connector, and a test fails when the installed aiohttp differs."""

    async def _wrap_create_connection(
        self,
        *args: Any,
        addr_infos: list[Any],
        req: aiohttp.ClientRequest,
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature, overridden)
        client_error: type[Exception] = aiohttp.ClientConnectorError,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, ResponseHandler]:
        # getattr: a private attribute, and a binding address is rare; when in doubt, aiohttp's way.
        binds = getattr(self, "_local_addr_infos", True)
        direct = len(addr_infos) == 1 and not kwargs.get("ssl") and not binds
        if direct:
            family, _type, proto, _name, address = addr_infos[0]
            direct = family == socket.AF_INET or (family == socket.AF_INET6 and not address[3])
        if not direct:
            return await super()._wrap_create_connection(
                *args, addr_infos=addr_infos, req=req, timeout=timeout, client_error=client_error, **kwargs
            )
        protocol_factory: Callable[[], ResponseHandler] = args[0]  # aiohttp passes its own, alone
        try:
            async with asyncio.timeout(timeout.sock_connect):
                return await asyncio.get_running_loop().create_connection(
                    protocol_factory, host=address[0], port=address[1], family=family, proto=proto
                )
        except OSError as exc:
            if isinstance(exc, TimeoutError):  # as aiohttp's own path: the connect timed out
                raise
            raise client_error(req.connection_key, exc) from exc


def _connector_class() -> type[aiohttp.TCPConnector]:
    """`_DirectConnector` where aiohttp's private step has the signature it overrides."""
    try:
        params = inspect.signature(aiohttp.TCPConnector._wrap_create_connection).parameters
    except (AttributeError, TypeError, ValueError):
        return aiohttp.TCPConnector
    expected = ("self", "args", "addr_infos", "req", "timeout", "client_error", "kwargs")
    return _DirectConnector if tuple(params) == expected else aiohttp.TCPConnector


_CONNECTOR = _connector_class()
"""The connector class the pools use (`_DirectConnector` unless aiohttp changed)."""


_PRECONNECTS_AT_ONCE = 16
"""Connections `OpenAITransport.preconnect` opens at once (each is a loopback or network
round trip; a few in flight keep the handshakes flowing without crowding the event loop)."""

_PRECONNECTS_PER_OPENER = 8
"""...and each of those openers is worth its task only for this many connections or more:
a service's hundred concurrent fan-outs of 20 sub-calls spawned 16 openers each, 1,600
tasks (about 36 us of the loop's CPU apiece) at the moment the loop was busiest."""


class OpenAITransport(Transport):
    """OpenAI-compatible chat completions over aiohttp, JSON in and out (orjson).

    The key comes from `api_key` or from the environment variable named by `api_key_env`;
    a server on loopback, or `api_key_env=None`, needs none. `max_connections=None` sizes
    the pool from the process's descriptor budget (`_descriptors.connection_budget`).
    Needs the asyncio backend (aiohttp is asyncio-only); the pool is made on first use, in
    the running loop. `wire`: "auto" sends plain-`http://` requests through the lean client
    (`_wire`: about 40 % less CPU a request) and `https://` through aiohttp; "aiohttp"
    sends both through aiohttp.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 600.0,
        max_connections: int | None = None,
        connect_timeout_s: float = 10.0,
        extra_headers: Mapping[str, str] | None = None,
        wire: Literal["auto", "aiohttp"] = "auto",
    ) -> None:
        self.endpoint = base_url.rstrip("/")
        self._url = self.endpoint + "/chat/completions"
        key = _resolve_key(self.endpoint, api_key, api_key_env)
        self._headers = {
            "content-type": "application/json",
            "accept": "application/json",
            # Our own name, so that aiohttp adds none: skipping its User-Agent instead
            # (`skip_auto_headers`) builds two header dicts more per request.
            "user-agent": f"rlm_async/{__version__}",
            **(extra_headers or {}),
        }
        if key:
            self._headers["authorization"] = f"Bearer {key}"
        self.max_connections = _pool_size(max_connections)
        """Requests in flight at once on this transport; more wait for a connection."""
        # The request's whole time, waiting for a pooled connection included, is `_Deadlines`'
        # (one timer for all); aiohttp keeps the TCP handshake's.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(connect_timeout_s, timeout_s))
        self._deadlines = _Deadlines(timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._lean, self._head = self._lean_wire(wire, min(connect_timeout_s, timeout_s))
        """Where plain HTTP goes through `_wire`: the pool's arguments, and the request head."""
        self._wire: HttpPool | None = None
        """The lean client's pool, made on first use (as aiohttp's session), gone at `aclose`."""
        self._busy = 0
        """Connections taken now: requests in flight, and connections `preconnect` is opening."""

    def _lean_wire(self, wire: str, connect_timeout_s: float) -> tuple[dict[str, Any] | None, bytes]:
        """The lean client's pool arguments and request head for an `http://` endpoint
        (`_wire`: the same requests for about 40 % less CPU each); `https://`, or
        `wire="aiohttp"`: none, and aiohttp carries the requests."""
        if wire not in ("auto", "aiohttp"):
            raise ConfigError(f'wire={wire!r}: use "auto" (the default) or "aiohttp"')
        url = urlsplit(self._url)
        if wire == "aiohttp" or url.scheme != "http" or not url.hostname:
            return None, b""
        try:
            port = url.port or 80
            path = url.path + (f"?{url.query}" if url.query else "")
            head = request_head("POST", url.hostname, port, path, self._headers)
        except ValueError as exc:
            raise ConfigError(f"{self.endpoint}: {exc}; fix base_url or extra_headers") from None
        pool = {"host": url.hostname, "port": port, "connect_timeout_s": connect_timeout_s}
        return pool, head

    def _lean_pool(self) -> HttpPool | None:
        """The lean client's pool where plain HTTP goes through it: made in the running loop
        on first use, and again after `aclose` (an `RLM` given one transport closes it after
        each run, and may run again on another loop)."""
        if self._lean is None:
            return None
        if self._wire is None:
            self._wire = HttpPool(limit=self.max_connections, **self._lean)
        return self._wire

    def _open(self) -> aiohttp.ClientSession:
        connector = _CONNECTOR(
            limit=self.max_connections,
            limit_per_host=0,
            # Idle connections live 60 s (aiohttp's default is 15 s): a root turn that takes
            # longer would otherwise find every connection of the last fan-out closed.
            keepalive_timeout=60.0,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers=self._headers,
            # No cookies between calls: every call stands alone.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self._session

    def encode(self, request: ModelRequest) -> Encoded:
        """The body, encoded once into bytes of its exact size (see `encode_body`): sent as
        it is by `complete_encoded`, which then needs no encoding (`complete` encodes twice)."""
        return Encoded(encode_body(request))

    async def complete_encoded(self, request: ModelRequest, encoded: Encoded) -> Completion:
        return await self._post(request, encoded)

    async def complete(self, request: ModelRequest) -> Completion:
        return await self._post(request, None)

    async def preconnect(self, n: int) -> int:
        """Open up to `n` connections (a few handshakes at a time) and leave them idle in the
        pool, so that the requests sent next skip the TCP (and TLS) handshake: a fan-out's
        followers released together otherwise open a connection each, on the event loop, at
        the moment they are due. Connections the pool already holds idle count towards `n`.
        Never more than the pool has free (`max_connections` less those taken), so no
        request queues behind it. Cancelled (the followers are due), the connections opened
        so far go to the pool at once. One that fails is left out (the request opens its
        own); a server's idle timeout closes any left unused."""
        pool = self._lean_pool()
        if pool is not None:
            return await self._preconnect_wire(pool, n)
        session = self._session or self._open()
        connector = session.connector
        n = min(n, self.max_connections - self._busy)
        if n <= 0 or connector is None:
            return 0
        loop = asyncio.get_running_loop()
        url = URL(self._url)
        # Held until all are up, then released together: a connection released at once would
        # be taken again, idle, by the next of these connects, and no new one opened.
        held: list[Connection] = []
        left = n

        async def opener() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                try:
                    # A request that is never sent: only its connection key (scheme, host,
                    # port, TLS settings, no proxy) matters, the same as every POST's here.
                    probe = aiohttp.ClientRequest("POST", url, loop=loop, session=session)
                    held.append(await connector.connect(probe, [], self._timeout))
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass  # the request that would have used it opens its own
                finally:
                    self._busy -= 1

        self._busy += n
        try:
            # A few handshakes at a time: thousands begun at once would each hold a task and
            # a half-open socket, and cancelling them (the warm-up ended first) would land on
            # the event loop just as the followers are released.
            async with anyio.create_task_group() as tg:
                for _ in range(min(-(-n // _PRECONNECTS_PER_OPENER), _PRECONNECTS_AT_ONCE)):
                    tg.start_soon(opener)
        finally:
            self._busy -= left  # never begun
            for connection in held:
                connection.release()  # idle in the pool, kept alive
        return len(held)

    async def _preconnect_wire(self, pool: HttpPool, n: int) -> int:
        """`preconnect` on the lean client: each connection opened goes idle into the pool at
        once (a request due meanwhile takes it); the pool's limit bounds them."""
        idle = pool.idle
        left = min(n, self.max_connections - self._busy) - idle
        opened = 0

        async def opener() -> None:
            nonlocal left, opened
            while left > 0:
                left -= 1
                try:
                    if not await pool.add_idle():
                        return  # the pool is at its limit
                    opened += 1
                except (WireError, OSError, TimeoutError):
                    pass  # the request that would have used it opens its own

        if left > 0:
            async with anyio.create_task_group() as tg:
                for _ in range(min(-(-left // _PRECONNECTS_PER_OPENER), _PRECONNECTS_AT_ONCE)):
                    tg.start_soon(opener)
        return min(n, idle + opened)

    async def _post(self, request: ModelRequest, encoded: Encoded | None) -> Completion:
        """Send `request` (its body made ahead in `encoded`, taken from it as it is written,
        so that no frame here holds it while the answer is awaited)."""
        self._busy += 1
        try:
            deadline = self._deadlines.start()
            try:
                async with deadline:
                    pool = self._lean_pool()
                    if pool is not None:
                        status, headers, raw = await self._send_lean(pool, request, encoded)
                    else:
                        status, headers, raw = await self._send_aiohttp(request, encoded)
            finally:
                self._deadlines.end(deadline)
        except TimeoutError:  # aiohttp's own timeouts derive from it too
            raise ConnectionFailed(f"request to {self.endpoint} timed out") from None
        except WireError as exc:
            if exc.refused:
                raise ConnectionFailed(
                    f"cannot reach {self.endpoint} ({exc}); check base_url and that the server is running"
                ) from None
            raise ConnectionFailed(f"connection to {self.endpoint} failed: {exc}") from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectionFailed(
                f"cannot reach {self.endpoint} ({exc}); check base_url and that the server is running"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:  # reset, dropped mid-body, malformed HTTP
            raise ConnectionFailed(
                f"connection to {self.endpoint} failed: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            self._busy -= 1
        if 300 <= status < 400:
            raise BadRequest(
                f"{self.endpoint} answered {status}, a redirect to {headers.get('location', 'nowhere')!r}; "
                "set base_url to the address the server names",
                status_code=status,
            )
        if status >= 400:
            raise _status_error(
                status,
                headers,
                _json_or_none(raw),
                raw[:200].decode("utf-8", "replace"),
                self.endpoint,
                request.model,
            )
        data = _json_or_none(raw)
        if not isinstance(data, dict):
            raise ServerError(f"malformed response from {self.endpoint}: body is not a JSON object")
        return _parse_completion(data, headers, request.model, self.endpoint)

    async def _send_lean(
        self, pool: HttpPool, request: ModelRequest, encoded: Encoded | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        def body() -> bytes:
            made = encoded.take() if encoded is not None else None
            return made if made is not None else encode_body(request)

        response = await pool.request(self._head, body)
        return response.status, response.headers, response.body

    async def _send_aiohttp(
        self, request: ModelRequest, encoded: Encoded | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        session = self._session or self._open()
        # No redirects: a body sent once cannot be replayed (see `_EncodedOnWrite`), and a
        # redirected API call is a misconfigured base_url, said so by `_post`.
        body = _EncodedOnWrite(request, encoded.take() if encoded is not None else None)
        async with session.post(self._url, data=body, allow_redirects=False) as response:
            return response.status, response.headers, await response.read()

    async def probe(
        self, method: str, url: str, body: Mapping[str, Any] | None = None, *, timeout_s: float = 5.0
    ) -> ProbeResponse | None:
        _check_origin(self.endpoint, url)
        session = self._session or self._open()
        data = orjson.dumps(body) if body is not None else None
        try:
            async with session.request(
                method, url, data=data, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                return ProbeResponse(response.status, _json_or_none(await response.read()))
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    async def aclose(self) -> None:
        self._deadlines.close()
        pool, self._wire = self._wire, None
        if pool is not None:
            pool.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses invalid UTF-8 and lone surrogate escapes ("\ud800"), both of which a
    # server may send: read them as U+FFFD rather than retry a "malformed" body.
    try:
        return json.loads(decode_utf8(content))
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
            # A server without usage (or with zero prompt tokens, which no chat request has)
            # told us nothing: the governor charges the reservation instead.
            usage_reported=u.prompt_tokens > 0,
            text=scrub(text),
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
    """OpenAI-compatible chat completions through the official `openai` SDK (2.x), its httpx
    client on aiohttp (`httpx-aiohttp`, what the SDK ships as `DefaultAioHttpClient`).

    Slower than `OpenAITransport` (the SDK transforms parameters and builds pydantic models
    for every call) and otherwise equivalent; use it where the SDK's own request handling
    is wanted. Same key rules, same pool sizing, same error translation.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 600.0,
        max_connections: int | None = None,
    ) -> None:
        import httpx
        import openai
        from httpx_aiohttp import HttpxAiohttpClient

        self._openai = openai
        self._httpx = httpx
        self.endpoint = base_url.rstrip("/")
        key = self._key = _resolve_key(self.endpoint, api_key, api_key_env) or "unused"
        self.max_connections = size = _pool_size(max_connections)
        self._http = HttpxAiohttpClient(
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=60.0),
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
        )
        self._client = openai.AsyncOpenAI(
            base_url=self.endpoint, api_key=key, max_retries=0, http_client=self._http
        )

    async def complete(self, request: ModelRequest) -> Completion:
        openai = self._openai
        try:
            body = _body(request)
            # The SDK's create() takes only the fields it knows: sampling fields go as extra_body.
            extra = {k: body.pop(k) for k in (request.sampling or {})}
            raw = await self._client.chat.completions.with_raw_response.create(
                **body, extra_body=extra or None
            )
            data = orjson.loads(raw.http_response.content)
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
        except ValueError as exc:  # orjson.JSONDecodeError is one
            raise ServerError(f"malformed response from {self.endpoint}: {exc}") from None
        except self._httpx.HTTPError as exc:
            raise ConnectionFailed(f"connection to {self.endpoint} failed: {exc}") from None
        if not isinstance(data, dict):
            raise ServerError(f"malformed response from {self.endpoint}: body is not a JSON object")
        return _parse_completion(data, raw.headers, request.model, self.endpoint)

    async def probe(
        self, method: str, url: str, body: Mapping[str, Any] | None = None, *, timeout_s: float = 5.0
    ) -> ProbeResponse | None:
        _check_origin(self.endpoint, url)
        headers = {"content-type": "application/json", "authorization": f"Bearer {self._key}"}
        content = orjson.dumps(body) if body is not None else None
        try:
            # Probes are rare and small: the pooled httpx client, not the SDK's request handling.
            response = await self._http.request(
                method, url, content=content, headers=headers, timeout=timeout_s
            )
        except self._httpx.HTTPError:
            return None
        return ProbeResponse(response.status_code, _json_or_none(response.content))

    async def aclose(self) -> None:
        await self._http.aclose()
