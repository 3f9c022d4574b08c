"""One worker process and the host resources it holds: launching it (under bubblewrap, or as
a plain subprocess that confines itself (landlock tier) or not (none tier)), waiting until it
is up (its `hello`), loading the context into it (the `init`/`ready` handshake), killing
every process it started, and closing its channel, pipes and temporary directory.

Launching needs no context: what the `init` frame carries but the context, the REPL's setup
(tools, values) and the process cap is fixed at launch (limits, uid, tier), so a pre-started
worker (`_pool`) and one started on demand are the same process, confined the same way once
its context arrives. The context, the setup and the process cap (sized against the tasks the
engine's uid has then, see `_process_limit`) go with `init`, after the worker's `hello`."""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from .. import _events
from .._context import Context
from ..exceptions import ContextTypeError, SandboxError
from . import _bootstrap as proto
from . import _launch as launch
from . import _procs as procs
from . import _seccomp as seccomp
from . import _unprivileged as unprivileged
from ._channel import Blob, Channel, ChannelClosed, ProtocolViolation, Utf8Text
from ._child import ChildProcess, start_child
from ._config import ReplSetup, SandboxConfig
from ._isolation import Plan
from ._output import Capture, drain, drain_now
from ._priority import Lowered, autogroup_on, lower_session

__all__ = ["StartInterrupted", "WorkerProcess", "launch_process"]

_MiB = 1 << 20


class StartInterrupted(SandboxError):
    """The worker died of a signal sent to the engine's process group while it was being
    launched. The worker leaves that group (`start_new_session`) only after the fork, and
    a signal that arrives in between stays pending there, to be delivered as soon as the
    child resets its handlers: a Ctrl-C in the terminal of a batch that should let its
    running queries finish killed a worker one of them was starting. Nothing of the
    model's code ran; starting it once more is safe."""


class WorkerProcess:
    """A started worker process: its control channel, the read ends of its stdout and
    stderr pipes (non-blocking, drained by the owner) and, outside bubblewrap, its private
    temp directory. `kill` ends every process it started; `release` closes the rest after it."""

    def __init__(
        self,
        proc: ChildProcess,
        channel: Channel,
        fds: tuple[int, int],
        *,
        config: SandboxConfig,
        uid: int | None,
        tmpdir: str | None,
        init: dict[str, Any],
        shares_uid: bool,
        peers: int | None,
        info_fd: int | None = None,
        pidfd: int | None = None,
    ) -> None:
        self._proc = proc
        self._config = config
        self.pid = proc.pid
        """Host pid of the top process (bwrap, the landlock tier's supervisor, or the
        interpreter in the none tier)."""
        self.uid = uid
        """The private host uid the worker runs as, or None when it keeps the engine's uid."""
        self.channel = channel
        self.fds = fds
        self.context_bytes = 0
        self.killed = False
        self.up = False
        """It said `hello`: the interpreter runs and waits for its context."""
        self._tmpdir = tmpdir
        self._init: dict[str, Any] | None = init
        self._stderr_tail = Capture(4096)
        self._released = False
        self._shares_uid = shares_uid
        """Counted in `_shared_uid.live` until released."""
        self._peers = peers
        self._info_fd = info_fd
        """Under bubblewrap: the read end of its `--info-fd` (the namespace init's host pid)."""
        self._bubblewrap = info_fd is not None
        self._init_pid: int | None = None
        """Under bubblewrap: the namespace init's host pid, once read from `_info_fd`."""
        self._pidfd = pidfd
        """Under bubblewrap: a pidfd of bwrap itself, opened at launch."""
        self.priority: Lowered | None = None
        """Its session group lowered below the engine's (`_priority`); None: not tried yet."""

    @property
    def exited(self) -> bool:
        """Its top process (bwrap, the landlock tier's supervisor, or the interpreter) has
        exited: what ran under it is gone or going."""
        return self._proc.returncode is not None

    async def come_up(self) -> str | None:
        """Wait for `hello` (within `start_timeout_s`), a pool's pre-start: its session is
        lowered as soon as it exists (`_lower_as_the_session_begins`). None when the worker
        is up, else why not (see `start_error`)."""
        return await self._handshake(functools.partial(self._hello, early=True))

    async def load_context(
        self, kind: str, blob: Blob, setup: ReplSetup | None = None, *, peers: int | None = None
    ) -> str | None:
        """Send `init` with the context (encoded by `encode_context`) and `setup`'s tools
        and values, and wait for `ready`, and for `hello` first if it has not come yet, all
        within `start_timeout_s`. None when the worker came up, else why not (see
        `start_error`). Once per process: a worker is never given a second context.

        The process cap (RLIMIT_NPROC) is sized here, not at launch: where it caps the
        engine's whole uid it counts the user's tasks, and a pre-started worker may have
        waited in its pool while those grew; `peers` (default: the launch's) is the user's
        count, as `launch_process` takes it."""
        assert self._init is not None, "a worker process takes one context, once"
        init, self._init = self._init, None
        peers = self._peers if peers is None else peers
        nproc = await _process_limit(self._config, self.uid, shares_uid=self._shares_uid, peers=peers)
        init = {**init, "context_type": kind, "limits": {**init["limits"], "nproc": nproc}}
        if setup is not None:
            init.update(
                tools=[list(t) for t in setup.tools],
                values=setup.values_json,
                list_variables=setup.list_variables,
            )
        self.context_bytes = len(blob)

        async def exchange() -> str | None:
            if not self.up:
                failure = await self._hello()
                if failure is not None:
                    return failure
            await self.channel.send(init, blob)
            ready, _ = await self.channel.receive()
            if ready.get("op") != "ready":
                return f"it answered its context with {ready.get('op')!r}, not 'ready'"
            return None

        return await self._handshake(exchange)

    async def _hello(self, *, early: bool = False) -> str | None:
        """Read `hello`, and lower the worker's session then (`early`: from the moment it
        exists, for a start no query waits for)."""
        if early:
            await self._lower_as_the_session_begins()
        hello, _ = await self.channel.receive()
        if hello.get("op") != "hello":
            return f"its first frame was {hello.get('op')!r}, not 'hello'"
        self.up = True
        self.lower_priority()
        return None

    async def _lower_as_the_session_begins(self) -> None:
        """Lower a pre-started worker's session group as soon as the session exists, not at
        `hello`: its interpreter's start-up (tens of milliseconds of CPU) would otherwise run
        in a group as heavy as the engine's, above the workers already serving queries at
        nice 19. A pool's refill, started while a core was idle, took the CPU from a burst's
        hundred workers that way: their fan-out cells took 353 ms (median) instead of 3.
        Not for a worker started on demand: a query waits for that one, and at the lowest
        priority its start-up could starve behind any busy process (a batch's worker, so
        lowered, missed its 30 s start timeout beside a spinning process).

        Outside bubblewrap the session began before `exec`; under it, once the sandbox's
        init has called `setsid`, shortly after bwrap names it on `--info-fd`. Returns as
        the worker's first frame arrives (read then by `_hello`, which tries once more)."""
        if self._config.nice == 0 or not autogroup_on():
            return
        while self.priority in (None, "busy"):
            if self._session_begun() and self.lower_priority() != "busy":
                return
            # The kernel's rate limit (unprivileged): its turn comes in 100 ms at the soonest.
            with anyio.move_on_after(0.1 if self.priority == "busy" else 0.005):
                await self.channel.readable()
                return

    def _session_begun(self) -> bool:
        """Whether the worker leads a session of its own yet (`lower_priority` may act): under
        bubblewrap, the sandbox's init is known and is its own session's leader, so that its
        group is not the engine's."""
        if not self._bubblewrap:
            return True  # `start_new_session`: before the worker's `exec`
        pid = self._read_init_pid()
        return pid is not None and _session_of(pid) in (pid, -1)  # -1: gone, which it handles

    def lower_priority(self) -> Lowered:
        """Lower the worker's session group below the engine's, where the kernel schedules
        sessions as groups (see `_priority`); the bootstrap lowers its own nice value. Tried
        at `hello`, when the session surely exists, and for a pool's pre-start as soon as it
        does (`_lower_as_the_session_begins`). Again after "busy" (the kernel's rate limit for an unprivileged
        engine), otherwise the first answer stands."""
        if self.priority not in (None, "busy"):
            return self.priority
        nice = self._config.nice
        if nice == 0 or not autogroup_on():
            self.priority = "unneeded"
        elif self._bubblewrap:
            # The sandbox's init leads the session (bwrap's `--new-session`), checked just
            # now to be bwrap's live child: its pid is its own (bwrap reaps it only as it
            # exits itself, and a pid is reused only after that).
            pinned = self._namespace_init()
            if pinned is None or pinned < 0:
                self.priority = "refused"
            else:
                try:
                    assert self._init_pid is not None  # `_namespace_init` read it
                    self.priority = lower_session(self._init_pid, nice)
                finally:
                    os.close(pinned)
        elif self._proc.returncode is None:
            # Our own child, not reaped (nothing awaits in between): its pid is its own.
            self.priority = lower_session(self._proc.pid, nice)
        else:
            self.priority = "refused"
        return self.priority

    async def _handshake(self, exchange: Callable[[], Awaitable[str | None]]) -> str | None:
        """Run one start-up exchange within `start_timeout_s`, draining the worker's output
        meanwhile (its stderr's end is kept for `start_error`)."""
        failure: str | None = None
        timeout = self._config.start_timeout_s
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, self.fds[0], Capture(0))
            tg.start_soon(drain, self.fds[1], self._stderr_tail)
            try:
                with anyio.fail_after(timeout):
                    failure = await exchange()
            except TimeoutError:
                failure = f"it did not become ready within start_timeout_s={timeout}"
            except (ChannelClosed, ProtocolViolation) as exc:
                failure = str(exc)
            finally:
                tg.cancel_scope.cancel()
        return failure

    async def start_error(self, failure: str) -> SandboxError:
        """Why the worker did not come up, from its exit status and the end of its stderr."""
        rc = None
        with anyio.move_on_after(2):
            rc = await self._proc.wait()
        drain_now(self.fds[1], self._stderr_tail, 1 << 16)
        if rc == proto.EXIT_MEMORY:
            return SandboxError(
                f"the context ({self.context_bytes:,} bytes as UTF-8) does not fit in the worker's "
                f"memory_bytes={self._config.memory_bytes:,}"
            )
        detail = self._stderr_tail.text().strip()
        if rc is not None and -rc in launch.GROUP_SIGNALS:
            return StartInterrupted(
                f"the REPL worker failed to start: it was ended by {signal.Signals(-rc).name} as it "
                "was being launched (a signal sent to the engine's process group, such as a "
                "terminal's Ctrl-C, reaches a process in the instant before it leaves the group)"
            )
        return SandboxError(
            f"the REPL worker failed to start: {failure} (exit status {rc})"
            + (f"; its stderr: {detail[-1500:]}" if detail else "")
        )

    async def wait(self) -> int:
        return await self._proc.wait()

    async def kill(self, reason: str) -> None:
        """Kill and reap every process of the worker, once; its pipes stay open to be read."""
        with anyio.CancelScope(shield=True):
            if self.killed:
                return
            self.killed = True
            proc = self._proc
            _events.emit(_events.WorkerKill, pid=proc.pid, reason=reason)
            if not await self._kill_namespace():
                # The tree root only while it is unreaped, the group only while its number
                # cannot be another's: a reaped pid may be reused.
                reaped = proc.returncode is not None
                root = None if reaped else proc.pid
                uid = self.uid

                def kill_all() -> None:
                    procs.kill_all(root=root, group=procs.group_of(proc.pid, reaped=reaped), uid=uid)

                await anyio.to_thread.run_sync(kill_all)
            await proc.wait()

    async def _kill_namespace(self, wait_s: float = 5.0) -> bool:
        """Under bubblewrap, kill the sandbox's pid namespace through its init, without
        scanning `/proc`: when a namespace's init dies the kernel kills every process in it
        and finishes its exit only once they are all gone, so the init's pidfd turning
        readable means nothing of the worker is left (it cannot leave the namespace). One
        scan of every process on the host per kill made a hundred kills at once (a burst of
        queries ending, a pool's shutdown) cost about 1 s of CPU per 180 workers, and every
        query waited for its worker's kill before it answered. False when the init cannot
        be identified for sure (then `procs.kill_all` scans, as for the other tiers)."""
        pinned = self._namespace_init()
        if pinned is None:
            return False
        pidfd = pinned if pinned >= 0 else None
        try:
            if pidfd is not None:
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:  # bwrap itself, through its own pidfd: its pid may be another's by now
                assert self._pidfd is not None  # `_namespace_init` checked
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if pidfd is None:
                return True
            with anyio.move_on_after(wait_s):
                await anyio.wait_readable(pidfd)
                return True
            return False  # a process stuck in the kernel: let the scan say what is left
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _namespace_init(self) -> int | None:
        """A pidfd of the sandbox's pid-namespace init, checked to be bwrap's child; -1 when
        that init has exited already (the namespace is empty); None when unknown (not under
        bubblewrap, bwrap reaped or its info not written)."""
        pid = self._read_init_pid()
        if pid is None or self._pidfd is None or _exited(self._pidfd):
            return None  # bwrap exited (maybe reaped): its pid, and so the check below, mean nothing
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return -1  # exited and reaped: its namespace died with it
        except OSError:
            return None
        # The pid may have been reused if the init died: it is bwrap's child (bwrap was
        # alive after the init's pidfd was opened, so its pid was its own), and it was
        # still alive after that was read (a pid is reused only after it is reaped).
        ppid = _parent_of(pid)
        exited = _exited(pidfd)
        if not exited and _exited(self._pidfd):
            ppid = -1  # bwrap died meanwhile: the check above may have read another's pid
        if exited or ppid != self._proc.pid:
            os.close(pidfd)
            # Exited: its namespace is empty. Not bwrap's child: bwrap was killed and its
            # child re-parented, or the pid is another process's now; the scan decides.
            return -1 if exited else None
        return pidfd

    def _read_init_pid(self) -> int | None:
        """The namespace init's host pid, read from bwrap's `--info-fd` once it is there
        (bwrap writes it before the sandbox's command starts, so by `hello` at the latest)."""
        if self._info_fd is not None:
            try:
                info = os.read(self._info_fd, 1 << 12)  # non-blocking
            except BlockingIOError:
                return None  # not written yet: read again later
            except OSError:
                info = b""
            os.close(self._info_fd)
            self._info_fd = None
            found = re.search(rb'"child-pid"\s*:\s*(\d+)', info)
            self._init_pid = int(found.group(1)) if found else None
        return self._init_pid

    async def release(self) -> None:
        """Close the channel and the pipes and remove the temp directory, once (after `kill`)."""
        with anyio.CancelScope(shield=True):
            if self._released:
                return
            self._released = True
            if self._shares_uid:
                _shared_uid.live -= 1
            self.channel.close()
            for fd in self.fds:
                anyio.notify_closing(fd)
                os.close(fd)
            for extra in (self._info_fd, self._pidfd):
                if extra is not None:
                    os.close(extra)
            self._info_fd = self._pidfd = None
            _reserved_uids.discard(self.uid)
            tmpdir, self._tmpdir = self._tmpdir, None
            if tmpdir is not None:
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(tmpdir, ignore_errors=True))


def encode_context(context: Context) -> tuple[str, Blob]:
    """The context as the worker loads it: a str as UTF-8 (encoded a slice at a time as it
    is sent, so the str is never held twice), a list or dict as JSON. Its type was checked
    where it entered (`validate_context`); the values nested in a list or dict are first
    looked at here, by `json.dumps`."""
    if isinstance(context, str):
        return "str", Utf8Text(context)
    try:
        text = json.dumps(context, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ContextTypeError(f"a list or dict context must be JSON-serialisable: {exc}") from exc
    return "json", text.encode("utf-8", "surrogatepass")


async def encode_context_async(context: Context) -> tuple[str, Blob]:
    """`encode_context` without holding up the event loop: an ASCII str on the loop, where
    it is O(1) (`str.isascii` reads a flag CPython keeps, and `Utf8Text` then takes its
    length); anything else in a worker thread (other text is measured by encoding it, a list
    or dict is dumped as JSON: tens of milliseconds at 40 MB). Every ASCII context used to
    pay a thread round trip for nothing."""
    if isinstance(context, str) and context.isascii():
        return encode_context(context)
    return await anyio.to_thread.run_sync(encode_context, context)


_reserved_uids: set[int | None] = set()
"""Private uids picked for workers not yet released: a pre-started worker switches to its
uid only when its context arrives, so a /proc scan alone would not see it as taken."""


class _SharedUidWorkers:
    live = 0
    """Workers of this process, started, starting or pre-started and idle in a pool, whose
    processes count against the engine's own uid's RLIMIT_NPROC (`_process_limit`)."""


_shared_uid = _SharedUidWorkers()


async def launch_process(config: SandboxConfig, plan: Plan, *, peers: int | None = None) -> WorkerProcess:
    """Start a worker process with no context yet (`load_context` gives it one, with the
    REPL's setup). `peers`: how many workers the caller may keep alive at once (see
    `start_worker`). Raises `SandboxError` when the process cannot be started."""
    uid = None
    if plan.drop_uid:
        uid = await anyio.to_thread.run_sync(procs.pick_free_uid, frozenset(_reserved_uids))
        _reserved_uids.add(uid)
    shares_uid = _shares_uid(config, plan, uid)
    if shares_uid:
        _shared_uid.live += 1  # before counting: workers starting together see each other
    try:
        return await _launch(config, plan, uid=uid, shares_uid=shares_uid, peers=peers)
    except BaseException:
        _reserved_uids.discard(uid)
        if shares_uid:
            _shared_uid.live -= 1
        raise


async def _launch(
    config: SandboxConfig, plan: Plan, *, uid: int | None, shares_uid: bool, peers: int | None
) -> WorkerProcess:
    # From here to open_process nothing awaits, so nothing below can leak on cancellation.
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (parent_sock, child_sock):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            s.setsockopt(socket.SOL_SOCKET, opt, 4 * _MiB)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    info_r, info_w = os.pipe() if plan.tier == "bubblewrap" else (None, None)
    try:
        proc, tmpdir = await _open_process(config, plan, uid, child_sock.fileno(), out_w, err_w, info_w)
    except BaseException as exc:
        for fd in (out_r, err_r, info_r):
            if fd is not None:
                os.close(fd)
        parent_sock.close()
        if isinstance(exc, OSError):
            raise SandboxError(f"could not start the REPL worker: {exc}") from exc
        raise
    finally:
        child_sock.close()
        os.close(out_w)
        os.close(err_w)
        if info_w is not None:
            os.close(info_w)
    if info_r is not None:
        os.set_blocking(info_r, False)
    own_pidfd = _pin_child(proc.pid) if info_r is not None else None
    for fd in (out_r, err_r):
        os.set_blocking(fd, False)
        try:  # fewer wake-ups when a cell prints a lot
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _MiB)
        except OSError:
            pass
    channel = Channel(parent_sock, max_inbound=config.max_message_bytes)
    init = _init_frame(config, plan, uid=uid, tmpdir=tmpdir)
    return WorkerProcess(
        proc,
        channel,
        (out_r, err_r),
        config=config,
        uid=uid,
        tmpdir=tmpdir,
        init=init,
        shares_uid=shares_uid,
        peers=peers,
        info_fd=info_r,
        pidfd=own_pidfd,
    )


def _exited(pidfd: int) -> bool:
    """Whether the process of `pidfd` has exited (a pidfd turns readable then). With poll,
    not select: select() refuses descriptors above 1,023, and an engine serving a hundred
    queries holds thousands (workers' pipes, connections); it took a server down once."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _parent_of(pid: int) -> int:
    """The parent pid of `pid` from `/proc/<pid>/stat`, or -1 when it cannot be read."""
    return _stat_field(pid, 1)


def _session_of(pid: int) -> int:
    """The session id of `pid` (in our pid namespace), or -1 when it cannot be read."""
    return _stat_field(pid, 3)


def _stat_field(pid: int, index: int) -> int:
    """A number from `/proc/<pid>/stat`, counted from the field after the command's name
    (state 0, ppid 1, pgrp 2, session 3), or -1 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rfind(b")") + 2 :].split()[index])
    except (OSError, ValueError, IndexError):
        return -1


def _pin_child(pid: int) -> int | None:
    """A pidfd of our child `pid`, just started: signalled through it, a kill cannot reach
    another process that got the pid after the child was reaped (asyncio's child watcher
    reaps in a thread, before the loop sees the exit). None if it exited already."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    # Still ours after the check (a pid is reused only once its process is reaped).
    if _parent_of(pid) != os.getpid() or _exited(pidfd):
        os.close(pidfd)
        return None
    return pidfd


def _shares_uid(config: SandboxConfig, plan: Plan, uid: int | None) -> bool:
    """Whether the worker's RLIMIT_NPROC counts the engine's uid: every process and thread
    of the user, this engine's other workers included. Not with a private uid (the engine
    runs as root), nor inside bubblewrap's user namespace (an unprivileged engine), where
    it counts only the worker's own; not for root, which the limit does not bind."""
    if config.max_processes is None or uid is not None or os.geteuid() == 0:
        return False
    return plan.tier != "bubblewrap"


async def _process_limit(
    config: SandboxConfig, uid: int | None, *, shares_uid: bool, peers: int | None
) -> int | None:
    """The worker's RLIMIT_NPROC; None where it cannot bind (root keeps ignoring it).

    Where it counts only the worker's processes, `max_processes`. Where the worker shares
    the engine's uid the limit is a ceiling on the whole uid, checked at every fork and
    thread start against every task of the user, so it cannot be one worker's share:
    sized for the user's tasks now plus `max_processes` for each worker that may be alive
    while this one is. Sized for this one alone, as it once was, the workers started
    together (a fan-out, queries waiting for a worker slot) were each allowed 64 tasks
    more than the same count, used them up between them with their own start-up
    threads, and the rest failed to start ("can't start new thread", exit status 1)."""
    if config.max_processes is None:
        return None
    if not shares_uid:
        return None if uid is None and os.geteuid() == 0 else config.max_processes
    tasks = await anyio.to_thread.run_sync(procs.count_user_tasks, os.getuid())
    return tasks + config.max_processes * max(peers or 1, _shared_uid.live)


async def _open_process(
    config: SandboxConfig,
    plan: Plan,
    uid: int | None,
    ctl_fd: int,
    out_w: int,
    err_w: int,
    info_w: int | None = None,
) -> tuple[ChildProcess, str | None]:
    """Run the worker's command: bwrap (told to write its namespace init's pid to `info_w`),
    or the interpreter in a private temp directory (which it returns). Removes that
    directory again when it fails."""
    pass_fds = [ctl_fd]
    seccomp_fd: int | None = None
    tmpdir: str | None = None
    try:
        if plan.tier == "bubblewrap":
            assert plan.bwrap is not None
            program = seccomp.build()
            if program is not None:
                seccomp_fd = seccomp.memfd(program)
                pass_fds.append(seccomp_fd)
            argv = launch.bwrap_argv(
                plan.bwrap,
                plan.interp,
                allow_network=config.allow_network,
                tmp_size_bytes=config.tmp_size_bytes,
                ctl_fd=ctl_fd,
                may_setuid=os.geteuid() == 0,
                seccomp_fd=seccomp_fd,
                info_fd=info_w,
                nice=config.nice,
            )
            if info_w is not None:
                pass_fds.append(info_w)
            env: dict[str, str] = {}  # inside, /proc/1/environ is bwrap's: keep it empty
            cwd = "/"
        else:
            tmpdir = tempfile.mkdtemp(prefix="rlm-worker-")
            if uid is not None:
                os.chown(tmpdir, uid, uid)
            argv = launch.plain_argv(plan.interp, ctl_fd, nice=config.nice)
            env = launch.plain_env(tmpdir)
            cwd = tmpdir
        proc = await start_child(argv, stdout=out_w, stderr=err_w, env=env, cwd=cwd, pass_fds=pass_fds)
    except BaseException:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    finally:
        if seccomp_fd is not None:
            os.close(seccomp_fd)
    return proc, tmpdir


def _init_frame(config: SandboxConfig, plan: Plan, *, uid: int | None, tmpdir: str | None) -> dict[str, Any]:
    """The `init` frame but its `context_type`, its process cap and the REPL's setup (all
    added by `load_context`): how the bootstrap confines itself."""
    lockdown = None
    if plan.tier == "landlock":
        assert tmpdir is not None
        lockdown = unprivileged.lockdown_spec(
            plan.interp, tmpdir, uid=uid, allow_network=config.allow_network
        )
    return {
        "op": "init",
        "version": proto.PROTOCOL_VERSION,
        "limits": {
            "as": config.memory_bytes,
            "cpu": None if config.cpu_seconds is None else math.ceil(config.cpu_seconds),
            "fsize": config.file_size_bytes,
            "nofile": config.open_files,
            "nproc": None,  # `load_context` sizes it
            "core": 0,
        },
        "uid": None if lockdown is not None else uid,  # the lock-down switches uid itself
        "tier": plan.tier,
        "lockdown": lockdown,
        "output_limit": config.output_limit_bytes,
        "max_message": config.max_message_bytes,
        "max_prompts": config.max_batch_prompts,
    }
