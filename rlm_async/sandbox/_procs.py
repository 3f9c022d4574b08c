"""Finding and killing every process a REPL worker started, by scanning `/proc`.

A worker's processes are found three ways, because each alone can be escaped:
its process group (the code can call `setsid`), its process tree (an orphan is re-parented
away, unless the worker is a child subreaper) and its private uid (only when the engine
runs as root and could give the worker one). Under bubblewrap the pid namespace already
guarantees that killing the sandbox kills everything in it; these scans are what make the
landlock and none tiers clean up too, and what lets tests prove nothing is left behind.

Blocking (it reads `/proc`); the async side runs it in a worker thread.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "Proc",
    "count_user_tasks",
    "group_of",
    "kill_all",
    "pick_free_uid",
    "scan",
    "survivors",
]

# systemd's "unused" uid range (1879048192-2147483647): no login user, no container range.
_UID_LOW = 0x70000000
_UID_HIGH = 0x7FFFFFF0


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    uid: int
    state: str
    threads: int


_STATUS_FIELDS = re.compile(rb"^(State|PPid|Uid|Threads|NSpgid|NSsid):\s+(\S+)", re.MULTILINE)


def _read_proc(pid: int) -> Proc | None:
    """One process, from `/proc/<pid>/status` alone: one file per process a scan, not two,
    read and matched as bytes, for a scan reads every process on the host (hundreds, with a
    pool of idle workers and a hundred queries running): 40 % less CPU a scan than reading
    `stat` and `status` and splitting lines. Kernels without `NSpgid` (before 4.1) add `stat`."""
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY)
        try:
            status = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
    except OSError:  # it exited while we looked
        return None
    fields = {k.decode(): v.decode("ascii", "replace") for k, v in _STATUS_FIELDS.findall(status)}
    if "NSpgid" not in fields or "NSsid" not in fields:
        return _read_proc_stat(pid, fields)
    try:
        return Proc(
            pid=pid,
            state=fields["State"],
            ppid=int(fields["PPid"]),
            pgid=int(fields["NSpgid"]),  # the first: as seen from this /proc's pid namespace
            sid=int(fields["NSsid"]),
            uid=int(fields["Uid"]),  # the real uid, the one RLIMIT_NPROC counts
            threads=int(fields.get("Threads") or -1),
        )
    except (KeyError, ValueError):
        return None


def _read_proc_stat(pid: int, status: dict[str, str]) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return Proc(
        pid=pid,
        state=fields[0],
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        sid=int(fields[3]),
        uid=int(status.get("Uid") or -1),
        threads=int(status.get("Threads") or -1),
    )


def _scan_now() -> list[Proc]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            proc = _read_proc(int(name))
            if proc is not None:
                out.append(proc)
    return out


class _SharedScan:
    """One pass over `/proc` shared by every thread that asks while it runs.

    A caller gets a scan that began after it asked: as fresh as one of its own, so every
    membership and liveness check keeps its meaning. When a hundred workers are killed at
    once (a hundred queries ending together), their threads share each pass instead of
    each reading every process on the host: O(processes) per round, not O(workers x
    processes). Measured with 100 concurrent queries, the separate scans were 38 % of the
    engine process's samples, holding the GIL against the event loop
    (`benchmarks/concurrency.py`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = False
        self._started = 0
        """Generation of the last scan begun."""
        self._finished = 0
        """Generation of the last scan finished (its result is `_result`)."""
        self._result: list[Proc] = []
        self._began = 0.0
        """When the scan in `_result` began (monotonic)."""

    def recent(self, max_age_s: float) -> list[Proc]:
        """The last finished scan if it began under `max_age_s` ago, else a fresh one."""
        with self._cond:
            if self._finished and time.monotonic() - self._began < max_age_s:
                return self._result
        return self.get()

    def get(self) -> list[Proc]:
        with self._cond:
            wanted = self._started + 1  # the first scan to begin after this call
            while self._finished < wanted:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                generation = self._started
                began = time.monotonic()
                self._cond.release()
                try:
                    result = _scan_now()
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._result, self._finished, self._began = result, generation, began
            return self._result


_shared_scan = _SharedScan()


def scan() -> list[Proc]:
    """Every process on the host (a list shared with concurrent callers: do not modify)."""
    return _shared_scan.get()


def _members(procs: list[Proc], *, root: int | None, group: int | None, uid: int | None) -> set[int]:
    """Pids belonging to a worker: same uid, same process group or session, or in its tree."""
    found: set[int] = set()
    for p in procs:
        if (uid is not None and p.uid == uid) or (group is not None and group in (p.pgid, p.sid)):
            found.add(p.pid)
    if root is not None and any(p.pid == root for p in procs):
        children: dict[int, list[int]] = {}
        for p in procs:
            children.setdefault(p.ppid, []).append(p.pid)
        seen = {root}
        todo = [root]
        while todo:
            pid = todo.pop()
            found.add(pid)
            for child in children.get(pid, ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
    found.discard(os.getpid())
    found.discard(1)
    return found


def survivors(*, root: int | None, group: int | None, uid: int | None) -> list[Proc]:
    """The worker's processes that still exist, zombies included."""
    procs = scan()
    members = _members(procs, root=root, group=group, uid=uid)
    return [p for p in procs if p.pid in members]


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def group_of(leader: int, *, reaped: bool) -> int | None:
    """The process group to kill for a worker started as the leader of its own session
    (`pid == pgid == sid`), or None where that number may be someone else's now.

    While any process of the group lives, the kernel does not hand its number out again;
    once the group is empty and the leader reaped, it may. A live process with the reaped
    leader's pid is then a stranger (our group would have kept the number), and it may lead
    a group of its own, such as another worker's, started the same way: leave groups out."""
    if reaped and _read_proc(leader) is not None:
        return None
    return leader


def kill_all(*, root: int | None, group: int | None, uid: int | None, wait_s: float = 5.0) -> list[int]:
    """SIGKILL every process of the worker, then wait (up to `wait_s`) until none is left
    running. Returns the pids still present at the end: normally only zombies, such as the
    worker itself until the engine reaps it.

    Processes are first stopped, and the scan repeated until it finds nothing new, so a
    process cannot fork its way out between the scan and the kill."""
    stopped: set[int] = set()
    for _ in range(50):
        live = {
            p.pid
            for p in survivors(root=root, group=group, uid=uid)
            if p.state not in ("Z", "X") and p.pid not in stopped
        }
        if not live:
            break
        _signal_all(live, signal.SIGSTOP)
        stopped |= live
    if group is not None:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _signal_all(stopped, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while True:
        now = {p.pid: p for p in survivors(root=None, group=group, uid=uid)}
        for pid in stopped - now.keys():
            proc = _read_proc(pid)
            if proc is not None:
                now[pid] = proc
        running = [p.pid for p in now.values() if p.state not in ("Z", "X")]
        if not running or time.monotonic() > deadline:
            return sorted(now)
        _signal_all(running, signal.SIGKILL)
        time.sleep(0.01)


_UID_SCAN_MAX_AGE_S = 2.0


def pick_free_uid(reserved: frozenset[int | None] = frozenset()) -> int:
    """A uid no process used at a scan under `_UID_SCAN_MAX_AGE_S` old and not in `reserved`
    (every uid this engine picked and has not released), from a range no user or container
    range occupies, so RLIMIT_NPROC counts exactly this worker's processes and no file on
    the host is its.

    Not a fresh scan each time: one scan reads every process on the host, and a hundred
    workers starting at once made these scans most of the engine's CPU (measured with
    `benchmarks/concurrency.py`: 152 picks took 2.0 s of CPU, 13 ms each, with ~600
    processes on the host). What a fresh scan would add is only a process of another engine
    that switched to a uid in this range in the last two seconds; `reserved` covers this
    engine's own workers exactly, and another engine's picks were never fenced off: it
    could pick the same uid between this scan and the worker's switch to it (the range holds
    268 million uids, so either is rare)."""
    used = {p.uid for p in _shared_scan.recent(_UID_SCAN_MAX_AGE_S)}
    while True:
        uid = random.randrange(_UID_LOW, _UID_HIGH)
        if uid not in used and uid not in reserved:
            return uid


def count_user_tasks(uid: int) -> int:
    """Threads owned by `uid` (real uid) across the host: what RLIMIT_NPROC counts."""
    return sum(max(p.threads, 1) for p in scan() if p.uid == uid)
