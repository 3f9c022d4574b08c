"""A lean HTTP/1.1 client for model servers spoken to in plain HTTP: a pool of kept-alive
connections to one host, one request at a time on each, responses parsed by httptools.

Why here and not aiohttp: the engine sends every model call from one event loop, so the
client's CPU per request is what a fan-out of thousands, or a service's hundred concurrent
queries, waits on. aiohttp's request path (session, connector, request and response
objects, its payload writer, a task per body) measured 0.31-0.33 ms of CPU a request where
this one measured 0.18-0.20 (250 in flight, 40K-character prompts, the encoding included;
`benchmarks/transport.py --only OpenAITransport,`; the library table in docs/design.md). What
it does that this does not — TLS, proxies, redirects, cookies, happy eyeballs — a plain-HTTP
model server on loopback or a private network (the simulator, vLLM, SGLang, llama.cpp's
server, Ollama) does not need, and `transport.OpenAITransport` keeps aiohttp for `https://`.
The parser is not ours: httptools is llhttp's (Node's) parser, as uvicorn uses it.

Asyncio-only (a `Protocol` per connection), as aiohttp is. Nothing here retries, and no
request is sent twice: a connection that fails is closed and the error raised, for the one
retry layer (the governor) to judge.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import httptools

__all__ = ["HttpPool", "Response", "WireError"]

_DNS_TTL_S = 10.0
"""How long a resolved name is reused (aiohttp's default too): a fan-out opens hundreds of
connections at once, each of which would otherwise ask the resolver."""


class WireError(Exception):
    """The connection failed: refused, reset, closed before the response ended, or a
    response that is not HTTP. `refused`: no connection could be opened at all."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Mapping[str, str]
    """Names in lower case; a repeated header keeps its last value."""
    body: bytes


class _Connection(asyncio.Protocol):
    """One kept-alive connection, carrying one request at a time. httptools calls the
    `on_*` methods as it parses."""

    def __init__(self, on_lost: Callable[[_Connection], None]) -> None:
        self._on_lost = on_lost
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._headers_done = False
        self.reusable = True
        """False once the server said it closes the connection, or it failed."""
        self.closed = False
        self.idle_since = 0.0

    # asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes no request asked for: the connection is out of step
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(WireError(f"the server's response is not valid HTTP/1.1 ({exc})"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._waiter is not None and not self._waiter.done():
            if self._headers_done and not self._framed():
                self._complete()  # a body that ends where the connection does (no length given)
            elif exc is not None:
                self._fail(WireError(f"{type(exc).__name__}: {exc}"))
            elif self._headers_done:
                self._fail(WireError("the server closed the connection in the middle of its response"))
            else:
                self._fail(WireError("the server closed the connection without answering"))
        self._on_lost(self)

    # httptools' side

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200:  # "100 Continue" and the like: the answer follows
            self._headers, self._body, self._headers_done = {}, [], False
            return
        if not self._parser.should_keep_alive():
            self.reusable = False
        self._complete()

    # the pool's side

    async def send(self, head: bytes, make_body: Callable[[], bytes]) -> Response:
        """Write one request (`head` up to its content-length, then the body `make_body`
        returns) and wait for its whole response. The body is let go of once written: held
        through the wait, a fan-out of 5,000 held 20 MB more at its peak."""
        if self._transport is None or self.closed:
            raise WireError("the connection closed before the request was sent")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response] = loop.create_future()
        self._waiter = waiter
        self._headers, self._body, self._headers_done = {}, [], False
        body = make_body()
        self._transport.writelines((head + str(len(body)).encode() + b"\r\n\r\n", body))
        del body
        try:
            return await waiter
        finally:
            self._waiter = None

    def abort(self) -> None:
        """Close at once, in whatever state: the next request must not read this one's bytes."""
        self.reusable = False
        if self._transport is not None and not self.closed:
            self._transport.abort()

    def _framed(self) -> bool:
        return "content-length" in self._headers or "transfer-encoding" in self._headers

    def _complete(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        body = b"".join(self._body)
        encoding = self._headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            try:
                body = _decode(encoding, body)
            except (ValueError, zlib.error) as exc:
                self.abort()
                waiter.set_exception(WireError(str(exc)))
                return
        headers, self._headers = self._headers, {}  # stray bytes after it must not change it
        waiter.set_result(Response(self._parser.get_status_code(), headers, body))

    def _fail(self, error: WireError) -> None:
        self.reusable = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)


def _decode(encoding: str, body: bytes) -> bytes:
    """The body of a response the server compressed although no `accept-encoding` asked it to."""
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:  # the raw deflate stream some servers send
            return zlib.decompress(body, -zlib.MAX_WBITS)
    raise ValueError(f"the server answered in content-encoding {encoding!r}, which rlm_async does not decode")


def request_head(method: str, host: str, port: int, path: str, headers: Mapping[str, str]) -> bytes:
    """A request's head up to (not including) its `content-length`, made once per pool. A
    header that would break the head apart (a line break in it) is refused here."""
    host_header = f"[{host}]" if ":" in host else host
    if port != 80:
        host_header += f":{port}"
    lines = [f"{method} {path} HTTP/1.1", f"host: {host_header}"]
    for name, value in headers.items():
        if any(c in name + value for c in "\r\n\0") or ":" in name or not name.strip():
            raise ValueError(
                f"header {name!r} is not a valid HTTP header (a line break, a colon in its name, or empty)"
            )
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\ncontent-length: ").encode("latin-1")


class HttpPool:
    """Kept-alive connections to one `http://` host, at most `limit` open at once; requests
    beyond it wait, first come first served, for one to come back.

    A connection goes back to the pool only after its whole response was read and the
    server did not ask to close it; one the request was cancelled on, or that failed, is
    closed (its state is unknown). Idle ones are reused newest first, so a burst's extra
    connections age out: one idle longer than `keepalive_s` is closed when next met, and
    one the server closes leaves the pool as it closes."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        limit: int,
        connect_timeout_s: float,
        keepalive_s: float = 60.0,
    ) -> None:
        self.host, self.port = host, port
        self.limit = limit
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._idle: dict[_Connection, None] = {}
        """An ordered set: `popitem` takes the newest, a closing connection leaves in O(1)."""
        self._open = 0
        """Connections open or being opened, idle ones included."""
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._addresses: list[tuple[str, int]] = []
        self._resolved_at = float("-inf")
        self._closed = False

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def request(self, head: bytes, make_body: Callable[[], bytes]) -> Response:
        """Send `head` (from `request_head`) and the body `make_body` returns on a pooled
        connection. The body is made only once a connection is held: requests that wait for
        one hold their prompts (which their callers hold anyway), not a second copy."""
        connection = await self._acquire()
        try:
            response = await connection.send(head, make_body)
        except BaseException:
            connection.abort()
            self._release(connection)
            raise
        self._release(connection)
        return response

    async def add_idle(self) -> bool:
        """Open one more connection and leave it idle (a handshake ahead of the requests
        that will use it); False where the pool is at its limit."""
        if self._open >= self.limit or self._closed:
            return False
        self._open += 1
        try:
            connection = await self._connect()
        except BaseException:
            self._gone()
            raise
        self._release(connection)
        return True

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.popitem()[0].abort()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(WireError("the transport was closed"))

    async def _acquire(self) -> _Connection:
        if self._closed:
            raise WireError("the transport was closed")
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle:
            connection = self._idle.popitem()[0]
            if now - connection.idle_since <= self._keepalive_s:
                return connection
            connection.abort()  # `_lost` counts it out
        if self._open >= self.limit:
            waiter: asyncio.Future[_Connection | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._hand_back(waiter.result())  # handed over just as this was cancelled
                raise
            if handed is not None:
                return handed
            # else a connection closed and its place was handed over: open one in it
        else:
            self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._gone()
            raise

    def _hand_back(self, connection: _Connection | None) -> None:
        if connection is None:
            self._gone()
        else:
            self._release(connection)

    def _release(self, connection: _Connection) -> None:
        if not connection.reusable or self._closed:
            connection.abort()  # its `connection_lost` (now, or run already) counts it out
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle[connection] = None

    def _lost(self, connection: _Connection) -> None:
        """A connection closed (either end): its place in the pool is free."""
        self._idle.pop(connection, None)
        self._gone()

    def _gone(self) -> None:
        """One connection fewer: its place goes to the first waiter, who opens one."""
        self._open -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)
                return

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        async with asyncio.timeout(self._connect_timeout_s):
            for address in await self._resolve(loop):
                try:
                    _transport, connection = await loop.create_connection(
                        lambda: _Connection(self._lost), address[0], address[1]
                    )
                except OSError as exc:
                    errors.append(f"{address[0]}:{address[1]}: {exc.strerror or exc}")
                    continue
                if address in self._addresses[1:]:  # the one that answers goes first next time
                    self._addresses.remove(address)
                    self._addresses.insert(0, address)
                return connection
        raise WireError("; ".join(errors) or f"{self.host} has no address", refused=True)

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> list[tuple[str, int]]:
        if self._addresses and loop.time() - self._resolved_at < _DNS_TTL_S:
            return list(self._addresses)
        try:
            ipaddress.ip_address(self.host)
            found = [(self.host, self.port)]
        except ValueError:  # a name: ask the resolver once per `_DNS_TTL_S`
            try:
                infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise WireError(f"cannot resolve {self.host}: {exc}", refused=True) from None
            found = list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))
        self._addresses, self._resolved_at = found, loop.time()
        return list(found)
