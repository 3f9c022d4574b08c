"""The simulator process's own HTTP/1.1 server: chat completions answered from callbacks,
with no ASGI layer in their way.

In a benchmark the simulator stands in for a provider's machines but shares the cores with
the engine under test, so every millisecond of its CPU is one the engine does not get. A
service burst of 100 queries sends it 2,000 sub-calls within about a second, and it read
them more slowly than they came: counting sends and arrivals in order, a request waited up
to about half a second in its socket before the simulator parsed it
(`benchmarks/results/serve_load_sends_vs_arrivals.json`). Behind uvicorn, each chat completion cost an ASGI task and scope, its
messages, an anyio cancel scope and a disconnect-watcher task besides the simulator's own
work; here it costs one asyncio task around `SimApp.respond` and the parser's callbacks
(`benchmarks/sim_cpu.py` has the figures).

What it serves: HTTP/1.1 with keep-alive (HTTP/1.0 and `Connection: close` close after
the response), bodies by length or chunked, `Expect: 100-continue`, pipelined requests
answered in order. `POST /v1/chat/completions` goes straight to `SimApp.respond`; every
other path to the same `SimApp` as ASGI (rare, small requests). A client that disconnects
cancels its request, which the app logs as "cancelled", as behind uvicorn. Malformed HTTP
is a 400, a body over `max_body` a 413, and the connection closes after either. Used by
`serve` (the `rlm-async sim` process and `SimProcess`); `SimServer`, a guest in a test's
own loop, stays on uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import traceback
from collections import deque
from collections.abc import Callable, MutableMapping
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote

import httptools

from ._app import Draft, Headers, SimApp, error_reply

__all__ = ["MAX_BODY", "FrontServer"]

MAX_BODY = 256 * 1024 * 1024
"""The largest request body accepted (413 beyond): a million-token prompt is about 4 MB."""

KEEP_ALIVE_S = 120.0
"""How long an idle connection stays open. Long, because a client's pooled connection
closed under it turns into a spurious error on its next request."""

_CHAT = b"/v1/chat/completions"
_PIPELINED = 64
"""Requests a connection may have parsed and waiting behind the one in progress; reading
pauses beyond it, so a client that pipelines without end fills its own socket, not our
memory."""


class FrontServer:
    """Serve `app` on a listening socket until `aclose()`:

    front = FrontServer(app)
    await front.start(sock)
    ...
    await front.aclose()   # cancels what is in flight (logged "cancelled"), closes connections
    """

    def __init__(self, app: SimApp, *, max_body: int = MAX_BODY, keep_alive_s: float = KEEP_ALIVE_S) -> None:
        self.app = app
        self.max_body = max_body
        self.keep_alive_s = keep_alive_s
        self._connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        # A 1,000-way fan-out connects all at once: a deep accept queue (asyncio listens on
        # the given socket again with this backlog).
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=4096)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        answering = [c.task for c in self._connections if c.task is not None and not c.task.done()]
        for connection in list(self._connections):
            connection.abort()
        for task in answering:
            task.cancel()
        # Until each cancelled request has logged itself ("cancelled") and counted itself out.
        await asyncio.gather(*answering, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


class _Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "url")

    def __init__(self, method: bytes, url: bytes, headers: Headers, body: bytes, keep_alive: bool) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class _Connection(asyncio.Protocol):
    """One client connection: parse, answer one request at a time, in order."""

    def __init__(self, server: FrontServer) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: Headers = []
        self._body: list[bytes] = []
        self._size = 0
        self._waiting: deque[_Request] = deque()
        self.task: asyncio.Task[None] | None = None
        """The request being answered."""
        self._idle: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[None] | None = None
        """Set when the connection closes: what a non-chat request's ASGI `receive` awaits."""
        self._closed = False

    # ------------------------------------------------------------ the connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._server._connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self.task is not None:
            self.task.cancel()  # the app logs it as cancelled
        self._waiting.clear()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not served")
        except httptools.HttpParserError as exc:
            # A callback's own exception comes back wrapped, as the error's context.
            if isinstance(exc.__context__, _TooLarge):
                self._refuse(413, f"the request body is over {self._server.max_body:,} bytes")
            else:
                self._refuse(400, f"malformed HTTP request: {exc}")

    def eof_received(self) -> bool | None:
        return False  # the client is done: close (a request in progress is cancelled)

    # ------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        expects = False
        for name, value in self._headers:
            if name == b"content-length" and value.strip().isdigit() and int(value) > self._server.max_body:
                raise _TooLarge  # refused before the client sends it
            expects = expects or (name == b"expect" and value.strip().lower() == b"100-continue")
        if expects and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._server.max_body:
            raise _TooLarge
        self._body.append(body)

    def on_message_complete(self) -> None:
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = _Request(
            self._parser.get_method(), self._url, self._headers, body, self._parser.should_keep_alive()
        )
        self._body = []
        if self.task is None:
            self._begin(request)
        else:
            self._waiting.append(request)  # pipelined: answered after the one in progress
            if len(self._waiting) == _PIPELINED and self._transport is not None:
                self._transport.pause_reading()

    # ------------------------------------------------------------ answering
    def _begin(self, request: _Request) -> None:
        path = request.url.partition(b"?")[0]
        loop = asyncio.get_running_loop()
        if request.method == b"POST" and path == _CHAT:
            draft = self._server.app.open_request()
            self.task = loop.create_task(self._chat(request, draft))
        else:
            self.task = loop.create_task(self._asgi(request))

    async def _chat(self, request: _Request, draft: Draft) -> None:
        try:
            reply = await self._server.app.respond(draft, request.headers, request.body)
        except asyncio.CancelledError:
            return  # the connection is gone (or the server stops): nothing to answer
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._refuse(500, "the simulator failed on this request")
            return
        self._write(reply.status, reply.headers, reply.body, request.keep_alive, drop=reply.drop)

    async def _asgi(self, request: _Request) -> None:
        """Any other path, through the app's ASGI entry."""
        path, _, query = request.url.partition(b"?")
        scope: MutableMapping[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method.decode("latin-1"),
            "scheme": "http",
            "path": unquote(path.decode("latin-1")),
            "raw_path": path,
            "query_string": query,
            "headers": request.headers,
        }
        body_sent = False
        self._lost = asyncio.get_running_loop().create_future()
        lost = self._lost

        async def receive() -> MutableMapping[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await lost
            return {"type": "http.disconnect"}

        status = 500
        headers: Headers = []
        parts: list[bytes] = []
        finished = False

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status, headers, finished
            if message["type"] == "http.response.start":
                status, headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    finished = True

        try:
            await self._server.app(scope, receive, send)
        except asyncio.CancelledError:
            return
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._refuse(500, "the simulator failed on this request")
            return
        if not finished:  # the app ended the response on purpose (a dropped connection)
            self._write(status, headers, b"".join(parts), keep_alive=False, drop=False)
            self.abort()
            return
        body = b"" if request.method == b"HEAD" else b"".join(parts)
        self._write(status, headers, body, request.keep_alive)

    def _write(
        self, status: int, headers: Headers, body: bytes, keep_alive: bool, *, drop: bool = False
    ) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        if not any(name == b"content-length" for name, _ in headers):
            head.append(b"content-length: %d\r\n" % len(body))
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        if drop:  # an injected fault: half the body, then the connection goes
            transport.write(b"".join(head) + body[: len(body) // 2])
            transport.close()
            return
        transport.write(b"".join(head) + body)
        self.task = None
        if not keep_alive:
            transport.close()
        elif self._waiting:
            if len(self._waiting) == _PIPELINED:
                transport.resume_reading()
            self._begin(self._waiting.popleft())
        else:
            self._arm_idle()

    def _refuse(self, status: int, message: str) -> None:
        """An error response, then the connection closes (the request stream is out of step)."""
        if self.task is not None and not self.task.done() and self.task is not asyncio.current_task():
            self.task.cancel()
        self._waiting.clear()
        reply = error_reply(status, message)
        self._write(reply.status, reply.headers, reply.body, keep_alive=False)

    def _arm_idle(self) -> None:
        transport = self._transport
        if transport is not None:
            self._idle = asyncio.get_running_loop().call_later(self._server.keep_alive_s, transport.close)


class _TooLarge(Exception):
    pass


def _reason(status: int) -> bytes:
    with contextlib.suppress(ValueError):
        return HTTPStatus(status).phrase.encode()
    return b"Unknown"


async def serve_until_signalled(
    app: SimApp, sock: socket.socket, on_started: Callable[[], None], *, max_body: int = MAX_BODY
) -> None:
    """Serve until SIGINT or SIGTERM; then cancel what is in flight and close."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    front = FrontServer(app, max_body=max_body)
    try:
        await front.start(sock)
        on_started()
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await front.aclose()
