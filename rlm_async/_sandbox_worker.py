"""The engine's side of one REPL worker: spawning it, running cells over the control
channel under a pausable deadline, serving sub-calls, capturing output, and killing every
process it started. The public face is `rlm_async.sandbox`."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import Process

from . import _events
from . import _sandbox_launch as launch
from . import _sandbox_procs as procs
from . import _sandbox_seccomp as seccomp
from ._sandbox_channel import Channel, ChannelClosed, ProtocolViolation
from ._sandbox_types import (
    WORKER_DEAD_STATUSES,
    CellResult,
    CellStatus,
    RequestHandler,
    SandboxConfig,
    WorkerRequest,
)
from ._worker import bootstrap as proto
from .exceptions import BudgetExceeded, ContextTypeError, SandboxError

__all__ = ["Plan", "Worker"]

_MiB = 1 << 20

_MAX_PENDING_REQUESTS = 256
"""Requests one worker may have in flight (and their prompts at most 4 x
`max_message_bytes`): a worker writing frames straight to its socket could otherwise make
the engine hold any number of them."""


@dataclass(frozen=True, slots=True)
class Plan:
    """How workers of one config are launched, decided once per `start_worker`."""

    isolated: bool
    """Under bubblewrap; else the plain-subprocess fallback."""
    interp: launch.Interpreter
    bwrap: str | None
    drop_uid: bool
    """Each worker switches to a private unprivileged uid (the engine runs as root, and the
    worker can still reach the interpreter after the switch)."""


def _encode_context(context: object) -> tuple[str, bytes]:
    if isinstance(context, str):
        return "str", context.encode("utf-8", "surrogatepass")
    if isinstance(context, list | tuple | dict):
        try:
            text = json.dumps(context, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ContextTypeError(f"a list or dict context must be JSON-serialisable: {exc}") from exc
        return "json", text.encode("utf-8", "surrogatepass")
    raise ContextTypeError(f"the context must be a str, list or dict, not {type(context).__name__}")


# ---------------------------------------------------------------------------- output capture
class _Capture:
    """Keeps the first `limit` bytes of a stream; counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        room = self.limit - len(self.data)
        if room >= len(data):
            self.data += data
        else:
            if room > 0:
                self.data += data[:room]
            self.dropped += len(data) - max(room, 0)

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


async def _drain(fd: int, capture: _Capture) -> None:
    """Read a worker's stdout or stderr pipe until EOF or cancellation."""
    while True:
        try:
            data = os.read(fd, _MiB)
        except BlockingIOError:
            await anyio.wait_readable(fd)
            continue
        except OSError:
            return
        if not data:
            return
        capture.feed(data)


def _drain_now(fd: int, capture: _Capture, budget: int) -> None:
    """Take what is already in the pipe, without waiting: output written before the worker
    reported the cell done is there by then. `budget` stops a writer that never pauses."""
    while budget > 0:
        try:
            data = os.read(fd, _MiB)
        except OSError:  # BlockingIOError: the pipe is empty
            return
        if not data:
            return
        capture.feed(data)
        budget -= len(data)


class _CellClock:
    """A cancel scope's deadline that stops while sub-calls are outstanding."""

    def __init__(self, timeout: float | None) -> None:
        self._left = math.inf if timeout is None else timeout
        self._outstanding = 0
        self._since = 0.0
        self._scope: anyio.CancelScope | None = None

    def start(self, scope: anyio.CancelScope) -> None:
        self._scope = scope
        self._since = anyio.current_time()
        scope.deadline = self._since + self._left

    def pause(self) -> None:
        assert self._scope is not None
        if self._outstanding == 0:
            self._left -= anyio.current_time() - self._since
            self._scope.deadline = math.inf
        self._outstanding += 1

    def resume(self) -> None:
        assert self._scope is not None
        self._outstanding -= 1
        if self._outstanding == 0:
            self._since = anyio.current_time()
            self._scope.deadline = self._since + self._left


@dataclass(slots=True)
class _Outcome:
    status: CellStatus
    error: str | None = None
    final_answer: str | None = None
    worker_dropped: int = 0
    kill: bool = False


def _clean(text: str) -> str:
    """Strings from the worker may hold lone surrogates (JSON allows "\\ud800"); they would
    break any later UTF-8 encode in the engine."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _split_prompts(lengths: object, blob: bytearray) -> tuple[str, ...]:
    """A request's blob cut at `lengths` (bytes), each piece strict UTF-8: the decoder
    refuses lone surrogates and broken sequences, so what `_clean` ensures for JSON strings
    holds here without a second pass (an honest worker already sent '?' for a surrogate)."""
    if not isinstance(lengths, list) or not set(map(type, lengths)) <= {int}:
        raise ProtocolViolation("request lengths must be a list of integers")
    if min(lengths, default=0) < 0:
        raise ProtocolViolation(f"request lengths must not be negative (got {min(lengths)})")
    total = sum(lengths)
    if total != len(blob):
        raise ProtocolViolation(f"request lengths add up to {total:,} bytes but the blob has {len(blob):,}")
    prompts: list[str] = []
    pos = 0
    with memoryview(blob) as view:
        for n in lengths:
            try:
                prompts.append(str(view[pos : pos + n], "utf-8"))
            except UnicodeDecodeError as exc:
                raise ProtocolViolation(
                    f"request prompt {len(prompts)} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
            pos += n
    return tuple(prompts)


def _parse_request(msg: dict[str, Any], blob: bytearray) -> tuple[int, WorkerRequest]:
    """Validate a request frame. Its prompts come as a blob with `lengths`, or (as older
    workers and hand-made frames send them) as a JSON list `prompts` with no blob."""
    rid, kind, model = msg.get("id"), msg.get("kind"), msg.get("model")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ProtocolViolation("request without an integer id")
    if kind not in proto.REQUEST_KINDS:
        raise ProtocolViolation(f"unknown request kind {kind!r}")
    if model is not None and not isinstance(model, str):
        raise ProtocolViolation("request model must be a str or null")
    single = kind in ("llm_query", "rlm_query")
    if "lengths" in msg:
        if "prompts" in msg:
            raise ProtocolViolation("a request carries either prompts or lengths, not both")
        lengths = msg["lengths"]
        if single and isinstance(lengths, list) and len(lengths) != 1:
            raise ProtocolViolation(f"{kind} carries exactly one prompt")
        prompts = _split_prompts(lengths, blob)
    else:
        raw = msg.get("prompts")
        if blob:
            raise ProtocolViolation("a request with a blob must give its prompts' lengths")
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise ProtocolViolation("request prompts must be a list of str")
        if single and len(raw) != 1:
            raise ProtocolViolation(f"{kind} carries exactly one prompt")
        prompts = tuple(_clean(p) for p in raw)
    return rid, WorkerRequest(op=kind, prompts=prompts, model=None if model is None else _clean(model))


def _parse_done(msg: dict[str, Any]) -> _Outcome:
    status, error, final, dropped = (
        msg.get("status"),
        msg.get("error"),
        msg.get("final_answer"),
        msg.get("dropped"),
    )
    if status not in ("ok", "error", "memory"):
        raise ProtocolViolation(f"unknown cell status {status!r}")
    if not (error is None or isinstance(error, str)) or not (final is None or isinstance(final, str)):
        raise ProtocolViolation("cell error and final_answer must be str or null")
    if (
        not isinstance(dropped, list)
        or len(dropped) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dropped)
    ):
        raise ProtocolViolation("cell 'dropped' must be two non-negative integers")
    return _Outcome(
        status=status,
        error=None if error is None else _clean(error),
        final_answer=None if final is None else _clean(final),
        worker_dropped=sum(dropped),
        kill=status == "memory",
    )


def _check_results(results: object, n: int) -> list[str]:
    if not isinstance(results, list) or len(results) != n or not all(isinstance(r, str) for r in results):
        raise SandboxError(f"on_request must return a list of {n} str (one per prompt), got {results!r:.200}")
    return results


def _describe_exit(rc: int | None, isolated: bool, config: SandboxConfig) -> tuple[CellStatus, str]:
    if rc is None:
        return "crashed", "the worker closed its control channel and was killed"
    if rc == proto.EXIT_MEMORY:
        return "memory", f"the worker ran out of memory (memory_bytes={config.memory_bytes}) and exited"
    sig = -rc if rc < 0 else (rc - 128 if isolated and rc > 128 else None)
    if sig == signal.SIGXCPU:
        return (
            "cpu_limit",
            f"the worker used up its CPU time (cpu_seconds={config.cpu_seconds}) and was killed",
        )
    if sig == signal.SIGKILL:
        return (
            "crashed",
            "the worker was killed by SIGKILL (its CPU-time hard limit, or the kernel's OOM killer)",
        )
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return "crashed", f"the worker was killed by {name}"
    return "crashed", f"the worker exited with code {rc}"


class Worker:
    """One REPL worker process (and everything it starts). Not thread-safe; one cell at a
    time. Always `aclose()` it: that kills and reaps every process of the worker."""

    pid: int
    """Host pid of the top process (bwrap, or the interpreter in the fallback). 0 when none runs."""
    isolated: bool
    """True under bubblewrap."""
    uid: int | None
    """The private host uid the worker runs as, or None when it keeps the engine's uid."""

    def __init__(self, context: object, config: SandboxConfig, plan: Plan) -> None:
        self._context = context
        self._config = config
        self._plan = plan
        self.isolated = plan.isolated
        self.pid = 0
        self.uid = None
        self._proc: Process | None = None
        self._channel: Channel | None = None
        self._fds: tuple[int, int] | None = None
        self._tmpdir: str | None = None
        self._dead: str | None = "not started"
        self._cell = 0
        self._handler_error: BaseException | None = None
        self._busy = anyio.Lock()
        """One conversation on the control channel at a time (a cell, a get_variable, a restart)."""

    @property
    def alive(self) -> bool:
        """False after the worker died or was killed, until `restart()`."""
        return self._dead is None

    # -- life cycle
    async def _spawn(self) -> None:
        cfg, plan = self._config, self._plan
        started = time.monotonic()
        # Encoding 40 MB takes tens of milliseconds: not on the event loop, where other
        # queries' work would wait for it.
        kind, blob = await anyio.to_thread.run_sync(_encode_context, self._context)
        context_bytes = len(blob)
        uid = await anyio.to_thread.run_sync(procs.pick_free_uid) if plan.drop_uid else None
        root = os.geteuid() == 0
        nproc: int | None = None
        if cfg.max_processes is not None:
            if uid is not None or (plan.isolated and not root):
                nproc = cfg.max_processes  # counts only this worker's processes
            elif not root:  # counts all of the user's processes: allow that many more
                nproc = (
                    await anyio.to_thread.run_sync(procs.count_user_tasks, os.getuid()) + cfg.max_processes
                )
        # From here to open_process nothing awaits, so nothing below can leak on cancellation.
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (parent_sock, child_sock):
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                s.setsockopt(socket.SOL_SOCKET, opt, 4 * _MiB)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ctl_fd = child_sock.fileno()
        pass_fds = [ctl_fd]
        seccomp_fd: int | None = None
        try:
            if plan.isolated:
                assert plan.bwrap is not None
                program = seccomp.build()
                if program is not None:
                    seccomp_fd = seccomp.memfd(program)
                    pass_fds.append(seccomp_fd)
                argv = launch.bwrap_argv(
                    plan.bwrap,
                    plan.interp,
                    allow_network=cfg.allow_network,
                    tmp_size_bytes=cfg.tmp_size_bytes,
                    ctl_fd=ctl_fd,
                    may_setuid=root,
                    seccomp_fd=seccomp_fd,
                )
                env: dict[str, str] = {}  # inside, /proc/1/environ is bwrap's: keep it empty
                cwd = "/"
            else:
                self._tmpdir = tempfile.mkdtemp(prefix="rlm-worker-")
                if uid is not None:
                    os.chown(self._tmpdir, uid, uid)
                argv = launch.fallback_argv(plan.interp, ctl_fd)
                env = launch.fallback_env(self._tmpdir)
                cwd = self._tmpdir
            proc = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                env=env,
                cwd=cwd,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        except BaseException as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            parent_sock.close()
            self._remove_tmpdir()
            if isinstance(exc, OSError):
                raise SandboxError(f"could not start the REPL worker: {exc}") from exc
            raise
        finally:
            child_sock.close()
            os.close(out_w)
            os.close(err_w)
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            try:  # fewer wake-ups when a cell prints a lot
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _MiB)
            except OSError:
                pass
        self._proc, self._fds, self.pid, self.uid = proc, (out_r, err_r), proc.pid, uid
        self._channel = Channel(parent_sock, max_inbound=cfg.max_message_bytes)
        self._dead = None
        init = {
            "op": "init",
            "version": proto.PROTOCOL_VERSION,
            "context_type": kind,
            "limits": {
                "as": cfg.memory_bytes,
                "cpu": None if cfg.cpu_seconds is None else math.ceil(cfg.cpu_seconds),
                "fsize": cfg.file_size_bytes,
                "nofile": cfg.open_files,
                "nproc": nproc,
                "core": 0,
            },
            "uid": uid,
            "fallback": not plan.isolated,
            "output_limit": cfg.output_limit_bytes,
            "max_message": cfg.max_message_bytes,
        }
        stderr_tail = _Capture(4096)
        failure: str | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_drain, out_r, _Capture(0))
                tg.start_soon(_drain, err_r, stderr_tail)
                try:
                    with anyio.fail_after(cfg.start_timeout_s):
                        await self._channel.send(init, blob)
                        del blob
                        ready, _ = await self._channel.receive()
                    if ready.get("op") != "ready":
                        failure = f"its first frame was {ready.get('op')!r}, not 'ready'"
                except TimeoutError:
                    failure = f"it did not become ready within start_timeout_s={cfg.start_timeout_s}"
                except (ChannelClosed, ProtocolViolation) as exc:
                    failure = str(exc)
                finally:
                    tg.cancel_scope.cancel()
        except BaseException:
            await self._kill("start cancelled")
            raise
        if failure is not None:
            rc = None
            with anyio.move_on_after(2):
                rc = await proc.wait()
            _drain_now(err_r, stderr_tail, 1 << 16)
            await self._kill("failed to start")
            if rc == proto.EXIT_MEMORY:
                raise SandboxError(
                    f"the context ({context_bytes:,} bytes as UTF-8) does not fit in the worker's "
                    f"memory_bytes={cfg.memory_bytes:,}"
                )
            detail = stderr_tail.text().strip()
            raise SandboxError(
                f"the REPL worker failed to start: {failure} (exit status {rc})"
                + (f"; its stderr: {detail[-1500:]}" if detail else "")
            )
        _events.emit(
            _events.WorkerStart,
            pid=proc.pid,
            isolated=plan.isolated,
            uid=uid,
            context_bytes=context_bytes,
            duration_s=time.monotonic() - started,
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
            proc, self._proc = self._proc, None
            if self._dead is None:
                self._dead = reason
            if proc is None:
                return
            _events.emit(_events.WorkerKill, pid=proc.pid, reason=reason)
            # The tree root only while it is unreaped: a reaped pid may be reused.
            root = proc.pid if proc.returncode is None else None
            uid = self.uid
            await anyio.to_thread.run_sync(lambda: procs.kill_all(root=root, group=proc.pid, uid=uid))
            await proc.wait()

    async def _release(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            if self._fds is not None:
                for fd in self._fds:
                    anyio.notify_closing(fd)
                    os.close(fd)
                self._fds = None
            if self._tmpdir is not None:
                await anyio.to_thread.run_sync(self._remove_tmpdir)

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # -- cells
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
        if self._dead is not None or self._channel is None or self._fds is None:
            return self._dead_result(started)
        self._cell += 1
        limit = self._config.output_limit_bytes
        out, err = _Capture(limit), _Capture(limit)
        out_fd, err_fd = self._fds
        self._handler_error = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_drain, out_fd, out)
                tg.start_soon(_drain, err_fd, err)
                try:
                    outcome = await self._exchange(self._cell, code, on_request)
                finally:
                    tg.cancel_scope.cancel()
            if self._handler_error is not None:
                raise self._handler_error
        except BaseException:
            await self._kill("cancelled while running a cell")
            raise
        if outcome.kill:
            await self._terminate(outcome.status)
        # The pipes keep what was written before the worker reported (or died).
        budget = 2 * limit + 4 * _MiB
        _drain_now(out_fd, out, budget)
        _drain_now(err_fd, err, budget)
        if outcome.kill:
            await self._release()
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
        )
        _events.emit(
            _events.WorkerCell,
            pid=self.pid,
            status=result.status,
            duration_s=result.duration_s,
            dropped_output_bytes=dropped,
        )
        return result

    async def _exchange(self, cell: int, code: str, on_request: RequestHandler) -> _Outcome:
        """Send the cell, serve its requests, wait for `done` under the pausable deadline."""
        assert self._channel is not None
        channel = self._channel
        clock = _CellClock(self._config.cell_timeout_s)
        pending: dict[int, int] = {}  # request id -> characters of prompts held
        outcome: _Outcome | None = None
        with anyio.CancelScope() as deadline:
            clock.start(deadline)
            async with anyio.create_task_group() as tg:
                try:
                    await channel.send({"op": "exec", "cell": cell, "code": code})
                    while outcome is None:
                        msg, blob = await channel.receive()
                        op = msg["op"]
                        if op == "request":
                            rid, request = _parse_request(msg, blob)
                            del blob  # its text is in request.prompts now
                            if rid in pending:
                                raise ProtocolViolation(f"request id {rid} reused while pending")
                            size = sum(map(len, request.prompts))
                            if (
                                len(pending) >= _MAX_PENDING_REQUESTS
                                or sum(pending.values()) + size > 4 * self._config.max_message_bytes
                            ):
                                # Honest code has at most one call in flight per thread.
                                raise ProtocolViolation(
                                    f"too many sub-calls in flight at once ({len(pending) + 1}, "
                                    f"{sum(pending.values()) + size:,} characters)"
                                )
                            pending[rid] = size
                            clock.pause()
                            tg.start_soon(self._serve, rid, request, on_request, pending, clock, deadline)
                        elif op == "done":
                            number = msg.get("cell")
                            if isinstance(number, int) and number < cell:
                                continue  # a stale report from a cell a forged `done` cut short
                            if number != cell:
                                raise ProtocolViolation(f"done for cell {number!r} while running cell {cell}")
                            outcome = _parse_done(msg)
                        else:
                            raise ProtocolViolation(f"unexpected {op!r} frame during a cell")
                except ProtocolViolation as exc:
                    outcome = _Outcome(
                        "crashed", error=f"protocol violation: {exc}; the worker was killed", kill=True
                    )
                except ChannelClosed:
                    outcome = await self._death_outcome()
                tg.cancel_scope.cancel()
        if outcome is None:
            if self._handler_error is not None:
                return _Outcome("crashed", kill=True)
            return _Outcome(
                "timeout",
                error=f"the cell ran past cell_timeout_s={self._config.cell_timeout_s:g} s (time waiting for "
                "sub-calls not counted); the worker was killed",
                kill=True,
            )
        if pending and not outcome.kill:
            # Threads of the code still wait on sub-calls the cell no longer serves.
            try:
                for rid in sorted(pending):
                    await channel.send(
                        {
                            "op": "reply",
                            "id": rid,
                            "error": "abandoned",
                            "message": "the cell finished before this sub-call was answered",
                        },
                        atomic=True,
                    )
            except ChannelClosed:
                outcome = _Outcome(
                    "crashed", error="the worker stopped reading its control channel", kill=True
                )
        return outcome

    async def _serve(
        self,
        rid: int,
        request: WorkerRequest,
        on_request: RequestHandler,
        pending: dict[int, int],
        clock: _CellClock,
        deadline: anyio.CancelScope,
    ) -> None:
        """Answer one request. Cancelled (the cell ended first), it stays in `pending` and
        the worker's waiting thread is told it was abandoned."""
        try:
            try:
                results = _check_results(await on_request(request), len(request.prompts))
                reply: dict[str, Any] = {"op": "reply", "id": rid, "results": results}
            except BudgetExceeded as exc:
                reply = {"op": "reply", "id": rid, "error": "budget", "message": str(exc)}
            assert self._channel is not None
            pending.pop(rid, None)
            try:
                await self._channel.send(reply, atomic=True)
            except ChannelClosed:
                pass  # the worker died or stopped reading; the cell loop sees it
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # an engine-side failure: end the cell, kill, re-raise
            pending.pop(rid, None)
            self._handler_error = exc
            deadline.cancel()
        finally:
            clock.resume()

    async def _death_outcome(self) -> _Outcome:
        """The control channel closed mid-cell: wait briefly for the exit status, then say why."""
        if self._proc is None:  # killed by aclose() from another task
            return _Outcome("crashed", error=f"the worker was killed ({self._dead})", kill=True)
        rc = None
        with anyio.move_on_after(2):
            rc = await self._proc.wait()
        status, message = _describe_exit(rc, self.isolated, self._config)
        return _Outcome(status, error=message, kill=True)

    async def get_variable(self, name: str) -> str | None:
        """`str()` of a REPL variable, for FINAL_VAR(name) in a reply; None when undefined
        or the worker is not running. Bounded by `cell_timeout_s`: a `__str__` that hangs
        gets the worker killed (check `alive`)."""
        async with self._busy:
            return await self._get_variable(name)

    async def _get_variable(self, name: str) -> str | None:
        if not isinstance(name, str) or not name.isidentifier() or self._dead is not None:
            return None
        assert self._channel is not None and self._fds is not None
        channel = self._channel
        value: str | None = None
        kill: str | None = None
        timeout = self._config.cell_timeout_s
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_drain, self._fds[0], _Capture(0))
                tg.start_soon(_drain, self._fds[1], _Capture(0))
                try:
                    with anyio.fail_after(timeout):
                        await channel.send({"op": "getvar", "name": name})
                        while True:
                            msg, blob = await channel.receive()
                            if msg["op"] == "var":
                                found, raw = msg.get("found"), msg.get("value")
                                if found is True and isinstance(raw, str):
                                    value = _clean(raw)
                                elif found is not False:
                                    raise ProtocolViolation("malformed 'var' frame")
                                break
                            if msg["op"] == "request":
                                rid, _ = _parse_request(msg, blob)
                                await channel.send(
                                    {
                                        "op": "reply",
                                        "id": rid,
                                        "error": "unavailable",
                                        "message": "sub-calls are served only while a cell runs",
                                    },
                                    atomic=True,
                                )
                            elif msg["op"] != "done":
                                raise ProtocolViolation(f"unexpected {msg['op']!r} frame")
                except TimeoutError:
                    kill = "timeout in get_variable"
                except (ProtocolViolation, ChannelClosed) as exc:
                    kill = f"get_variable failed: {exc}"
                finally:
                    tg.cancel_scope.cancel()
        except BaseException:
            await self._kill("cancelled in get_variable")
            raise
        if kill is not None:
            await self._kill(kill)
            return None
        return value
