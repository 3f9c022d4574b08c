"""The listening sockets of rlm_async's own HTTP servers (the service and the simulator)."""

from __future__ import annotations

import socket

__all__ = ["listen_socket"]


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` (IPv6 where `host` has a colon), not yet listening.

    Its `proto` names TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on accepted
    sockets whose `proto` says TCP, and they inherit it from this one. Left 0, each
    response's body (written after its headers) waited for the client's delayed ACK: 44 ms
    for every request on a kept-alive connection (uvloop sets TCP_NODELAY either way)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
