"""A fan-out's connections opened while its warm-up is in flight, end to end over real HTTP
against the simulator in a process of its own.

Followers released together used to open a TCP connection each at the moment they were
due. Now `Transport.preconnect` opens them while the warm-up is at the server and leaves
them idle in the pool. What can be observed of that from outside the engine: the kernel's
table of established connections to the server (`/proc/net/tcp`) holds one per follower
before the warm-up has finished, and not one more afterwards (the followers took those);
the server sees no extra request, no follower before the warm-up returned, and the same
bodies as without preconnecting. A preconnect the warm-up overtakes hands the connections
it opened to the followers before they go. No test asserts a duration.
"""

from __future__ import annotations

import contextvars
import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import pytest
from conftest import sandbox_config

import rlm_async._engine.fanout as fanout
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async._types import Message, ModelRequest
from rlm_async.demo import demo_config
from rlm_async.sim import (
    KindLatency,
    LatencyModel,
    LogEntry,
    Policies,
    PolicySpec,
    SimConfig,
    SimProcess,
    SimServer,
)
from rlm_async.transport import OpenAITransport
from rlm_async.workloads import oolong_counting

CHUNKS = 60
WARMUP_S = 1.0


def port_of(base_url: str | None) -> int:
    assert base_url is not None
    port = urlsplit(base_url).port
    assert port is not None
    return port


def connections_to(port: int) -> set[str]:
    """The local ends (address:port, as the kernel writes them) of the client-side TCP
    connections in state ESTABLISHED to `port` on this machine. A set: a table read while
    connections come and go can list a row twice (the kernel's reader resumes by position)."""
    ends = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                ends.add(local)
    return ends


def established_to(port: int) -> int:
    """Client-side TCP connections in state ESTABLISHED to `port` on this machine."""
    return len(connections_to(port))


@dataclass
class Watch:
    """Samples of the connections established to `port`, on the monotonic clock the server
    logs on: how many at each sample, and every one seen."""

    port: int
    samples: list[tuple[float, int]] = field(default_factory=list)
    ever: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Watch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            ends = connections_to(self.port)
            self.samples.append((time.monotonic(), len(ends)))
            self.ever |= ends
            time.sleep(0.01)

    def most_between(self, start: float, end: float) -> int:
        return max((n for t, n in self.samples if start <= t <= end), default=0)

    def at(self, when: float) -> int:
        """The last sample taken at or before `when`."""
        return max(((t, n) for t, n in self.samples if t <= when), default=(0.0, 0))[1]


@dataclass
class Run:
    """What the server logged, and what the kernel's table showed meanwhile."""

    log: list[LogEntry]
    watch: Watch
    stalled: Stalled | None = None

    def __post_init__(self) -> None:
        self.subs = [e for e in self.log if e.kind == "sub"]
        self.warmup = min(self.subs, key=lambda e: e.arrival)  # alone at the server, first


_OPENING = contextvars.ContextVar("_OPENING", default=False)
"""True in `OpenAITransport.preconnect`'s own tasks while `stall_preconnect` is on."""


@dataclass
class Stalled:
    """What a stalled `preconnect` did: connections it asked the pool for, and whether it
    was cancelled (by the warm-up's end) rather than returning."""

    asked: int = 0
    cancelled: bool = False


def stall_preconnect(mp: pytest.MonkeyPatch, after: int) -> Stalled:
    """`OpenAITransport.preconnect`, with each of its connects after the first `after` stalled
    until it is cancelled: a preconnect still under way when the warm-up returns."""
    original = OpenAITransport.preconnect
    seen = Stalled()

    async def stalling_preconnect(self: OpenAITransport, n: int) -> int:
        opens, name = _connects_of(self)
        connect = getattr(opens, name)

        async def stalling(*args: Any, **kwargs: Any) -> Any:
            if _OPENING.get():  # one of preconnect's openers, not a request
                seen.asked += 1
                if seen.asked > after:
                    await anyio.sleep_forever()
            return await connect(*args, **kwargs)

        setattr(opens, name, stalling)
        token = _OPENING.set(True)
        try:
            return await original(self, n)
        except anyio.get_cancelled_exc_class():
            seen.cancelled = True
            raise
        finally:
            _OPENING.reset(token)
            delattr(opens, name)

    mp.setattr(OpenAITransport, "preconnect", stalling_preconnect)
    return seen


def run(*, preconnect: bool, stall_after: int | None = None) -> Run:
    """A counting run of `CHUNKS` sub-calls whose warm-up takes `WARMUP_S` at the server
    (with `stall_after`, a preconnect that opens that many connections and no more)."""
    workload = oolong_counting("100k", seed=5)
    sim = SimConfig(
        latency=LatencyModel(root=KindLatency(ttft_s=0.01), sub=KindLatency(ttft_s=WARMUP_S, jitter=0.0)),
        policies=Policies(root=PolicySpec(name="rlm", options={"chunks": CHUNKS})),
        seed=2,
    )
    with pytest.MonkeyPatch.context() as mp, SimProcess(sim) as server:
        if not preconnect:

            async def nothing(self: object) -> None:
                return None

            mp.setattr(fanout._FanOut, "_preconnect", nothing)
        stalled = stall_preconnect(mp, stall_after) if stall_after is not None else None
        assert server.base_url is not None
        config = dataclasses.replace(demo_config(server.base_url), sandbox=sandbox_config())

        async def go() -> RLMResult:
            async with RLM(config=config) as rlm:
                return await rlm.acompletion(workload.context, workload.query)

        with Watch(port_of(server.base_url)) as watch:
            result = anyio.run(go)
        log = server.read_log().entries
    assert result.status == "ok", result.detail
    assert workload.score(result.response), (result.response, workload.truth)
    return Run(log, watch, stalled)


@pytest.fixture(scope="module")
def with_preconnect() -> Iterator[Run]:
    yield run(preconnect=True)


@pytest.fixture(scope="module")
def without() -> Iterator[Run]:
    yield run(preconnect=False)


@pytest.fixture(scope="module")
def stalled() -> Iterator[Run]:
    yield run(preconnect=True, stall_after=CHUNKS // 2)


@pytest.mark.e2e
class TestFollowersFindTheirConnectionsOpen:
    def test_a_connection_per_follower_is_up_before_the_warmup_returns(self, with_preconnect: Run) -> None:
        """While the warm-up is at the server, the kernel holds an established connection
        for every follower (and the warm-up's own)."""
        warmup = with_preconnect.warmup
        followers = CHUNKS - 1
        assert with_preconnect.watch.most_between(warmup.arrival, warmup.finish) >= followers + 1

    def test_without_it_the_followers_open_theirs_after(self, without: Run) -> None:
        """The control: with `_preconnect` a no-op, no follower arrives while the warm-up
        is at the server, and no connection opens then beyond those already open when it
        arrived (idle in the pool after the root's calls and the server's identification)
        and the warm-up's own. (A fixed bound of 3 failed once in a full run on a loaded
        machine, 7 seen in the window; what was open before it was not recorded.)"""
        warmup = without.warmup
        assert all(e.arrival >= warmup.finish for e in without.subs if e is not warmup)
        before = without.watch.at(warmup.arrival)
        assert without.watch.most_between(warmup.arrival, warmup.finish) <= max(3, before + 1), before

    def test_the_followers_take_those_connections_rather_than_open_more(
        self, with_preconnect: Run, without: Run
    ) -> None:
        """Over the whole run, no more connections are ever open at once than without
        preconnecting: the followers were sent on the ones opened ahead."""
        most = max(n for _, n in with_preconnect.watch.samples)
        assert most <= max(n for _, n in without.watch.samples) + 1, _timeline(with_preconnect)
        assert most <= CHUNKS + 2, _timeline(with_preconnect)

    def test_a_preconnect_the_warmup_overtook_hands_its_connections_to_the_followers(
        self, stalled: Run
    ) -> None:
        """Preconnecting still under way when the warm-up returns (half its connects stall)
        is cancelled, and the followers are released only once the connections it did open
        are in the pool: they take those and open only the rest, so no more connections are
        ever opened than the run has requests at once (the warm-up took the root's). Released
        before that, a few followers opened their own beside them: 62 in all, measured."""
        assert stalled.stalled is not None
        assert stalled.stalled.cancelled
        assert stalled.stalled.asked > CHUNKS // 2
        assert len(stalled.subs) == CHUNKS
        assert len(stalled.watch.ever) <= CHUNKS + 1, _timeline(stalled)

    def test_the_server_sees_the_same_requests_and_none_early(
        self, with_preconnect: Run, without: Run
    ) -> None:
        """Preconnecting sends nothing: the server gets exactly the requests (by body hash)
        of the run without it, and no follower before the warm-up finished."""
        warmup = with_preconnect.warmup
        assert len(with_preconnect.subs) == CHUNKS
        assert all(e.arrival >= warmup.finish for e in with_preconnect.subs if e is not warmup)
        assert sorted(e.body_sha256 or "" for e in with_preconnect.log) == sorted(
            e.body_sha256 or "" for e in without.log
        )


@pytest.mark.anyio
class TestTransportPreconnect:
    async def test_opens_as_many_as_asked_and_requests_reuse_them(self) -> None:
        """`preconnect(5)` leaves five connections up; five requests at once then open none."""
        async with SimServer() as sim:
            assert sim.base_url is not None
            port = port_of(sim.base_url)
            transport = OpenAITransport(sim.base_url, api_key_env=None)
            try:
                assert await transport.preconnect(5) == 5
                assert established_to(port) == 5
                assert sim.log.entries == []  # nothing was sent
                request = ModelRequest(model="sim-model", messages=(Message("user", "hi"),), max_tokens=8)
                async with anyio.create_task_group() as tg:
                    for _ in range(5):
                        tg.start_soon(transport.complete, request)
                assert len(sim.log.entries) == 5
                assert established_to(port) == 5
            finally:
                await transport.aclose()

    @pytest.mark.parametrize("wire", ["auto", "aiohttp"])
    async def test_a_few_connections_take_a_few_openers_many_take_sixteen(
        self, wire: Literal["auto", "aiohttp"]
    ) -> None:
        """An opener task per 8 connections, at most 16: a service's fan-out of 20 opens its
        connections three at a time (each opener a task the busy loop pays for), a wide
        fan-out's 300 sixteen at a time; all are opened either way, by either client."""
        async with SimServer() as sim:
            assert sim.base_url is not None
            assert await _preconnect_counted(sim.base_url, 20, wire) == (20, 3)
            assert await _preconnect_counted(sim.base_url, 300, wire) == (300, 16)

    async def test_never_more_than_the_pool_has_free(self) -> None:
        """With `max_connections=3`, asking for ten opens three: none waits for a slot."""
        async with SimServer() as sim:
            assert sim.base_url is not None
            transport = OpenAITransport(sim.base_url, api_key_env=None, max_connections=3)
            try:
                assert await transport.preconnect(10) == 3
            finally:
                await transport.aclose()

    async def test_a_server_that_is_not_there_opens_nothing_and_raises_nothing(self) -> None:
        """Connections that fail are left out; the requests open (and report) their own."""
        async with SimServer() as sim:
            assert sim.base_url is not None
            url = sim.base_url
        transport = OpenAITransport(url, api_key_env=None)  # its server has just stopped
        try:
            assert await transport.preconnect(3) == 0
        finally:
            await transport.aclose()


def _timeline(run: Run) -> str:
    """The connection counts as they changed, for a failure's message."""
    start = run.watch.samples[0][0] if run.watch.samples else 0.0
    changes, last = [], -1
    for t, n in run.watch.samples:
        if n != last:
            changes.append(f"{t - start:.2f}s:{n}")
            last = n
    return (
        f"warm-up at the server {run.warmup.arrival - start:.2f}-{run.warmup.finish - start:.2f}s; "
        f"{len(run.watch.ever)} connections in all; counts: {' '.join(changes)}"
    )


def _connects_of(transport: OpenAITransport) -> tuple[Any, str]:
    """Where `transport` opens its connections, to wrap: the lean client's pool on plain HTTP
    (`_wire`), aiohttp's connector with `wire="aiohttp"`."""
    pool = transport._lean_pool()
    if pool is not None:
        return pool, "_connect"
    return (transport._session or transport._open()).connector, "connect"


async def _preconnect_counted(base_url: str, n: int, wire: Literal["auto", "aiohttp"]) -> tuple[int, int]:
    """`preconnect(n)` on a fresh transport: (connections opened, most connects at once)."""
    transport = OpenAITransport(base_url, api_key_env=None, wire=wire)
    opens, name = _connects_of(transport)
    connect, at_once, peak = getattr(opens, name), [0], [0]

    async def counted(*args: Any, **kwargs: Any) -> Any:
        at_once[0] += 1
        peak[0] = max(peak[0], at_once[0])
        try:
            return await connect(*args, **kwargs)
        finally:
            at_once[0] -= 1

    setattr(opens, name, counted)
    try:
        return await transport.preconnect(n), peak[0]
    finally:
        await transport.aclose()
