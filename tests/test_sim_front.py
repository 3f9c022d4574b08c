"""The simulator process's own HTTP/1.1 front (`rlm_async.sim._front`), over real sockets on
loopback: raw HTTP where a client library would hide what is under test (Expect, pipelining,
chunked bodies, HTTP/1.0, malformed input), curl and the `openai` SDK against the process
itself. What is asserted is what a client or the server's log can see: status lines,
headers, bodies, connections closed or kept, and the log's entries and outcomes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable

import anyio
import openai
import pytest

from rlm_async.sim import Faults, KindLatency, LatencyModel, SimConfig, SimProcess
from rlm_async.sim._app import SimApp
from rlm_async.sim._front import FrontServer

pytestmark = pytest.mark.anyio

BODY = json.dumps({"model": "sim-model", "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
"""A chat completion whose body is over 1 KB (where curl starts sending `Expect: 100-continue`)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Front:
    def __init__(self, app: SimApp, port: int) -> None:
        self.app = app
        self.port = port

    async def connect(self) -> anyio.abc.SocketStream:
        return await anyio.connect_tcp("127.0.0.1", self.port)


@contextlib.asynccontextmanager
async def serving(config: SimConfig, max_body: int = 1 << 20) -> AsyncIterator[Front]:
    """A `FrontServer` for a `SimApp` of `config`, in the test's own loop."""
    app = SimApp(config)
    sock = socket.create_server(("127.0.0.1", 0))
    server = FrontServer(app, max_body=max_body)
    await server.start(sock)
    try:
        yield Front(app, sock.getsockname()[1])
    finally:
        await server.aclose()
        app.close()


@pytest.fixture
async def front() -> AsyncIterator[Front]:
    async with serving(SimConfig()) as f:
        yield f


def request(body: bytes = BODY, *, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/" + version + b"\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


async def read_response(
    stream: anyio.abc.SocketStream, buffer: bytearray
) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One response (status line, headers, body by content-length) from `stream`; what
    was read past it stays in `buffer`."""
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive()
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    length = int(headers.get(b"content-length", b"0"))
    buffer[:] = rest
    while len(buffer) < length:
        buffer += await stream.receive()
    body = bytes(buffer[:length])
    del buffer[:length]
    return status, headers, body


async def closed(stream: anyio.abc.SocketStream) -> bool:
    """Whether the server closes the connection within 5 s, rather than keeping it."""
    return await closed_after(stream, bytearray())


class TestRequests:
    async def test_two_requests_on_one_connection_and_two_pipelined_are_answered_in_order(
        self, front: Front
    ) -> None:
        """Keep-alive: a second request on the same connection is answered; two sent in one
        write are answered in the order sent. The log has all three."""
        async with await front.connect() as stream:
            buffer = bytearray()
            await stream.send(request())
            first = await read_response(stream, buffer)
            await stream.send(request() + request())
            second = await read_response(stream, buffer)
            third = await read_response(stream, buffer)
        ids = [json.loads(r[2])["id"] for r in (first, second, third)]
        assert [r[0] for r in (first, second, third)] == [b"HTTP/1.1 200 OK"] * 3
        assert ids == sorted(ids) and len(set(ids)) == 3
        assert [e.outcome for e in front.app.log] == ["ok"] * 3

    async def test_hundreds_pipelined_in_one_write_are_all_answered_in_order(self, front: Front) -> None:
        """More than the front parses ahead (it stops reading past 64 waiting, and goes on
        as it answers them): all 300 answered, in the order sent."""
        async with await front.connect() as stream:
            buffer = bytearray()
            await stream.send(request() * 300)
            ids = [json.loads((await read_response(stream, buffer))[2])["id"] for _ in range(300)]
        assert ids == sorted(ids) and len(set(ids)) == 300
        assert len(front.app.log) == 300

    async def test_expect_100_continue_is_answered_before_the_body(self, front: Front) -> None:
        """The client waits for `100 Continue` before it sends the body (as curl does)."""
        head = request(extra=b"expect: 100-continue\r\n").partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        async with await front.connect() as stream:
            await stream.send(head)
            assert await stream.receive() == b"HTTP/1.1 100 Continue\r\n\r\n"
            await stream.send(BODY)
            status, _, body = await read_response(stream, bytearray())
        assert status == b"HTTP/1.1 200 OK" and json.loads(body)["object"] == "chat.completion"

    async def test_a_chunked_body_is_read_whole(self, front: Front) -> None:
        chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (100, BODY[:100], len(BODY) - 100, BODY[100:])
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        async with await front.connect() as stream:
            await stream.send(head + chunked)
            status, _, body = await read_response(stream, bytearray())
        assert status == b"HTTP/1.1 200 OK"
        assert json.loads(body)["usage"]["prompt_tokens"] == front.app.log.entries[0].prompt_tokens > 500

    async def test_http_1_0_gets_its_answer_and_the_connection_closes(self, front: Front) -> None:
        async with await front.connect() as stream:
            await stream.send(request(version=b"1.0"))
            status, headers, _ = await read_response(stream, bytearray())
            assert status == b"HTTP/1.1 200 OK" and headers[b"connection"] == b"close"
            assert await closed(stream)

    async def test_other_paths_go_through_the_app(self, front: Front) -> None:
        """Models, health, an unknown path (404) and a HEAD (answered without a body: the
        next response follows its head directly), on one connection."""
        async with await front.connect() as stream:
            buffer = bytearray()
            await stream.send(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            models = await read_response(stream, buffer)
            await stream.send(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            health = await read_response(stream, buffer)
            await stream.send(b"GET /nowhere?x=1 HTTP/1.1\r\nhost: x\r\n\r\n")
            missing = await read_response(stream, buffer)
            await stream.send(b"HEAD /health HTTP/1.1\r\nhost: x\r\n\r\n")
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive()
            await stream.send(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
            buffer[:] = rest  # nothing after the HEAD's head: the next bytes are the next response
            after_head = await read_response(stream, buffer)
        assert [m["id"] for m in json.loads(models[2])["data"]] == list(SimConfig().models)
        assert json.loads(health[2]) == {"ok": True, "in_flight": 0}
        assert missing[0].startswith(b"HTTP/1.1 404") and b"Unknown path GET /nowhere" in missing[2]
        assert head.startswith(b"HTTP/1.1 404") and after_head[0] == b"HTTP/1.1 200 OK"


class TestRefusals:
    async def test_malformed_http_is_a_400_and_the_connection_closes(self, front: Front) -> None:
        async with await front.connect() as stream:
            await stream.send(b"NOT HTTP AT ALL\r\n\r\n")
            status, _, body = await read_response(stream, bytearray())
            assert status.startswith(b"HTTP/1.1 400")
            error = json.loads(body)["error"]
            assert error["type"] == "invalid_request_error" and "malformed HTTP request" in error["message"]
            assert await closed(stream)

    async def test_a_bug_in_the_app_is_a_500_and_the_connection_closes(
        self, front: Front, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async def broken(*args: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(front.app, "respond", broken)
        async with await front.connect() as stream:
            await stream.send(request())
            status, _, body = await read_response(stream, bytearray())
            assert status.startswith(b"HTTP/1.1 500") and json.loads(body)["error"]["type"] == "server_error"
            assert await closed(stream)

    async def test_a_body_over_the_limit_is_a_413_by_length_or_as_it_arrives(self) -> None:
        """Refused by its declared length (before a `100 Continue` is sent for it) or, sent
        chunked, as it passes the limit; the app never sees it."""
        async with serving(SimConfig(), max_body=1000) as front:
            async with await front.connect() as stream:
                await stream.send(request())  # content-length 2,000+
                status, _, body = await read_response(stream, bytearray())
                assert status.startswith(b"HTTP/1.1 413") and b"over 1,000 bytes" in body
                assert await closed(stream)
            head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            async with await front.connect() as stream:
                await stream.send(head + b"%x\r\n%s\r\n" % (len(BODY), BODY))
                status, _, _ = await read_response(stream, bytearray())
                assert status.startswith(b"HTTP/1.1 413")
            expecting = request(extra=b"expect: 100-continue\r\n").partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
            async with await front.connect() as stream:
                await stream.send(expecting)  # no 100 Continue for a body already too large
                status, _, _ = await read_response(stream, bytearray())
                assert status.startswith(b"HTTP/1.1 413")
            assert len(front.app.log) == 0


class TestEndings:
    async def test_a_client_that_leaves_cancels_its_request(self) -> None:
        """Closed mid-request: the app logs it as cancelled and holds nothing any more."""
        config = SimConfig(latency=LatencyModel(sub=KindLatency(ttft_s=30.0)))
        async with serving(config) as front:
            async with await front.connect() as stream:
                await stream.send(request())
                await until(lambda: front.app.in_flight == 1)
            await until(lambda: front.app.in_flight == 0)
            (entry,) = front.app.log.entries
            assert entry.outcome == "cancelled"

    async def test_an_injected_drop_sends_half_the_body_then_closes(self) -> None:
        async with serving(SimConfig(faults=Faults(script=("drop",)))) as front:
            async with await front.connect() as stream:
                await stream.send(request())
                received = bytearray()
                assert await closed_after(stream, received)
            head, _, body = bytes(received).partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            assert head.startswith(b"HTTP/1.1 200") and 0 < len(body) < length
            assert front.app.log.entries[0].outcome == "drop"

    async def test_closing_the_server_cancels_what_is_in_flight(self) -> None:
        config = SimConfig(latency=LatencyModel(sub=KindLatency(ttft_s=30.0)))
        app = SimApp(config)
        sock = socket.create_server(("127.0.0.1", 0))
        server = FrontServer(app)
        await server.start(sock)
        async with await anyio.connect_tcp("127.0.0.1", sock.getsockname()[1]) as stream:
            await stream.send(request())
            await until(lambda: app.in_flight == 1)
            await server.aclose()
            assert await closed(stream)
        assert [e.outcome for e in app.log] == ["cancelled"] and app.in_flight == 0
        app.close()


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition` (the app's own counters have no event to wait on), 10 s at most."""
    for _ in range(1000):
        if condition():
            return
        await anyio.sleep(0.01)
    raise AssertionError("the condition did not come true within 10 s")


async def closed_after(stream: anyio.abc.SocketStream, buffer: bytearray) -> bool:
    """Read into `buffer` until the server closes (True), for at most 5 s (False)."""
    try:
        with anyio.move_on_after(5):
            while True:
                buffer += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return True
    return False


class TestTheProcess:
    def test_curl_and_the_openai_sdk_against_the_simulator_process(self) -> None:
        """`SimProcess` serves with the front: curl (which sends `Expect: 100-continue` for
        this body) and the SDK get a completion each, and the log has both."""
        curl = shutil.which("curl")
        with SimProcess(SimConfig()) as sim:
            assert sim.base_url is not None
            client = openai.OpenAI(base_url=sim.base_url, api_key="unused", max_retries=0)
            completion = client.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": "ping"}]
            )
            client.close()
            assert completion.choices[0].message.content == "ECHO: ping"
            if curl is not None:
                out = subprocess.run(
                    [curl, "-sS", "--max-time", "20", "-H", "content-type: application/json",
                     "--data-binary", BODY.decode(), sim.base_url + "/chat/completions"],
                    capture_output=True, check=True, timeout=30,
                )  # fmt: skip
                assert json.loads(out.stdout)["choices"][0]["message"]["content"].startswith("ECHO: xxx")
            entries = sim.read_log().entries
        assert [e.outcome for e in entries] == ["ok"] * (2 if curl else 1)
