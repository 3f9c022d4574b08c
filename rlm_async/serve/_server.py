"""Running the service under uvicorn, with a graceful SIGTERM.

On SIGTERM (or SIGINT): the listening sockets close at once (no new connections), requests
on open connections get 503, in-flight queries have `grace_s` to finish, the rest are
cancelled (the engine kills their workers), job records are written, then uvicorn shuts
down and the `Service` closes every RLM (connection pools, journals). A second signal
exits at once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn

from .. import _events
from .._sockets import listen_socket
from .._trace import TraceWriter
from ..exceptions import ConfigError
from ._app import create_app
from ._auth import KeyRing
from ._config import ServeConfig
from ._service import Service

__all__ = ["run_server"]

_log = logging.getLogger("rlm_async.serve")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, service: Service, grace_s: float, on_started: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._service = service
        self._grace_s = grace_s
        self._drain_requested = False
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested:  # a second signal: stop now
            self.force_exit = True
            self.should_exit = True
            return
        self._drain_requested = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and not self._draining:
            self._draining = True
            for server in self.servers:  # stop accepting; open connections stay
                server.close()
            await self._service.drain(self._grace_s)
            self.should_exit = True
        return await super().on_tick(counter)


def check_exposure(host: str, keys: KeyRing) -> str:
    """Refuse to serve beyond loopback without keys; say what the server is exposing."""
    if keys.enabled:
        return f"{len(keys)} bearer key(s) configured; requests without one get 401"
    if not _is_loopback(host):
        raise ConfigError(
            f"no API keys are configured, so the server binds loopback only, not {host!r}: set "
            "RLM_SERVE_KEYS (tenant:key,...) or [serve] keys_file to serve other hosts"
        )
    return "no API keys configured: serving loopback only, without authentication"


async def run_server(
    config: ServeConfig,
    *,
    on_ready: Callable[[str, str], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. `on_ready(base_url, auth_note)` once listening."""
    keys = KeyRing.load(env=config.keys_env, file=config.keys_file)
    note = check_exposure(config.host, keys)
    sock = listen_socket(config.host, config.port)
    port = sock.getsockname()[1]
    sinks: tuple[_events.EventSink, ...] = ()
    if config.otel:
        from ._otel import SpanSink

        sinks = (SpanSink(),)
    with contextlib.ExitStack() as stack:
        if config.trace_dir is not None:
            sinks = (*sinks, stack.enter_context(TraceWriter(config.trace_dir)))
        await _serve(config, keys, sock, port, note, sinks, on_ready)


async def _serve(
    config: ServeConfig,
    keys: KeyRing,
    sock: socket.socket,
    port: int,
    note: str,
    sinks: tuple[_events.EventSink, ...],
    on_ready: Callable[[str, str], None] | None,
) -> None:
    async with Service(config, event_sinks=sinks) as service:
        note = "; ".join((note, *service.notes))
        app = create_app(service, keys)
        uv = uvicorn.Config(
            app,
            lifespan="off",
            ws="none",
            log_config=None,
            access_log=False,
            backlog=4096,
            timeout_keep_alive=75,
            timeout_graceful_shutdown=5,
        )
        host = f"[{config.host}]" if ":" in config.host else config.host

        def started() -> None:
            if on_ready is not None:
                on_ready(f"http://{host}:{port}/v1", note)

        await _Server(uv, service, config.grace_s, started).serve([sock])
