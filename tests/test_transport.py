"""The wire: completions parsed, errors translated once, connections reused, both transports alike."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import pytest
import pytest_asyncio
import uvicorn

from rlm_async import Message, ModelRequest
from rlm_async.exceptions import (
    AuthenticationFailed,
    BadRequest,
    ConnectionFailed,
    ContextLengthExceeded,
    MissingAPIKey,
    ModelNotFound,
    RateLimited,
    ServerError,
)
from rlm_async.transport import (
    OpenAISDKTransport,
    OpenAITransport,
    Transport,
    parse_duration,
    parse_rate_limit_headers,
    retry_after_seconds,
)

Reply = tuple[int, dict[str, str], bytes]

COMPLETION = {
    "id": "c1",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 4},
    },
}


class Server:
    """A one-route ASGI server on loopback whose replies a test scripts; it records the
    client address of every request (one address per TCP connection)."""

    def __init__(self) -> None:
        self.reply: Callable[[dict[str, Any]], Reply] = lambda body: (
            200,
            {},
            json.dumps(COMPLETION).encode(),
        )
        self.clients: list[tuple[str, int]] = []
        self.bodies: list[dict[str, Any]] = []
        self.delay_s = 0.0
        """How long each reply waits before it is sent."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.clients.append(tuple(scope["client"]))
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw)
        self.bodies.append(body)
        status, headers, content = self.reply(body)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")]
                + [(k.encode(), v.encode()) for k, v in headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": content})


@pytest_asyncio.fixture
async def server() -> AsyncIterator[tuple[Server, str]]:
    # The server runs in its own task: pytest-asyncio sets a fixture up and tears it down
    # in different tasks, and uvicorn's serve() must be awaited in one.
    app = Server()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="error", access_log=False))
    task = asyncio.get_running_loop().create_task(uv.serve([sock]))
    while not uv.started and not task.done():  # noqa: ASYNC110 - uvicorn has no "started" event
        await asyncio.sleep(0.01)
    try:
        yield app, f"http://127.0.0.1:{port}/v1"
    finally:
        uv.should_exit = True
        await task
        sock.close()


def request(text: str = "hello", **kw: Any) -> ModelRequest:
    return ModelRequest(model="m", messages=(Message("user", text),), **kw)


TRANSPORTS: list[Callable[[str], Transport]] = [
    lambda url: OpenAITransport(url, api_key_env=None),  # plain HTTP: the lean client (`_wire`)
    lambda url: OpenAITransport(url, api_key_env=None, wire="aiohttp"),
    lambda url: OpenAISDKTransport(url, api_key_env=None),
]
IDS = ["lean", "aiohttp", "sdk"]


class TestCompletions:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("make", TRANSPORTS, ids=IDS)
    async def test_parses_text_and_usage(
        self, server: tuple[Server, str], make: Callable[[str], Transport]
    ) -> None:
        """Both transports return the same text, usage and cached tokens."""
        app, url = server
        t = make(url)
        c = await t.complete(request(max_tokens=5, temperature=0.0, prompt_cache_key="k"))
        await t.aclose()
        assert (c.text, c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_tokens) == (
            "hi",
            10,
            2,
            4,
        )
        assert app.bodies[0]["max_tokens"] == 5 and app.bodies[0]["prompt_cache_key"] == "k"

    @pytest.mark.asyncio
    async def test_sequential_calls_reuse_one_connection(self, server: tuple[Server, str]) -> None:
        """A trickle of calls goes over one keep-alive connection, not one per shard."""
        app, url = server
        t = OpenAITransport(url, api_key_env=None)
        for _ in range(20):
            await t.complete(request())
        await t.aclose()
        assert len(app.clients) == 20 and len(set(app.clients)) == 1

    @pytest.mark.asyncio
    async def test_rate_limit_headers_are_read(self, server: tuple[Server, str]) -> None:
        """x-ratelimit-* headers on a success reach the completion."""
        app, url = server
        headers = {"x-ratelimit-remaining-requests": "7", "x-ratelimit-reset-tokens": "6m0s"}
        app.reply = lambda body: (200, headers, json.dumps(COMPLETION).encode())
        t = OpenAITransport(url, api_key_env=None)
        c = await t.complete(request())
        await t.aclose()
        assert c.rate_limit is not None
        assert (c.rate_limit.remaining_requests, c.rate_limit.reset_tokens_s) == (7, 360.0)


class TestDeadlines:
    """One task keeps the time limit of every request in flight on a transport (no timer
    per request): what a caller can observe is the same, a `ConnectionFailed` that says
    the request timed out."""

    @pytest.mark.asyncio
    async def test_requests_past_their_limit_time_out_and_nothing_is_left(
        self, server: tuple[Server, str]
    ) -> None:
        """30 requests to a server that answers none within the limit: each fails as timed
        out, and the transport's book of deadlines is empty after."""
        app, url = server
        app.delay_s = 2.0
        transport = OpenAITransport(url, api_key_env=None, timeout_s=0.3)
        try:
            results = await asyncio.gather(
                *(transport.complete(request()) for _ in range(30)), return_exceptions=True
            )
        finally:
            await transport.aclose()
        assert len(app.bodies) == 30
        assert all(isinstance(r, ConnectionFailed) and "timed out" in str(r) for r in results), results
        assert len(transport._deadlines) == 0

    @pytest.mark.asyncio
    async def test_one_keeper_while_requests_are_in_flight_and_none_after(
        self, server: tuple[Server, str]
    ) -> None:
        """20 requests answered within their limit: one keeper task while they are in
        flight, whatever their number; it ends once none is left."""
        app, url = server
        app.delay_s = 0.2
        transport = OpenAITransport(url, api_key_env=None, timeout_s=0.8)  # the keeper ticks every 0.1 s

        def keepers() -> list[asyncio.Task[Any]]:
            return [
                t
                for t in asyncio.all_tasks()
                if t.get_name() == "rlm_async transport deadlines" and not t.done()
            ]

        try:
            calls = [asyncio.ensure_future(transport.complete(request())) for _ in range(20)]
            while len(app.bodies) < 20:  # noqa: ASYNC110 - the server's own count, polled
                await asyncio.sleep(0.01)
            during = len(keepers())
            completions = await asyncio.gather(*calls)
            for _ in range(100):  # the keeper ends at its next tick with nothing in flight
                if not keepers():
                    break
                await asyncio.sleep(0.02)
            after = len(keepers())
        finally:
            await transport.aclose()
        assert [c.text for c in completions] == ["hi"] * 20
        assert (during, after, len(transport._deadlines)) == (1, 0, 0)


class TestErrors:
    CASES: ClassVar[list[tuple[int, dict[str, str], dict[str, Any], type[Exception]]]] = [
        (429, {"retry-after-ms": "1500"}, {"error": {"message": "slow down"}}, RateLimited),
        (500, {}, {"error": {"message": "boom"}}, ServerError),
        (503, {"retry-after": "2"}, {}, ServerError),
        (401, {}, {"error": {"message": "bad key"}}, AuthenticationFailed),
        (404, {}, {"error": {"code": "model_not_found", "message": "no such model"}}, ModelNotFound),
        (
            400,
            {},
            {"error": {"code": "context_length_exceeded", "message": "too long"}},
            ContextLengthExceeded,
        ),
        (400, {}, {"error": {"message": "bad field"}}, BadRequest),
    ]

    @pytest.mark.asyncio
    @pytest.mark.parametrize("make", TRANSPORTS, ids=IDS)
    @pytest.mark.parametrize(("status", "headers", "body", "error"), CASES)
    async def test_status_translated(
        self,
        server: tuple[Server, str],
        make: Callable[[str], Transport],
        status: int,
        headers: dict[str, str],
        body: dict[str, Any],
        error: type[Exception],
    ) -> None:
        """Each HTTP status becomes the error class the governor acts on, by both transports."""
        app, url = server
        app.reply = lambda _: (status, headers, json.dumps(body).encode())
        t = make(url)
        with pytest.raises(error) as info:
            await t.complete(request())
        await t.aclose()
        assert str(status) in str(info.value)
        if status == 429:
            assert getattr(info.value, "retry_after", None) == 1.5

    @pytest.mark.asyncio
    @pytest.mark.parametrize("make", TRANSPORTS, ids=IDS)
    async def test_malformed_body_is_a_server_error(
        self, server: tuple[Server, str], make: Callable[[str], Transport]
    ) -> None:
        """A 200 whose body is not a completion is retryable (ServerError), not a crash."""
        app, url = server
        app.reply = lambda _: (200, {}, b'{"choices": "nope"')
        t = make(url)
        with pytest.raises(ServerError, match="malformed"):
            await t.complete(request())
        await t.aclose()

    @pytest.mark.asyncio
    async def test_a_redirect_is_refused_naming_where_it_points(self, server: tuple[Server, str]) -> None:
        """A 307 is not followed (the body is not kept to send twice): it is a BadRequest
        naming the address, so the user fixes base_url; the server saw one request."""
        app, url = server
        app.reply = lambda _: (307, {"location": "http://127.0.0.1:1/elsewhere"}, b"")
        t = OpenAITransport(url, api_key_env=None)
        with pytest.raises(BadRequest, match=re.escape("redirect to 'http://127.0.0.1:1/elsewhere'")):
            await t.complete(request())
        await t.aclose()
        assert len(app.bodies) == 1

    @pytest.mark.asyncio
    async def test_the_body_is_sent_whole(self, server: tuple[Server, str]) -> None:
        """A 50 KB prompt arrives intact though the client lets go of its bytes once written."""
        app, url = server
        text = "".join(chr(0x41 + i % 26) for i in range(50_000)) + " \u00e9\u4e2d"
        t = OpenAITransport(url, api_key_env=None)
        for _ in range(3):
            await t.complete(request(text))
        await t.aclose()
        assert [b["messages"][0]["content"] for b in app.bodies] == [text] * 3

    @pytest.mark.asyncio
    async def test_nothing_listening(self) -> None:
        """A closed port is ConnectionFailed naming the URL and what to check."""
        t = OpenAITransport("http://127.0.0.1:9/v1", api_key_env=None)
        with pytest.raises(ConnectionFailed, match=re.escape("cannot reach http://127.0.0.1:9/v1")):
            await t.complete(request())
        await t.aclose()

    def test_missing_key_for_a_remote_endpoint(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A remote endpoint without its key fails at construction, naming the variable."""
        monkeypatch.delenv("RLM_TEST_NO_SUCH_KEY", raising=False)
        with pytest.raises(MissingAPIKey, match="RLM_TEST_NO_SUCH_KEY"):
            OpenAITransport("https://api.example.invalid/v1", api_key_env="RLM_TEST_NO_SUCH_KEY")


class TestHeaders:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("12ms", 0.012),
            ("6m0s", 360.0),
            ("1.5s", 1.5),
            ("2", 2.0),
            ("1h2m3s", 3723.0),
            ("bogus", None),
            (None, None),
        ],
    )
    def test_go_durations(self, text: str | None, seconds: float | None) -> None:
        """OpenAI's reset headers are Go durations; junk parses to None."""
        assert (
            parse_duration(text) == pytest.approx(seconds)
            if seconds is not None
            else parse_duration(text) is None
        )

    def test_retry_after_ms_wins(self) -> None:
        """retry-after-ms is preferred over retry-after, as in OpenAI's SDK."""
        assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
        assert retry_after_seconds({"retry-after": "9"}) == 9.0

    def test_no_rate_limit_headers(self) -> None:
        """A response without x-ratelimit-* headers carries no rate-limit info."""
        assert parse_rate_limit_headers({"content-type": "application/json"}) is None
