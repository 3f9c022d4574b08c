"""The listening sockets of rlm_async's own HTTP servers (the service and the simulator)."""

from __future__ import annotations

import argparse
import socket

from .exceptions import ConfigError

__all__ = ["checked_port", "listen_socket", "port_arg"]


def checked_port(port: object, *, where: str = "") -> int:
    """`port` if it is one a server can listen on (0 picks a free one), else a `ConfigError`
    that says so (`where`: the setting's table, e.g. "[serve] "). Checked before binding:
    the socket's own refusal is an `OverflowError` that names neither the setting nor the range."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(
            f"{where}port must be a whole number from 0 to 65535 (0 picks a free one), not {port!r}"
        )
    return port


def port_arg(text: str) -> int:
    """argparse's type for a `--port` option: the usage error names the range."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port: use a whole number from 0 to 65535"
        ) from None
    try:
        return checked_port(port)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` (IPv6 where `host` has a colon), not yet listening.

    Its `proto` names TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on accepted
    sockets whose `proto` says TCP, and they inherit it from this one. Left 0, each
    response's body (written after its headers) waited for the client's delayed ACK: 44 ms
    for every request on a kept-alive connection (uvloop sets TCP_NODELAY either way)."""
    checked_port(port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
