"""The listening sockets of the service and of the simulator (`rlm_async._sockets`) give
accepted connections TCP_NODELAY under asyncio. With Nagle on, a response's body (written after its headers)
waited for the client's delayed ACK: 44 ms per request on a kept-alive connection
(measured on `rlm-async serve` before the fix). The option itself is what a test can
observe without timing: read on the server's side of a real loopback connection. They also
refuse, by name, a port no socket can take."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from rlm_async._sockets import listen_socket
from rlm_async.exceptions import ConfigError
from rlm_async.sim.server import _bind


async def nodelay_of_accepted(sock: socket.socket) -> int:
    """TCP_NODELAY of the server side of one connection accepted by asyncio on `sock`."""
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = writer.get_extra_info("socket")
        seen.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=sock)
    async with server:
        host, port = sock.getsockname()[:2]
        _, writer = await asyncio.open_connection(host, port)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()


@pytest.mark.parametrize(
    "bind",
    [pytest.param(listen_socket, id="service"), pytest.param(_bind, id="sim")],
)
def test_accepted_connections_have_nagle_off(bind: Callable[[str, int], socket.socket]) -> None:
    sock = bind("127.0.0.1", 0)
    assert asyncio.run(nodelay_of_accepted(sock)) != 0


def test_a_socket_without_its_protocol_named_keeps_nagle_on() -> None:
    """The control: the socket the service used to make (protocol 0) gets no TCP_NODELAY,
    so the test above observes the fix, not a default."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    assert asyncio.run(nodelay_of_accepted(sock)) == 0


@pytest.mark.parametrize("port", [70000, -1, True, "8000"])
@pytest.mark.parametrize(
    "bind",
    [pytest.param(listen_socket, id="service"), pytest.param(_bind, id="sim")],
)
def test_a_port_no_socket_can_take_is_refused_by_name(
    bind: Callable[[str, int], socket.socket], port: object
) -> None:
    """A `SimServer(port=...)` or a `ServeConfig` built in code reaches the bind with no CLI
    in between: the error names the range, not the socket's OverflowError."""
    with pytest.raises(
        ConfigError, match=r"port must be a whole number from 0 to 65535 \(0 picks a free one\)"
    ):
        bind("127.0.0.1", port)  # type: ignore[arg-type]
