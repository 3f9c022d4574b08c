"""Running the simulator: in the current event loop (`SimServer`), in its own process
(`SimProcess`), or as a blocking program (`serve`, `main` behind `rlm-async sim`).

In the current event loop (`SimServer`) the HTTP server is uvicorn with its pure-Python h11
parser, serving the raw ASGI app in `_app`: a well-kept server that runs as a guest inside
an existing asyncio loop (tests share one loop with the engine under test) and can be
handed an already-bound socket (port 0, read back before the first request).

In a process of its own (`SimProcess`, `serve`), where the simulator stands in for a
provider's machines in the benchmarks and shares their cores with the engine, it serves
with its own HTTP/1.1 front (`_front`: httptools, chat completions answered without an
ASGI layer) on uvloop where it is installed: measured with `benchmarks/sim_cpu.py`, the
front took about a fifth off its CPU per request (median 0.51 -> 0.41 ms at 25 KB bodies;
docs/benchmarks.md, "The simulator's own HTTP front").

`SimServer` needs the asyncio backend (uvicorn is asyncio-only). Uvicorn runs each
connection in a task of its own, outside any task group of ours; `SimServer` therefore
cancels every request in progress itself on exit, before uvicorn's graceful shutdown, so
leaving the block never waits for simulated latencies to run out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import uvicorn

from .._sockets import listen_socket, port_arg
from ._app import SimApp
from ._config import LatencyModel, PolicySpec, SimConfig
from ._front import serve_until_signalled
from ._log import RequestLog
from ._prefix_cache import PrefixCache
from .policies import policy_names

__all__ = ["SimProcess", "SimServer", "build_parser", "config_from_args", "main", "run_from_args", "serve"]

_LOOPBACK = "127.0.0.1"
_DELIBERATE = (
    # What uvicorn says when our app ends a response on purpose: a dropped connection
    # (fault "drop") or a request cancelled at shutdown.
    "ASGI callable returned without completing response.",
    "ASGI callable returned without starting response.",
)


class _QuietDeliberateAborts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in _DELIBERATE


def _bind(host: str, port: int) -> socket.socket:
    sock = listen_socket(host, port)  # TCP_NODELAY on its connections under plain asyncio
    sock.set_inheritable(True)
    return sock


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _uvicorn_config(app: SimApp) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http="h11",
        lifespan="off",
        ws="none",
        log_config=None,
        access_log=False,
        backlog=4096,  # a 1000-way fan-out connects all at once
        timeout_keep_alive=120,  # idle pooled connections closing under a client cause spurious errors
        timeout_graceful_shutdown=5,
        date_header=False,
        server_header=False,
        proxy_headers=False,  # the app never reads the client's address: skip the middleware
    )


class _Server(uvicorn.Server):
    """Uvicorn as a guest in the host's loop: told when it is listening, cancelling our
    requests at shutdown, and leaving signal handling to the host program."""

    def __init__(self, app: SimApp, *, on_started: Callable[[], None]) -> None:
        super().__init__(_uvicorn_config(app))
        self._app = app
        self._on_started = on_started
        self._exit = anyio.Event()

    def request_exit(self) -> None:
        self.should_exit = True
        self._exit.set()

    async def main_loop(self) -> None:
        # Wait for request_exit() instead of polling every 0.1 s, as uvicorn's own loop does.
        await self.on_tick(0)
        await self._exit.wait()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the host program's signals are its own

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._app.cancel_all()
        await super().shutdown(sockets=sockets)


class SimServer:
    """The simulator on 127.0.0.1, port 0, in the current event loop (asyncio backend).

    async with SimServer(SimConfig(...)) as sim:
        transport = OpenAITransport(sim.base_url)
        ...
        assert sim.log.max_in_flight() == 100
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or SimConfig()
        self.app = SimApp(self.config, clock=clock)
        self._requested_port = port
        self.port: int | None = None
        self._server: _Server | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._filter = _QuietDeliberateAborts()

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>/v1`: what an OpenAI client takes as `base_url`."""
        if self.port is None:
            raise RuntimeError("the server is not running; use `async with SimServer(...) as sim`")
        return f"http://{_LOOPBACK}:{self.port}/v1"

    @property
    def log(self) -> RequestLog:
        return self.app.log

    @property
    def cache(self) -> PrefixCache:
        return self.app.cache

    def reset(self) -> None:
        """Clear the log, cache, rate-limit buckets and fault draws between runs."""
        self.app.reset()

    async def __aenter__(self) -> SimServer:
        sock = _bind(_LOOPBACK, self._requested_port)
        self.port = sock.getsockname()[1]
        started = anyio.Event()
        self._server = _Server(self.app, on_started=started.set)
        logging.getLogger("uvicorn.error").addFilter(self._filter)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._server.serve, [sock])
        try:
            with anyio.fail_after(30):
                await started.wait()
        except BaseException:
            await self.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._server is not None and self._tg is not None
        self._server.request_exit()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self.app.close()
            logging.getLogger("uvicorn.error").removeFilter(self._filter)
            self._tg = None


# ================================================================ a separate process


def serve(
    config: SimConfig | None = None,
    *,
    host: str = _LOOPBACK,
    port: int = 0,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the simulator until SIGINT/SIGTERM (blocking). `on_ready(base_url)` is called
    once it listens."""
    options = {"use_uvloop": _installed("uvloop")}
    anyio.run(_serve, config or SimConfig(), host, port, on_ready, backend_options=options)


async def _serve(config: SimConfig, host: str, port: int, on_ready: Callable[[str], None] | None) -> None:
    app = SimApp(config)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]

    def started() -> None:
        _tune_gc()
        if on_ready is not None:
            on_ready(f"http://{host}:{bound}/v1")

    try:
        await serve_until_signalled(app, sock, started)
    finally:
        app.close()


def _tune_gc() -> None:
    """The process's garbage collector, set for a server that holds a thousand requests
    at once. What was built at start (modules, the oracle's question pools) is frozen out of
    every later collection, and a young collection waits for 20,000 new container objects
    instead of 700: on a 1,000-way fan-out the collector spent about 85 us a request (most
    of it in full collections walking every in-flight request). Cycles are still
    collected; only in this process (`serve`), never in a host program's."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


class SimProcess:
    """The simulator in a child process (`python -m rlm_async.sim`), so that it has a core
    of its own in benchmarks. A sync and async context manager.

        with SimProcess(SimConfig(...)) as sim:
            run_benchmark(sim.base_url)
            log = sim.read_log()

    The request log is written as JSONL to `log_path` (a temporary file unless given) and
    read back with `read_log()`, also after the process stopped.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        log_path: str | Path | None = None,
        startup_timeout_s: float = 60.0,
        python: str = sys.executable,
        source: str | Path | None = None,
    ) -> None:
        """`python`: the interpreter the child runs. `source`: the directory holding the
        `rlm_async` package the child imports (default: this one's); a benchmark comparing
        two versions of the simulator runs each from its own tree."""
        self.config = config or SimConfig()
        self._log_path = Path(log_path) if log_path is not None else None
        self._startup_timeout_s = startup_timeout_s
        self._python = python
        self._source = Path(source) if source is not None else Path(__file__).resolve().parents[2]
        if not (self._source / "rlm_async" / "sim").is_dir():
            raise ValueError(f"source={source!r}: no rlm_async/sim package under it")
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._final_log: RequestLog | None = None
        self.base_url: str | None = None
        self.port: int | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise RuntimeError("the process was not started")
        return self._log_path

    def read_log(self) -> RequestLog:
        """The requests the server finished so far (or all of them, once stopped)."""
        if self._final_log is not None:
            return self._final_log
        return RequestLog.load(self.log_path)

    def wait_until_idle(self, deadline_s: float = 60.0) -> None:
        """Block until the server holds no request: after a client was killed, until it has
        noticed the dropped connections and logged their requests (as cancelled)."""
        assert self.base_url is not None, "the simulator is not running"
        health = self.base_url.removesuffix("/v1") + "/health"
        give_up = time.monotonic() + deadline_s
        while True:
            with urllib.request.urlopen(health, timeout=5) as response:  # loopback only
                if json.loads(response.read())["in_flight"] == 0:
                    return
            if time.monotonic() > give_up:
                raise TimeoutError(f"the simulator still held requests after {deadline_s:g} s")
            time.sleep(0.05)

    def start(self) -> SimProcess:
        self._tmp = Path(tempfile.mkdtemp(prefix="rlm-sim-"))
        if self._log_path is None:
            self._log_path = self._tmp / "requests.jsonl"
        config_path = self._tmp / "config.json"
        config_path.write_text(json.dumps(self.config.to_dict()), encoding="utf-8")
        stderr_path = self._tmp / "stderr.txt"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self._source) + os.pathsep + env.get("PYTHONPATH", "")
        with open(stderr_path, "wb") as stderr:
            self._proc = subprocess.Popen(
                [
                    self._python,
                    "-P",  # not the working directory first: `source`'s package, by PYTHONPATH
                    "-m",
                    "rlm_async.sim",
                    "--config-json",
                    str(config_path),
                    "--log",
                    str(self._log_path),
                    "--port",
                    "0",
                    "--ready-json",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
            )
        try:
            ready = self._wait_ready(stderr_path)
        except BaseException:
            self.stop()
            raise
        self.base_url = ready["base_url"]
        self.port = int(ready["port"])
        return self

    def _wait_ready(self, stderr_path: Path) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + self._startup_timeout_s
        buffer = b""
        # poll, not select: select() refuses descriptors above 1,023, which a program
        # holding many connections (a load test, a benchmark) may already use.
        poller = select.poll()
        poller.register(proc.stdout.fileno(), select.POLLIN)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                tail = stderr_path.read_text(errors="replace")[-2000:]
                why = "timed out" if left <= 0 else f"exited with {proc.returncode}"
                raise RuntimeError(f"the simulator process {why} before it was ready:\n{tail}")
            if poller.poll(min(left, 0.2) * 1000):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    proc.wait(timeout=5)
                    continue
                buffer += chunk
        result: dict[str, Any] = json.loads(buffer.split(b"\n", 1)[0])
        return result

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (graceful: in-flight requests are cancelled), then SIGKILL if needed."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._log_path is not None and self._final_log is None:
            self._final_log = RequestLog.load(self._log_path)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> SimProcess:
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)


# ================================================================ command line


_DESCRIPTION = (
    "Run the simulated OpenAI-compatible model server (loopback only by default). It is a "
    "scripted stand-in for a model, not a model: it answers the synthetic workloads of "
    "rlm_async.workloads exactly and says so when it cannot answer a question."
)


def build_parser(*, add_help: bool = True) -> argparse.ArgumentParser:
    """The simulator's arguments; `rlm-async sim` reuses them (`add_help=False` as a parent)."""
    p = argparse.ArgumentParser(prog="rlm-async sim", description=_DESCRIPTION, add_help=add_help)
    p.add_argument("--config", help="TOML file; its [sim] table (or the whole file) is the SimConfig")
    p.add_argument("--table", default="sim", help="dotted table name inside --config (default: sim)")
    p.add_argument("--config-json", help=argparse.SUPPRESS)  # how SimProcess passes its config
    p.add_argument("--host", default=_LOOPBACK, help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=port_arg, default=0, help="port; 0 picks a free one (default)")
    p.add_argument("--log", help="append the request log here as JSONL")
    p.add_argument("--seed", type=int, help="seed for jitter and faults")
    p.add_argument("--models", help="comma-separated model names to serve")
    p.add_argument("--latency", choices=("instant", "realistic"), help="latency preset")
    p.add_argument("--root-policy", choices=policy_names(), help="policy for root turns")
    p.add_argument("--sub-policy", choices=policy_names(), help="policy for sub-calls")
    p.add_argument("--ready-json", action="store_true", help="print one JSON line on stdout once listening")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    if args.config_json:
        config = SimConfig.from_dict(json.loads(Path(args.config_json).read_text(encoding="utf-8")))
    elif args.config:
        config = SimConfig.from_toml(args.config, table=args.table or None)
    else:
        config = SimConfig()
    changes: dict[str, Any] = {}
    if args.log:
        changes["log_path"] = args.log
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.models:
        changes["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.latency:
        changes["latency"] = LatencyModel.realistic() if args.latency == "realistic" else LatencyModel()
    policies = config.policies
    if args.root_policy:
        policies = dataclasses.replace(policies, root=PolicySpec(name=args.root_policy))
    if args.sub_policy:
        policies = dataclasses.replace(policies, sub=PolicySpec(name=args.sub_policy))
    changes["policies"] = policies
    return dataclasses.replace(config, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rlm_async.sim`: serve until interrupted."""
    return run_from_args(build_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Serve with the parsed arguments of `build_parser()` until interrupted (what
    `rlm-async sim` and `python -m rlm_async.sim` both run)."""
    config = config_from_args(args)

    def ready(base_url: str) -> None:
        port = int(base_url.rsplit(":", 1)[1].split("/", 1)[0])
        if args.ready_json:
            line = {"event": "ready", "base_url": base_url, "port": port, "pid": os.getpid()}
            sys.stdout.write(json.dumps(line) + "\n")
        else:
            sys.stdout.write(f"rlm-async sim: serving {', '.join(config.models)} at {base_url}\n")
        sys.stdout.flush()

    try:
        serve(config, host=args.host, port=args.port, on_ready=ready)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after a clean shutdown
        pass
    return 0
