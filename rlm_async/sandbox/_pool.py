"""A pool of pre-started REPL workers: start-up paid before a query asks, never reuse.

Starting a worker (the sandbox, a Python interpreter, the bootstrap's imports) is most of
what a query waits for before its first cell can run, and when a hundred queries arrive
together, a hundred start-ups share the same cores. The pool keeps `size` workers launched
and up (each said `hello`), with no context yet, and refills in the background as they are
taken, mostly once the queries it served have ended (see `_may_refill`):

    async with WorkerPool(SandboxConfig(), size=16) as pool:
        worker = await pool.start_worker(context)   # a pre-started one, or one started now
        ...
        await worker.aclose()                       # killed: it never returns to the pool

What it does not do, on purpose:

- **No reuse.** A worker gets exactly one context (the protocol refuses a second `init`)
  and is killed when its query ends; nothing of one query, or tenant, can reach another,
  because no process ever serves two.
- **No weaker isolation.** A pre-started worker is launched by the same code, with the same
  tier, limits, seccomp filter and private uid as one started on demand; it confines itself
  (rlimits, uid switch, the landlock tier's lock-down) when its context arrives, before it
  touches any untrusted data, exactly as an on-demand one does.
- **Not counted under `RLMConfig.max_workers`.** Idle workers hold no context (about 18 MB
  resident each); `size` bounds them. A taken worker counts as soon as its node holds a slot.
  Where workers share the engine's uid (landlock or none tier, engine not root), idle ones
  do count in the shared-uid process accounting, and each worker's process cap is sized
  when its context arrives (with the caller's `peers`), not when it was pre-started.
- **No different REPL.** The tools and values of a query (`ReplSetup`) go to a pre-started
  worker with its context, in the same `init` frame an on-demand worker gets.

A pool that cannot pre-start a worker says so at once: entering it raises the
`IsolationUnavailable` or `SandboxError` an on-demand start would. Failures later (a
worker that dies while idle, a start that fails under load) are counted in `stats()`, and
a query then starts its worker on demand, where the same failure surfaces as its own error.
Leaving the pool kills every idle worker and every start in flight.
"""

from __future__ import annotations

import os
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import anyio
import anyio.abc
import anyio.lowlevel

from .._context import Context, validate_context
from ..exceptions import ConfigError, SandboxError
from ._config import ReplSetup, SandboxConfig
from ._isolation import Plan, plan_isolation
from ._process import WorkerProcess, encode_context_async, launch_process
from ._worker import Worker

__all__ = ["PoolStats", "WorkerPool"]

_MAX_BACKOFF_S = 30.0
_PRIORITY_TRIES = 10
_QUIET_TURN_S = 0.002
"""A refill starts only when one turn of the event loop takes less than this."""
_RECHECK_S = 0.05
_IDLE_CORES = 1.0
"""While workers it handed out still run, a refill (up to the reserve) starts only when at
least this many cores of the machine were idle over the last `_RECHECK_S` or more
(`/proc/stat`)."""
_RESERVE_SHARE = 0.1
"""While workers it handed out still run, the pool refills only up to this share of its
size (at least one worker): `WorkerPool.reserve`."""


def _cpu_idle_s() -> float | None:
    """Idle CPU seconds of the machine since boot, all cores (None where `/proc/stat` is
    not readable)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
        return (int(fields[4]) + int(fields[5])) / _TICKS  # idle + iowait
    except (OSError, ValueError, IndexError):
        return None


_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class PoolStats:
    """What the pool has done since it opened (for metrics, tests and reports)."""

    size: int
    idle: int
    """Workers up and waiting now."""
    starting: int
    """Pre-starts in flight now."""
    prestarted: int
    """Workers pre-started (and up) so far."""
    taken: int
    """Workers handed to a query from the pool."""
    misses: int
    """Queries that found the pool empty and started their worker on demand."""
    discarded: int
    """Pre-started workers found dead when taken, killed and skipped."""
    failures: int
    """Pre-starts that failed."""
    last_error: str | None


class WorkerPool:
    """Pre-started, never-reused REPL workers for one `SandboxConfig`. An async context
    manager: entering starts the first worker (and raises if it cannot), then fills the
    pool in the background; leaving kills what is left."""

    def __init__(
        self,
        config: SandboxConfig,
        size: int,
        *,
        peers: int | None = None,
        refill_at_once: int = 2,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.perf_counter,
        cpu_idle: Callable[[], float | None] = _cpu_idle_s,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"a worker pool's size must be a positive int, not {size!r} (0: no pool)")
        if refill_at_once < 1:
            raise ConfigError(f"refill_at_once must be at least 1, not {refill_at_once!r}")
        self.config = config
        """The sandbox configuration every worker of the pool is launched with."""
        self.size = size
        self.reserve = max(1, int(size * _RESERVE_SHARE))
        """Workers (up or starting) the pool keeps while those it handed out still run: the
        rest of `size` is refilled once they have all ended. See `_may_refill`."""
        self.peers = peers
        """How many workers its user may keep alive at once (`RLMConfig.max_workers`), as
        `start_worker` takes it: sizes a worker's process cap where workers share the
        engine's uid (a query's own `peers` wins, see `start_worker`)."""
        self._refill_at_once = refill_at_once
        self._sleep = sleep
        self._clock = clock
        self._cpu_idle = cpu_idle
        self._idle_mark: tuple[float, float] | None = None
        """(clock, the machine's idle CPU seconds) when the last refill check looked."""
        self._taking = 0
        self._handed: weakref.WeakSet[Worker] = weakref.WeakSet()
        """Workers this pool handed out (pooled or started on demand), until they die."""
        self._plan: Plan | None = None
        self._idle: deque[WorkerProcess] = deque()
        self._starting = 0
        self._wanted = anyio.Event()
        self._filled: anyio.Event | None = None
        self._stack: AsyncExitStack | None = None
        self._closed = False
        self._prestarted = self._taken = self._misses = self._discarded = self._failures = 0
        self._last_error: str | None = None

    # -- life cycle
    async def __aenter__(self) -> WorkerPool:
        self._plan = await plan_isolation(self.config)  # IsolationUnavailable, as on demand
        stack = AsyncExitStack()
        try:
            # Closed in reverse: stop the fillers, wait for them, then kill what is idle.
            stack.push_async_callback(self._kill_idle)
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            try:
                first = await self._prestart()
            except SandboxError as exc:
                raise SandboxError(f"the worker pool could not pre-start a REPL worker: {exc}") from exc
            self._idle.append(first)
            for _ in range(self._refill_at_once):
                tg.start_soon(self._filler)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closed = True
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()  # the kills are shielded

    @property
    def plan(self) -> Plan:
        assert self._plan is not None, "the pool is not open"
        return self._plan

    def stats(self) -> PoolStats:
        return PoolStats(
            size=self.size,
            idle=len(self._idle),
            starting=self._starting,
            prestarted=self._prestarted,
            taken=self._taken,
            misses=self._misses,
            discarded=self._discarded,
            failures=self._failures,
            last_error=self._last_error,
        )

    async def wait_full(self) -> None:
        """Until `size` workers are up and idle (a benchmark's or a test's starting line)."""
        while len(self._idle) < self.size:
            self._filled = self._filled or anyio.Event()
            await self._filled.wait()

    # -- handing out
    async def start_worker(
        self,
        context: Context,
        setup: ReplSetup | None = None,
        *,
        peers: int | None = None,
        checked: bool = False,
    ) -> Worker:
        """A worker with `context` and `setup` (tools, values) loaded: a pre-started one
        when the pool has one up, else one started now (as `start_worker` would). Either way
        it is the caller's alone and is killed by its `aclose()`; the pool starts a
        replacement in the background. `peers` and `checked` as `start_worker` takes them
        (`peers` default: the pool's)."""
        if not checked:
            context = validate_context(context)
        peers = self.peers if peers is None else peers
        if self._stack is None:
            raise SandboxError("the worker pool is not open: use it as `async with WorkerPool(...)`")
        plan = self.plan
        self._taking += 1  # in use from now: a refill must see it before it is adopted
        try:
            worker = await self._take(context, setup, plan, peers)
        finally:
            self._taking -= 1
        self._handed.add(worker)
        return worker

    async def _take(self, context: Context, setup: ReplSetup | None, plan: Plan, peers: int | None) -> Worker:
        if self._idle:
            # Encoded first: a context JSON cannot carry must not cost a pre-started worker.
            encoded = await encode_context_async(context)
        while self._idle:  # nothing awaits between taking a process and adopting it
            process = self._idle.popleft()
            self._want_more()
            if process.exited:
                # Its top process died while it waited (under bubblewrap the sandbox goes
                # down after it, and for a moment can still answer: adopted then, it was
                # handed out dying).
                self._discarded += 1
                self._last_error = "a pre-started worker exited while it waited"
                await _discard(process, "exited while idle")
                continue
            try:
                worker = await Worker.adopt(process, context, encoded, self.config, plan, setup, peers=peers)
            except SandboxError as exc:
                # Killed already. It may have died while idle, or this context may not fit:
                # one start on demand tells which, and raises the query's own error if any.
                self._discarded += 1
                self._last_error = str(exc)
                break
            self._taken += 1
            return worker
        else:
            self._misses += 1
            self._want_more()
        return await Worker.start(context, self.config, plan, setup, peers=peers)

    def in_use(self) -> int:
        """Workers this pool handed out (or is handing out) that still run."""
        return self._taking + sum(1 for w in self._handed if w.alive)

    # -- filling
    def _want_more(self) -> None:
        wanted, self._wanted = self._wanted, anyio.Event()
        wanted.set()

    async def _filler(self) -> None:
        """One of `refill_at_once` tasks keeping the pool full, one pre-start at a time."""
        consecutive = 0
        while True:
            while len(self._idle) + self._starting >= self.size:
                await self._wanted.wait()
            await self._until_quiet()
            if len(self._idle) + self._starting >= self.size:
                continue
            self._starting += 1
            try:
                process = await self._prestart()
            except Exception as exc:
                self._failures += 1
                self._last_error = (
                    str(exc) if isinstance(exc, SandboxError) else f"{type(exc).__name__}: {exc}"
                )
                consecutive += 1
                # A broken sandbox must not spin: back off, and queries start on demand,
                # where the same failure reaches them as their own error. Not only
                # SandboxError: the pool is an optimisation, and whatever keeps it from
                # pre-starting (out of descriptors or processes, a bug) must not end the
                # engine or the service it runs in, as one did in a load test.
                await self._sleep(min(_MAX_BACKOFF_S, 0.5 * 2 ** (consecutive - 1)))
                continue
            finally:
                self._starting -= 1
            consecutive = 0
            if self._closed:
                await _discard(process, "pool closed")
                return
            self._prestarted += 1
            self._idle.append(process)
            filled, self._filled = self._filled, None
            if filled is not None:
                filled.set()

    async def _until_quiet(self) -> None:
        """Wait until the event loop has little else to do and `_may_refill` says yes."""
        while True:
            before = self._clock()
            await anyio.lowlevel.checkpoint()  # back after every callback that was ready to run
            if self._clock() - before < _QUIET_TURN_S and self._may_refill():
                return
            await self._sleep(_RECHECK_S)

    def _may_refill(self) -> bool:
        """Whether a refill may start now. A refill is work no query waits for: started
        while queries run, it takes CPU from them (launching from this process, the
        interpreter's start-up beside it) and turns the latency the pool saved into latency
        of another kind. So:

        * nothing handed out runs: yes (another program's load must not keep the pool
          empty for ever);
        * workers handed out still run: only while the pool holds fewer than `reserve`
          workers, up or starting, and only when the machine has `_IDLE_CORES` idle since
          the last look (at least `_RECHECK_S` ago; the first look only marks the time).

        The reserve keeps a pool under steady load from running dry (each query that
        arrives finds a worker while refills keep up with the reserve), and the rest of
        `size` waits for the queries running to end. Gating on idle cores alone was not
        enough: a burst of 100 queries through the service leaves a core idle through its
        root turns, and the refills started then (40-50 in a burst, each interpreter's
        start-up about 30 ms of CPU) were still starting as the queries' fan-out cells ran,
        as heavy as the workers running them (both in session groups at nice 19). With the
        reserve, in `benchmarks/serve_load.py` (five alternated rounds each): 12-13 worker
        processes born in a burst against 39-45, the workers' CPU in it 0.67-0.77 s against
        1.54-2.30, the ratio to one query alone 1.17 against 1.22 (medians). Under load
        that never eases and leaves no core idle, the reserve empties too and queries start
        their workers on demand, as without a pool."""
        if not self.in_use():
            self._idle_mark = None
            return True
        if len(self._idle) + self._starting >= self.reserve:
            self._idle_mark = None
            return False
        now, idle = self._clock(), self._cpu_idle()
        if idle is None:
            return True  # no /proc/stat: the loop's turn is the only signal
        mark, self._idle_mark = self._idle_mark, (now, idle)
        if mark is None or now - mark[0] > 4 * _RECHECK_S:
            return False  # no recent look: measure from now
        if now - mark[0] < _RECHECK_S / 2:
            self._idle_mark = mark  # too short to tell: keep measuring from the older look
            return False
        return (idle - mark[1]) / (now - mark[0]) >= _IDLE_CORES

    async def _prestart(self) -> WorkerProcess:
        """Launch a worker and wait for its `hello`; kill it if it does not come up."""
        started = time.monotonic()
        process = await launch_process(self.config, self.plan, peers=self.peers)
        try:
            failure = await process.come_up()
            if failure is None:
                # Unprivileged, the kernel lowers one session group per 100 ms machine-wide:
                # a refill has the time to wait for its turn (a worker taken meanwhile would
                # compete with the engine as an equal; see `_priority`).
                for _ in range(_PRIORITY_TRIES):
                    if process.lower_priority() != "busy":
                        break
                    await self._sleep(0.1)
        except BaseException:
            await _discard(process, "pre-start cancelled")
            raise
        if failure is not None:
            error = await process.start_error(failure)
            await _discard(process, "failed to start")
            raise SandboxError(f"{error} (after {time.monotonic() - started:.2f} s)")
        return process

    async def _kill_idle(self) -> None:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:  # concurrent kills share /proc scans
                while self._idle:
                    tg.start_soon(_discard, self._idle.popleft(), "pool closed")


async def _discard(process: WorkerProcess, reason: str) -> None:
    with anyio.CancelScope(shield=True):
        await process.kill(reason)
        await process.release()
