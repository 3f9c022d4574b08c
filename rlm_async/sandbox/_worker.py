"""The engine's side of one REPL worker: its life cycle (start, restart, close), its cells
and reading its variables. The process itself lives in `_process`, one cell's conversation
in `_cell`. The public face is `rlm_async.sandbox`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import anyio

from .. import _events
from .._context import Context, validate_context
from ..exceptions import SandboxError
from ._cell import CellExchange
from ._channel import Blob, ChannelClosed, ProtocolViolation
from ._config import WORKER_DEAD_STATUSES, CellResult, ReplSetup, RequestHandler, SandboxConfig
from ._isolation import Plan, Tier, plan_isolation
from ._output import Capture, drain, drain_now
from ._priority import Lowered
from ._process import StartInterrupted, WorkerProcess, encode_context_async, launch_process
from ._protocol import Outcome, clean, describe_exit, parse_request

__all__ = ["Worker", "start_worker"]

_MiB = 1 << 20
_T = TypeVar("_T")


@dataclass(slots=True)
class _SetVariable:
    """A variable the engine put into the worker (`set_variable`), kept to be put again
    into a replacement worker: a restart loses what the code created, never these."""

    value: Any
    aliases: tuple[str, ...]


async def start_worker(
    context: Context,
    config: SandboxConfig,
    setup: ReplSetup | None = None,
    *,
    peers: int | None = None,
    checked: bool = False,
) -> Worker:
    """Start a worker with `context` (and `context_0`) loaded, and `setup`'s tools and
    values (kept for every restart). Raises `ContextTypeError` for
    an unsupported context, `IsolationUnavailable` when no tier `config.isolation` allows
    can run here, `SandboxError` when the worker does not come up (the message says why).

    `peers`: how many workers the caller may keep alive at once in this process (the
    engine passes `RLMConfig.max_workers`). It matters only where the worker shares the
    engine's uid (landlock or none tier, engine not root): RLIMIT_NPROC then caps the whole
    uid, so each worker's cap leaves `max_processes` for every peer. None: the workers of
    this process alive or starting when this one starts.

    `checked`: the caller ran `validate_context` where the context entered (the engine's
    contexts were, at `RLM.acompletion`), so it is not checked again here. Values nested
    in a list or dict are looked at either way, when the context is encoded."""
    if not checked:
        context = validate_context(context)  # a public entry of its own, as RLM.acompletion is
    plan = await plan_isolation(config)
    return await Worker.start(context, config, plan, setup, peers=peers)


class Worker:
    """One REPL worker process (and everything it starts). Not thread-safe; one cell at a
    time. Always `aclose()` it: that kills and reaps every process of the worker."""

    pid: int
    """Host pid of the top process (bwrap, the landlock tier's supervisor, or the interpreter
    in the none tier). 0 when none runs."""
    tier: Tier
    """The isolation tier it runs under: "bubblewrap", "landlock" or "none"."""
    isolated: bool
    """Any tier but "none"."""
    uid: int | None
    """The private host uid the worker runs as, or None when it keeps the engine's uid."""

    def __init__(
        self,
        context: Context,
        config: SandboxConfig,
        plan: Plan,
        setup: ReplSetup | None = None,
        *,
        peers: int | None = None,
    ) -> None:
        """A worker not yet started: `Worker.start` (or `start_worker`) gives a running one."""
        self._context = context
        self._setup = setup
        self._config = config
        self._plan = plan
        self._peers = peers
        self.tier = plan.tier
        self.isolated = plan.isolated
        self.pid = 0
        self.uid = None
        self._process: WorkerProcess | None = None
        self._dead: str | None = "not started"
        self._cell = 0
        self._busy = anyio.Lock()
        """One conversation on the control channel at a time (a cell, a get_variable, a restart)."""
        self._set: dict[str, _SetVariable] = {}

    @classmethod
    async def start(
        cls,
        context: Context,
        config: SandboxConfig,
        plan: Plan,
        setup: ReplSetup | None = None,
        *,
        peers: int | None = None,
    ) -> Worker:
        """A running worker with `context` loaded, launched as `plan` says."""
        worker = cls(context, config, plan, setup, peers=peers)
        await worker._spawn()
        return worker

    @classmethod
    async def adopt(
        cls,
        process: WorkerProcess,
        context: Context,
        encoded: tuple[str, Blob],
        config: SandboxConfig,
        plan: Plan,
        setup: ReplSetup | None = None,
        *,
        peers: int | None = None,
    ) -> Worker:
        """A running worker made of a pre-started `process` (launched with `config` and
        `plan`, waiting for a context): `context` (`encoded` by `encode_context`) and
        `setup` are loaded into it. The process is this worker's for good, like one started
        on demand (killed if loading fails); `restart()` starts a fresh one, with `peers`
        as `start_worker` takes it."""
        worker = cls(context, config, plan, setup, peers=peers)
        await worker._load(process, *encoded, time.monotonic(), pooled=True)
        return worker

    @property
    def priority(self) -> Lowered | None:
        """Whether its session's scheduling group was lowered below the engine's
        (`SandboxConfig.nice`; see `_priority`); None before it started."""
        return None if self._process is None else self._process.priority

    @property
    def alive(self) -> bool:
        """False after the worker died or was killed, until `restart()`."""
        return self._dead is None

    # -- life cycle
    async def _spawn(self) -> None:
        started = time.monotonic()
        # Before launching, so a context JSON cannot carry costs no process.
        kind, blob = await encode_context_async(self._context)
        try:
            process = await launch_process(self._config, self._plan, peers=self._peers)
            await self._load(process, kind, blob, started, pooled=False)
        except StartInterrupted:
            # The engine heard the same signal and acts on it (a batch's first Ctrl-C lets
            # running queries finish): this query's worker is started again, once.
            process = await launch_process(self._config, self._plan, peers=self._peers)
            await self._load(process, kind, blob, started, pooled=False)

    async def _load(
        self, process: WorkerProcess, kind: str, blob: Blob, started: float, *, pooled: bool
    ) -> None:
        """Make `process` this worker's and load the context and the setup into it; on
        failure it is killed and the error raised."""
        self._process, self.pid, self.uid, self._dead = process, process.pid, process.uid, None
        try:
            failure = await process.load_context(kind, blob, self._setup, peers=self._peers)
        except BaseException:
            await self._kill("start cancelled")
            raise
        if failure is not None:
            try:
                error = await process.start_error(failure)
            finally:  # also when cancelled while reading why (a sibling's failure)
                await self._kill("failed to start")
            raise error
        try:
            for name, var in self._set.items():  # a replacement gets them back
                await self._send_variable(name, var.value, var.aliases, append=False)
        except BaseException:
            await self._kill("start cancelled")
            raise
        _events.emit(
            _events.WorkerStart,
            pid=process.pid,
            isolated=self.isolated,
            tier=self.tier,
            uid=process.uid,
            context_bytes=process.context_bytes,
            duration_s=time.monotonic() - started,
            pooled=pooled,
        )

    async def restart(self) -> None:
        """Kill this worker (if it still runs) and start a fresh one with `context` reloaded.
        Every variable the code created is gone."""
        async with self._busy:
            await self._kill("restart")
            await self._spawn()

    async def aclose(self) -> None:
        """Kill every process of the worker and reap them. Idempotent; shielded.

        Safe while a cell runs in another task: the processes die first, which ends that
        cell (status "crashed"), and the channel and pipes are closed after it."""
        with anyio.CancelScope(shield=True):
            await self._terminate("closed")
            async with self._busy:
                await self._release()
            self._dead = "closed"

    async def _kill(self, reason: str) -> None:
        await self._terminate(reason)
        await self._release()

    async def _terminate(self, reason: str) -> None:
        """Kill and reap every process of the worker; its pipes stay open to be read."""
        with anyio.CancelScope(shield=True):
            if self._dead is None:
                self._dead = reason
            if self._process is not None:
                await self._process.kill(reason)

    async def _release(self) -> None:
        with anyio.CancelScope(shield=True):
            process, self._process = self._process, None
            if process is not None:
                await process.release()

    # -- cells
    async def run_cell(self, code: str, on_request: RequestHandler) -> CellResult:
        """Run one code cell to its end, serving its sub-calls with `on_request`.

        `on_request` gets each `WorkerRequest` (concurrently, when the code calls from
        threads) and returns one str per prompt, or raises `BudgetExceeded`, which the code
        sees as its own `BudgetExceeded`. Any other exception from it kills the worker and
        propagates. Cancelling `run_cell` kills the worker. On a dead worker it returns at
        once with status "crashed" and `worker_dead`."""
        async with self._busy:
            return await self._run_cell(code, on_request)

    async def _run_cell(self, code: str, on_request: RequestHandler) -> CellResult:
        started = time.monotonic()
        process = self._process
        if self._dead is not None or process is None:
            return self._dead_result(started)
        self._cell += 1
        limit = self._config.output_limit_bytes
        out, err = Capture(limit), Capture(limit)
        out_fd, err_fd = process.fds
        exchange = CellExchange(process.channel, self._config, on_request, self._death_outcome)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, out_fd, out)
                tg.start_soon(drain, err_fd, err)
                try:
                    outcome = await exchange.run(self._cell, code)
                finally:
                    tg.cancel_scope.cancel()
            if exchange.handler_error is not None:
                raise exchange.handler_error
        except BaseException:
            await self._kill("cancelled while running a cell")
            raise
        if outcome.kill:
            await self._terminate(outcome.status)
        # The pipes keep what was written before the worker reported (or died).
        budget = 2 * limit + 4 * _MiB
        drain_now(out_fd, out, budget)
        drain_now(err_fd, err, budget)
        if outcome.kill:
            await self._release()
        return self._cell_result(out, err, outcome, started)

    def _cell_result(self, out: Capture, err: Capture, outcome: Outcome, started: float) -> CellResult:
        dropped = out.dropped + err.dropped + outcome.worker_dropped
        status = outcome.status
        if status == "ok" and dropped:
            status = "output_limit"
        result = CellResult(
            stdout=out.text(),
            stderr=err.text(),
            error=outcome.error,
            status=status,
            final_answer=outcome.final_answer,
            dropped_output_bytes=dropped,
            duration_s=time.monotonic() - started,
            worker_dead=status in WORKER_DEAD_STATUSES,
            variables=outcome.variables,
        )
        _events.emit(
            _events.WorkerCell,
            pid=self.pid,
            status=result.status,
            duration_s=result.duration_s,
            dropped_output_bytes=dropped,
        )
        return result

    def _dead_result(self, started: float) -> CellResult:
        return CellResult(
            stdout="",
            stderr="",
            error=f"the REPL worker is not running ({self._dead}); call restart()",
            status="crashed",
            final_answer=None,
            dropped_output_bytes=0,
            duration_s=time.monotonic() - started,
            worker_dead=True,
        )

    async def _death_outcome(self) -> Outcome:
        """The control channel closed mid-cell: wait briefly for the exit status, then say why."""
        process = self._process
        if process is None or process.killed:  # killed by aclose() from another task
            return Outcome("crashed", error=f"the worker was killed ({self._dead})", kill=True)
        rc = None
        with anyio.move_on_after(2):
            rc = await process.wait()
        status, message = describe_exit(rc, self.tier == "bubblewrap", self._config)
        return Outcome(status, error=message, kill=True)

    # -- variables
    async def set_variable(
        self, name: str, value: Any, *, aliases: tuple[str, ...] = (), append: bool = False
    ) -> None:
        """Bind the REPL variable `name` (and each of `aliases`) to `value`: a str, or data
        JSON can carry (it arrives as the JSON round trip of it). With `append`, add `value`
        to the list held under `name` instead (one is made if none is). The worker keeps
        them across `restart()`, unlike what the code created; on a worker that is not
        running it is kept for the next `restart()`. Raises `SandboxError` when the worker
        cannot take the value (memory, `start_timeout_s`); the worker is killed then."""
        for key in (name, *aliases):
            if not key.isidentifier():
                raise ValueError(f"{key!r} is not a Python identifier")
        async with self._busy:
            if append:
                held = self._set.get(name)
                if held is None or not isinstance(held.value, list):
                    held = self._set[name] = _SetVariable([], aliases)
                held.value.append(value)
            else:
                self._set[name] = _SetVariable(value, aliases)
            if self._dead is not None:
                return  # kept: the next restart() puts it in
            await self._send_variable(name, value, aliases, append=append)

    async def describe_variables(self) -> dict[str, str]:
        """Each REPL variable's type and length (never its value), for the official log's
        `locals`. Empty when the worker is not running or does not answer within
        `cell_timeout_s` (then it is killed: check `alive`)."""
        async with self._busy:
            if self._dead is not None or self._process is None:
                return {}
            names = await self._exchange("describe_variables", _Request({"op": "describe"}, "names"), _names)
            return {} if isinstance(names, _Failed) else names

    def holds(self, name: str) -> bool:
        """Whether `name` is a variable the engine set (`set_variable`)."""
        return name in self._set

    async def _send_variable(self, name: str, value: Any, aliases: tuple[str, ...], *, append: bool) -> None:
        kind, blob = await encode_context_async(cast(Context, value))
        frame = {"op": "setvar", "name": name, "type": kind, "aliases": list(aliases), "append": append}
        request = _Request(frame, "set", blob)
        del blob  # the request drops it once sent: a large value is then held by the worker alone
        failed = await self._exchange("set_variable", request, _nothing, limit="start_timeout_s")
        if isinstance(failed, _Failed):
            raise SandboxError(
                f"the REPL worker could not take the variable {name!r}: {failed.reason}; a value that large "
                f"may not fit its memory_bytes={self._config.memory_bytes:,}"
            )

    async def get_variable(self, name: str) -> str | None:
        """`str()` of a REPL variable, for FINAL_VAR(name) in a reply; None when undefined
        or the worker is not running. Bounded by `cell_timeout_s`: a `__str__` that hangs
        gets the worker killed (check `alive`)."""
        async with self._busy:
            return await self._get_variable(name)

    async def _get_variable(self, name: str) -> str | None:
        if not isinstance(name, str) or not name.isidentifier() or self._dead is not None:
            return None
        value = await self._exchange("get_variable", _Request({"op": "getvar", "name": name}, "var"), _value)
        return None if isinstance(value, _Failed) else value

    async def _exchange(
        self,
        what: str,
        request: _Request,
        parse: Callable[[dict[str, Any]], _T],
        *,
        limit: Literal["cell_timeout_s", "start_timeout_s"] = "cell_timeout_s",
    ) -> _T | _Failed:
        """Send `request` outside a cell and `parse` its reply, within the config's `limit`.
        Meanwhile the worker's stdout and stderr are drained and thrown away (a thread the
        last cell left running may print, and a full pipe would block it), and sub-calls
        are refused. No reply in time, a closed channel or a malformed frame: the worker is
        killed and `_Failed` says why. Cancelled: the worker is killed. Hold `_busy`."""
        process = self._process
        assert process is not None
        seconds = self._config.cell_timeout_s if limit == "cell_timeout_s" else self._config.start_timeout_s
        outcome: _T | _Failed
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, process.fds[0], Capture(0))
                tg.start_soon(drain, process.fds[1], Capture(0))
                try:
                    with anyio.fail_after(seconds):
                        await process.channel.send(request.frame, request.blob)
                        request.blob = b""
                        outcome = parse(await _await_reply(process, request.reply))
                except TimeoutError:
                    outcome = _Failed(f"no reply to {what} within {limit}={seconds}")
                except (ProtocolViolation, ChannelClosed) as exc:
                    outcome = _Failed(f"{what} failed: {exc}")
                finally:
                    tg.cancel_scope.cancel()
        except BaseException:
            await self._kill(f"cancelled in {what}")
            raise
        if isinstance(outcome, _Failed):
            await self._kill(outcome.reason)
        return outcome


@dataclass(slots=True)
class _Request:
    """One request on the control channel outside a cell, and the op of the frame that
    answers it."""

    frame: dict[str, Any]
    reply: str
    blob: Blob = b""
    """Dropped once sent, so a large value is not held twice while the worker loads it."""


@dataclass(frozen=True, slots=True)
class _Failed:
    """A request the worker did not answer: it was killed for `reason`."""

    reason: str


async def _await_reply(process: WorkerProcess, op: str) -> dict[str, Any]:
    """Read up to the frame `op`, refusing sub-calls meanwhile (threads the last cell left
    running may still make them)."""
    while True:
        msg, blob = await process.channel.receive()
        if msg["op"] == op:
            return msg
        if msg["op"] == "request":
            await _refuse_request(process, msg, blob)
        elif msg["op"] != "done":
            raise ProtocolViolation(f"unexpected {msg['op']!r} frame")


def _nothing(msg: dict[str, Any]) -> None:
    """The `set` reply carries nothing but its arrival."""


def _names(msg: dict[str, Any]) -> dict[str, str]:
    """The `names` reply; its content is untrusted: only str -> str kept, and bounded."""
    raw = msg.get("names")
    if not isinstance(raw, dict):
        raise ProtocolViolation("malformed 'names' frame")
    return {clean(str(k))[:200]: clean(str(v))[:200] for k, v in list(raw.items())[:200]}


def _value(msg: dict[str, Any]) -> str | None:
    """The `var` reply: the variable's str(), or None when it is not defined."""
    found, raw = msg.get("found"), msg.get("value")
    if found is True and isinstance(raw, str):
        return clean(raw)
    if found is not False:
        raise ProtocolViolation("malformed 'var' frame")
    return None


async def _refuse_request(process: WorkerProcess, msg: dict[str, Any], blob: bytearray) -> None:
    rid, _ = parse_request(msg, blob)
    await process.channel.send(
        {
            "op": "reply",
            "id": rid,
            "error": "unavailable",
            "message": "sub-calls are served only while a cell runs",
        },
        atomic=True,
    )
