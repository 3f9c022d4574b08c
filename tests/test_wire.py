"""The lean HTTP/1.1 client (`rlm_async._wire`) that carries plain-HTTP model calls: against
a scripted server on real loopback sockets, each answer written byte for byte, so the
cases a framework server never sends (chunked, until-close, compressed, cut short, not
HTTP at all) are sent here. What the client did is read from the server's side:
connections accepted, requests read, ends seen."""

from __future__ import annotations

import asyncio
import gc
import gzip
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

import pytest

from rlm_async._types import Message, ModelRequest
from rlm_async._wire import HttpPool, request_head
from rlm_async.exceptions import ConfigError, ConnectionFailed
from rlm_async.transport import OpenAITransport

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the lean client is asyncio's (a Protocol), as aiohttp is


ANSWER = b'{"choices":[{"message":{"content":"42"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}'


def ok(body: bytes = ANSWER, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + head.encode()
        + (b"content-length: %d\r\n\r\n" % len(body) + body)
    )


Reply = Callable[[int, asyncio.StreamWriter], Awaitable[None]]
"""What the server does with the n-th request (0-based) it read: writes an answer, or not."""


@dataclass
class Scripted:
    url: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0
    ends_seen: int = 0
    """Connections the client closed (the server read EOF)."""
    a_request: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the first request has been read."""


@asynccontextmanager
async def scripted(reply: Reply, port: int = 0) -> AsyncIterator[Scripted]:
    state = Scripted(url="")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        state.open_now += 1
        state.most_open = max(state.most_open, state.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    state.ends_seen += 1
                    return
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                body = await reader.readexactly(length)
                state.requests.append(head + body)
                state.a_request.set()
                await reply(len(state.requests) - 1, writer)
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            state.ends_seen += 1
        finally:
            state.open_now -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, reuse_address=True)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    try:
        yield state
    finally:
        server.close()


def ask(text: str = "hi") -> ModelRequest:
    return ModelRequest(model="m", messages=(Message("user", text),))


async def writes(writer: asyncio.StreamWriter, *parts: bytes, close: bool = False) -> None:
    for part in parts:
        writer.write(part)
        await writer.drain()
    if close:
        writer.close()


async def one_call_answered_with(*parts: bytes) -> str:
    """The text of one call to a server that answers it with `parts`, written as they are."""

    async def reply(n: int, w: asyncio.StreamWriter) -> None:
        await writes(w, *parts)

    async with scripted(reply) as server:
        transport = OpenAITransport(server.url, api_key_env=None)
        try:
            return (await transport.complete(ask())).text
        finally:
            await transport.aclose()


class TestWhatTheServerSends:
    async def test_a_content_length_answer_and_the_request_as_sent(self) -> None:
        """The request goes out as one HTTP/1.1 POST with the exact content-length and the
        transport's headers; the answer is parsed."""

        async def reply(n: int, w: asyncio.StreamWriter) -> None:
            await writes(w, ok())

        async with scripted(reply) as server:
            transport = OpenAITransport(server.url, api_key="sk-test", extra_headers={"x-tenant": "a"})
            try:
                completion = await transport.complete(ask())
            finally:
                await transport.aclose()
        assert completion.text == "42" and completion.usage.prompt_tokens == 3
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
        assert {"host: " + server.url.split("/")[2], "authorization: Bearer sk-test", "x-tenant: a"} <= set(
            lines
        )
        assert f"content-length: {len(body)}" in lines and b'"content":"hi"' in body

    async def test_a_chunked_answer(self) -> None:
        async def reply(n: int, w: asyncio.StreamWriter) -> None:
            pieces = [ANSWER[:10], ANSWER[10:50], ANSWER[50:]]
            chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
            await writes(
                w, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", chunked[:7], chunked[7:]
            )

        async with scripted(reply) as server:
            transport = OpenAITransport(server.url, api_key_env=None)
            try:
                assert (await transport.complete(ask())).text == "42"
                assert (await transport.complete(ask())).text == "42"
            finally:
                await transport.aclose()
        assert server.connections == 1  # a chunked answer ends where it says: the connection is kept

    async def test_a_body_that_ends_with_the_connection(self) -> None:
        """No content-length and no chunking: the body is whatever came before the close."""

        async def reply(n: int, w: asyncio.StreamWriter) -> None:
            await writes(w, b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n", ANSWER, close=True)

        async with scripted(reply) as server:
            transport = OpenAITransport(server.url, api_key_env=None)
            try:
                assert (await transport.complete(ask())).text == "42"
                assert (await transport.complete(ask())).text == "42"
            finally:
                await transport.aclose()
        assert server.connections == 2

    async def test_a_gzip_answer_is_decoded(self) -> None:
        assert await one_call_answered_with(ok(gzip.compress(ANSWER), "content-encoding: gzip")) == "42"

    async def test_an_encoding_it_cannot_decode_is_named(self) -> None:
        with pytest.raises(ConnectionFailed, match="content-encoding 'br'"):
            await one_call_answered_with(ok(b"\x00\x01", "content-encoding: br"))

    async def test_an_informational_answer_before_the_real_one(self) -> None:
        assert await one_call_answered_with(b"HTTP/1.1 100 Continue\r\n\r\n", ok()) == "42"

    async def test_an_error_status_keeps_its_headers(self) -> None:
        """A 429's retry-after reaches the governor through the same translation as aiohttp's."""

        body = b'{"error":{"message":"slow down"}}'
        head = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\ncontent-length: %d\r\n\r\n" % len(body)
        with pytest.raises(Exception, match="rate limited") as caught:
            await one_call_answered_with(head + body)
        assert getattr(caught.value, "retry_after", None) == 7.0


class TestWhenItBreaks:
    @pytest.mark.parametrize(
        ("sent", "said"),
        [
            (b"", "closed the connection without answering"),
            (b'HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n{"choices"', "in the middle of its response"),
            (b"SSH-2.0-OpenSSH_9.2\r\n", "not valid HTTP/1.1"),
        ],
    )
    async def test_a_broken_answer_is_connection_failed_and_the_next_call_works(
        self, sent: bytes, said: str
    ) -> None:
        """Each break is the transport's ConnectionFailed naming what happened; the
        connection is dropped, never reused, and the next call gets a fresh one."""

        async def reply(n: int, w: asyncio.StreamWriter) -> None:
            if n == 0:
                await writes(w, sent, close=True)
            else:
                await writes(w, ok())

        async with scripted(reply) as server:
            transport = OpenAITransport(server.url, api_key_env=None)
            try:
                with pytest.raises(ConnectionFailed, match=said):
                    await transport.complete(ask())
                assert (await transport.complete(ask())).text == "42"
            finally:
                await transport.aclose()
        assert server.connections == 2

    async def test_a_kept_connection_the_server_closed_is_not_used(self) -> None:
        """A server that closes idle connections (its keep-alive timeout): the pool lets the
        closed one go as it closes, and the next call opens another."""

        async def reply(n: int, w: asyncio.StreamWriter) -> None:
            await writes(w, ok())
            if n == 0:
                await asyncio.sleep(0.05)
                w.close()

        async with scripted(reply) as server:
            transport = OpenAITransport(server.url, api_key_env=None)
            try:
                assert (await transport.complete(ask())).text == "42"
                await asyncio.sleep(0.3)
                assert transport._wire is not None and transport._wire.idle == 0
                assert (await transport.complete(ask())).text == "42"
            finally:
                await transport.aclose()
        assert server.connections == 2

    async def test_a_cancelled_call_closes_its_connection_and_frees_its_place(self) -> None:
        """Cancelled while the server thinks, the call's connection is closed (its answer
        would be read by the next call otherwise); with one connection allowed, the next
        call still gets one."""
        answered = asyncio.Event()

        async def reply(n: int, w: asyncio.StreamWriter) -> None:
            if n == 0:
                await asyncio.sleep(3600)
            await writes(w, ok())
            answered.set()

        async with scripted(reply) as server:
            transport = OpenAITransport(server.url, api_key_env=None, max_connections=1)
            try:
                first = asyncio.get_running_loop().create_task(transport.complete(ask()))
                await server.a_request.wait()
                first.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await first
                assert (await transport.complete(ask())).text == "42"
            finally:
                await transport.aclose()
        assert server.connections == 2 and answered.is_set()

    async def test_nothing_listening_says_where_and_what_to_check(self) -> None:
        async with scripted(lambda n, w: writes(w, ok())) as server:
            url = server.url
        transport = OpenAITransport(url, api_key_env=None)
        try:
            with pytest.raises(ConnectionFailed, match=r"cannot reach .* check base_url"):
                await transport.complete(ask())
        finally:
            await transport.aclose()

    def test_a_header_that_would_split_the_request_is_refused_at_construction(self) -> None:
        with pytest.raises(ConfigError, match=r"x-evil.*not a valid HTTP header"):
            OpenAITransport(
                "http://127.0.0.1:9/v1", api_key_env=None, extra_headers={"x-evil": "a\r\nhost: b"}
            )

    def test_an_unknown_wire_is_refused(self) -> None:
        with pytest.raises(ConfigError, match='use "auto"'):
            OpenAITransport("http://127.0.0.1:9/v1", api_key_env=None, wire="h2")  # type: ignore[arg-type]


class TestATransportUsedAgain:
    def test_closed_then_used_on_another_loop_it_opens_a_new_pool(self) -> None:
        """An `RLM` given one transport closes it after each run and may run again on a new
        event loop (`RLM.completion()`): the lean client's pool is made again there, as
        aiohttp's session is; the old loop's connections are not reused."""
        served: list[int] = []

        async def serve_and_call(transport: OpenAITransport, port: int) -> str:
            async def reply(n: int, w: asyncio.StreamWriter) -> None:
                served.append(n)
                await writes(w, ok())

            async with scripted(reply, port):
                try:
                    return (await transport.complete(ask())).text
                finally:
                    await transport.aclose()

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        transport = OpenAITransport(f"http://127.0.0.1:{port}/v1", api_key_env=None)
        assert asyncio.run(serve_and_call(transport, port)) == "42"
        assert asyncio.run(serve_and_call(transport, port)) == "42"
        assert served == [0, 0] and transport._wire is None


class TestThePool:
    async def test_never_more_connections_than_allowed_and_every_call_answered(self) -> None:
        """Twelve calls at once through `max_connections=3`: the server never holds more
        than three connections, opens no more than three, and answers all twelve."""

        async def reply(n: int, w: asyncio.StreamWriter) -> None:
            await asyncio.sleep(0.02)
            await writes(w, ok())

        async with scripted(reply) as server:
            transport = OpenAITransport(server.url, api_key_env=None, max_connections=3)
            try:
                texts = await asyncio.gather(*(transport.complete(ask(str(i))) for i in range(12)))
            finally:
                await transport.aclose()
        assert texts and all(c.text == "42" for c in texts)
        assert len(server.requests) == 12 and server.most_open == 3 and server.connections == 3

    async def test_a_connection_idle_past_its_keepalive_is_closed_not_used(self) -> None:
        async def reply(n: int, w: asyncio.StreamWriter) -> None:
            await writes(w, ok())

        async with scripted(reply) as server:
            host, port = server.url.split("/")[2].split(":")
            pool = HttpPool(host, int(port), limit=4, connect_timeout_s=5, keepalive_s=0.05)
            head = request_head("POST", host, int(port), "/v1/chat/completions", {})
            try:
                assert (await pool.request(head, lambda: b"{}")).status == 200
                await asyncio.sleep(0.1)
                assert (await pool.request(head, lambda: b"{}")).status == 200
                await asyncio.sleep(0.05)
            finally:
                pool.close()
        assert server.connections == 2 and server.ends_seen >= 1

    async def test_a_name_is_resolved_and_the_address_that_answers_is_used(self) -> None:
        """`localhost` (which may name ::1 first, where nothing listens) reaches the server
        on 127.0.0.1."""

        async def reply(n: int, w: asyncio.StreamWriter) -> None:
            await writes(w, ok())

        async with scripted(reply) as server:
            transport = OpenAITransport(server.url.replace("127.0.0.1", "localhost"), api_key_env=None)
            try:
                assert (await transport.complete(ask())).text == "42"
                assert (await transport.complete(ask())).text == "42"
            finally:
                await transport.aclose()
        assert server.connections == 1

    async def test_the_body_is_let_go_of_once_written(self) -> None:
        """While the answer is awaited, nothing holds the request's body (at a fan-out of
        5,000, bodies held to their answers put 20 MB on the peak)."""

        class Body(bytearray):  # bytes-like, and unlike a bytes subclass, can be watched
            pass

        release = asyncio.Event()
        bodies: list[weakref.ref[Body]] = []

        async def reply(n: int, w: asyncio.StreamWriter) -> None:
            await release.wait()
            await writes(w, ok())

        def make() -> bytes:
            body = Body(b'{"model": "m"}')
            bodies.append(weakref.ref(body))
            return cast(bytes, body)

        async with scripted(reply) as server:
            host, port = server.url.split("/")[2].split(":")
            pool = HttpPool(host, int(port), limit=1, connect_timeout_s=5)
            head = request_head("POST", host, int(port), "/v1/chat/completions", {})
            try:
                call = asyncio.get_running_loop().create_task(pool.request(head, make))
                await server.a_request.wait()
                gc.collect()
                assert bodies and bodies[0]() is None
                release.set()
                assert (await call).status == 200
            finally:
                release.set()
                pool.close()

    async def test_the_body_is_made_only_once_a_connection_is_held(self) -> None:
        """A call that waits for a connection holds no body yet (memory, at a fan-out of
        thousands): `make_body` runs once its turn comes."""
        made: list[int] = []

        async def reply(n: int, w: asyncio.StreamWriter) -> None:
            await asyncio.sleep(0.05)
            await writes(w, ok())

        async with scripted(reply) as server:
            host, port = server.url.split("/")[2].split(":")
            pool = HttpPool(host, int(port), limit=1, connect_timeout_s=5)
            head = request_head("POST", host, int(port), "/v1/chat/completions", {})

            def body(i: int) -> Callable[[], bytes]:
                def make() -> bytes:
                    made.append(i)
                    return b"{}"

                return make

            try:
                first = asyncio.get_running_loop().create_task(pool.request(head, body(0)))
                second = asyncio.get_running_loop().create_task(pool.request(head, body(1)))
                await server.a_request.wait()
                assert made == [0]
                await asyncio.gather(first, second)
                assert made == [0, 1]
            finally:
                pool.close()
