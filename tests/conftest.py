"""Shared fixtures: no network but loopback, a simulated server, config builders.

The network guard is installed for the whole session, collection included (not as a
fixture a test could forget to request): `socket.socket.connect` / `connect_ex` refuse
any address that is not loopback or a Unix socket, with an error naming the address.
Processes a test starts (REPL workers, a simulator in a child process) are not affected
by it; the workers have their own empty network namespace under bubblewrap."""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import os
import resource
import socket
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from functools import cache
from typing import Any

import anyio
import pytest
import pytest_asyncio
import structlog

from rlm_async._config import ModelConfig, RLMConfig
from rlm_async._events import Event, WorkerStart
from rlm_async._governor import ModelPrice
from rlm_async.sandbox import SandboxConfig
from rlm_async.sandbox import _launch as launch
from rlm_async.sim import SimConfig, SimServer
from rlm_async.testing import CapturedEvents

# --------------------------------------------------------------------------- network guard


class NetworkAccessDenied(RuntimeError):
    """A test tried to reach a non-loopback address. Not an OSError on purpose: nothing
    translates it into a retryable connection failure, so it fails the test loudly."""


def _is_local(address: Any) -> bool:
    if isinstance(address, str | bytes):  # AF_UNIX path (or abstract name)
        return True
    if not isinstance(address, tuple) or not address:
        return False
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:  # a host name: resolution already happened elsewhere, refuse it
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self: socket.socket, address: Any) -> None:
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
        raise NetworkAccessDenied(f"tests may only connect to loopback, not {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
        raise NetworkAccessDenied(f"tests may only connect to loopback, not {address!r}")
    return _real_connect_ex(self, address)


_guard = pytest.MonkeyPatch()


def pytest_configure(config: pytest.Config) -> None:
    """Installed before collection, so module-level code of test files is covered too."""
    _guard.setattr(socket.socket, "connect", _guarded_connect)
    _guard.setattr(socket.socket, "connect_ex", _guarded_connect_ex)


def pytest_unconfigure(config: pytest.Config) -> None:
    _guard.undo()


# --------------------------------------------------------------------------- sandbox


needs_uvloop = pytest.mark.skipif(
    importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
)

BOTH_LOOPS = [
    pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop", marks=needs_uvloop),
]
"""`anyio_backend` params for a module whose tests run on both loops rlm_async runs on:
`@pytest.fixture(params=BOTH_LOOPS)` over `def anyio_backend(request): return request.param`."""


@cache
def bwrap_works() -> bool:
    """Whether bubblewrap runs here (probed once). Tests run workers under it when it does,
    else as plain subprocesses with isolation="none" (no ReducedIsolationWarning, which the
    test settings turn into an error)."""
    bwrap = launch.find_bwrap(None)
    if bwrap is None:
        return False

    async def probe() -> str | None:
        interp = await launch.find_interpreter(None)
        return await launch.probe_bwrap(bwrap, interp, allow_network=False, may_setuid=os.geteuid() == 0)

    # Called from inside tests' event loops too: probe in a thread of its own.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, probe).result() is None


def sandbox_config(**overrides: Any) -> SandboxConfig:
    """Generous timeouts: tests assert statuses, never durations."""
    base: dict[str, Any] = {
        "isolation": "bwrap" if bwrap_works() else "none",
        "cell_timeout_s": 30.0,
        "start_timeout_s": 60.0,
    }
    base.update(overrides)
    return SandboxConfig(**base)


# --------------------------------------------------------------------------- configs

FREE = ModelPrice.free()


def model(name: str, base_url: str = "scripted://", **overrides: Any) -> ModelConfig:
    """A model on a keyless endpoint, free unless `prices=` says otherwise."""
    fields: dict[str, Any] = {"model": name, "base_url": base_url, "api_key_env": None, "prices": FREE}
    fields.update(overrides)
    return ModelConfig(**fields)


def rlm_config(
    base_url: str = "scripted://",
    *,
    root: str = "root-model",
    sub: str | None = "sub-model",
    root_overrides: dict[str, Any] | None = None,
    sub_overrides: dict[str, Any] | None = None,
    **overrides: Any,
) -> RLMConfig:
    """An `RLMConfig` with a root and a sub model on `base_url` and the test sandbox."""
    fields: dict[str, Any] = {
        "root": model(root, base_url, **(root_overrides or {})),
        "sub": model(sub, base_url, **(sub_overrides or {})) if sub else None,
        "sandbox": sandbox_config(),
    }
    fields.update(overrides)
    return RLMConfig(**fields)


def sim_config(sim: SimServer, **overrides: Any) -> RLMConfig:
    """The simulator's root (`sim-model`) and sub (`sim-mini`) models."""
    return rlm_config(sim.base_url, root="sim-model", sub="sim-mini", **overrides)


# --------------------------------------------------------------------------- events


class EventLog(CapturedEvents):
    """An event sink that keeps every event, in order, for a test that passes its sink to
    one run (`capture_events()` catches everything emitted in a block)."""

    def __call__(self, event: Event) -> None:
        self.append(event)

    @property
    def events(self) -> list[Event]:
        return self

    def worker_pids(self) -> list[int]:
        return [e.pid for e in self.of(WorkerStart)]


@pytest.fixture
def events() -> EventLog:
    return EventLog()


# --------------------------------------------------------------------------- the simulator


@asynccontextmanager
async def open_sim(config: SimConfig | None = None) -> AsyncIterator[SimServer]:
    async with SimServer(config or SimConfig()) as server:
        yield server


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[SimServer]:
    """The simulated OpenAI-compatible server with its default policies, on loopback.

    pytest-asyncio runs a fixture's setup and teardown in different tasks, and SimServer
    holds a task group (which must be left in the task that entered it), so the server
    lives in a task of its own for the length of the test."""
    up, stop = anyio.Event(), anyio.Event()
    box: list[SimServer] = []

    async def serve() -> None:
        try:
            async with open_sim() as server:
                box.append(server)
                up.set()
                await stop.wait()
        finally:
            up.set()  # also when starting failed: the fixture then raises its error

    task = asyncio.get_running_loop().create_task(serve())
    await up.wait()
    if not box:
        await task  # raises why the server did not start
    try:
        yield box[0]
    finally:
        stop.set()
        await task


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Tests that call the CLI in-process configure structlog for the whole process: put
    its defaults back after every test, so no test inherits another's log destination."""
    yield
    structlog.reset_defaults()


# --------------------------------------------------------------------------- descriptors


@contextmanager
def descriptors_above_1023() -> Iterator[None]:
    """Within the block 1,100 more descriptors are open, so the next ones are numbered
    above select()'s limit of 1,023, as in a server or load test holding thousands of
    connections. Skips the test where the hard RLIMIT_NOFILE leaves no room."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1_200:
        pytest.skip(f"the hard RLIMIT_NOFILE ({hard}) leaves no room above 1,023")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1_200), hard))
    filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1_100)]
    try:
        yield
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
