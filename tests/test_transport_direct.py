"""The transport's direct connections on aiohttp (`wire="aiohttp"`; `https://` endpoints
always): a plain-HTTP connection to one address is opened by the event loop itself (not
aiohappyeyeballs), on asyncio and on uvloop, against the simulator in a child process over
real loopback HTTP. Plain HTTP by default goes through the lean client (`test_wire`)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohappyeyeballs
import aiohttp
import anyio
import pytest
from aiohttp.client_proto import ResponseHandler
from conftest import BOTH_LOOPS
from yarl import URL

from rlm_async import transport as wire
from rlm_async._types import Message, ModelRequest
from rlm_async.exceptions import ConnectionFailed
from rlm_async.sim import SimProcess
from rlm_async.transport import OpenAITransport


@pytest.fixture(params=BOTH_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]


def ask(text: str) -> ModelRequest:
    return ModelRequest(model="sim-model", messages=(Message("user", text),))


class HappyEyeballsSpy:
    """Stands in for `aiohappyeyeballs.start_connection`, counting the addresses of each call
    and then doing what the real one does (or refusing, to prove it is never reached)."""

    def __init__(self, *, refuse: bool) -> None:
        self.calls: list[int] = []
        self._refuse = refuse
        self._real: Callable[..., Awaitable[socket.socket]] = aiohappyeyeballs.start_connection

    async def __call__(self, *args: Any, **kwargs: Any) -> socket.socket:
        self.calls.append(len(kwargs["addr_infos"]))
        if self._refuse:
            raise AssertionError("aiohappyeyeballs was used for a single loopback address")
        return await self._real(*args, **kwargs)


class TestDirectConnections:
    def test_the_installed_aiohttp_has_the_step_the_connector_overrides(self) -> None:
        """The pool's connector is the direct one: aiohttp's `_wrap_create_connection` has the
        signature it overrides. Failing here means a new aiohttp changed that private step:
        the pool fell back to aiohttp's own connector (correct, slower); update the override."""
        assert wire._CONNECTOR is wire._DirectConnector

    @pytest.mark.anyio
    async def test_loopback_requests_connect_without_happy_eyeballs(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Requests to 127.0.0.1 and `preconnect` open their connections with the loop's own
        `create_connection`: aiohappyeyeballs is never called, and every answer is right."""
        spy = HappyEyeballsSpy(refuse=True)
        monkeypatch.setattr(aiohappyeyeballs, "start_connection", spy)
        async with SimProcess() as sim:
            assert sim.base_url is not None
            transport = OpenAITransport(sim.base_url, api_key_env=None, wire="aiohttp")
            texts: dict[int, str] = {}

            async def one(i: int) -> None:
                texts[i] = (await transport.complete(ask(f"ping {i}"))).text

            try:
                assert await transport.preconnect(3) == 3
                async with anyio.create_task_group() as tg:
                    for i in range(8):
                        tg.start_soon(one, i)
            finally:
                await transport.aclose()
            served = len(sim.read_log())
        assert texts == {i: f"ECHO: ping {i}" for i in range(8)}
        assert served == 8 and spy.calls == []

    @pytest.mark.anyio
    async def test_a_refused_connection_is_connection_failed_naming_the_server(self) -> None:
        """With nothing listening, the direct path's refusal reaches the caller as the
        transport's ConnectionFailed, naming the address and what to check."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        transport = OpenAITransport(f"http://127.0.0.1:{port}/v1", api_key_env=None, wire="aiohttp")
        try:
            with pytest.raises(
                ConnectionFailed, match=rf"cannot reach http://127\.0\.0\.1:{port}/v1 .*check base_url"
            ):
                await transport.complete(ask("ping"))
        finally:
            await transport.aclose()

    @pytest.mark.anyio
    async def test_several_addresses_are_raced_by_aiohttp(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A host with two addresses (a name with IPv4 and IPv6 records) takes aiohttp's own
        happy-eyeballs path, which connects to one of them."""
        spy = HappyEyeballsSpy(refuse=False)
        monkeypatch.setattr(aiohappyeyeballs, "start_connection", spy)
        async with SimProcess() as sim:
            assert sim.base_url is not None and sim.port is not None
            loop = asyncio.get_running_loop()
            connector = wire._DirectConnector()
            address = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", sim.port))
            request = aiohttp.ClientRequest("POST", URL(sim.base_url), loop=loop)
            try:
                transport, _ = await connector._wrap_create_connection(
                    lambda: ResponseHandler(loop),
                    addr_infos=[address, address],
                    req=request,
                    timeout=aiohttp.ClientTimeout(sock_connect=10),
                )
                peer = transport.get_extra_info("peername")
                transport.close()
            finally:
                await connector.close()
        assert spy.calls == [2] and peer == ("127.0.0.1", sim.port)
