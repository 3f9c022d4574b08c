"""The sandbox's plain data: its configuration, the requests a worker makes and the result
of a cell. Re-exported by `rlm_async.sandbox`, the public face."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .._checks import is_whole_number
from ..exceptions import ConfigError

__all__ = [
    "ISOLATION_TIERS",
    "WORKER_DEAD_STATUSES",
    "CellResult",
    "CellStatus",
    "OnResult",
    "ReplSetup",
    "RequestHandler",
    "SandboxConfig",
    "ToolCallError",
    "WorkerRequest",
]

ISOLATION_TIERS = ("auto", "bubblewrap", "landlock", "none")

_MiB = 1 << 20
_GiB = 1 << 30

CellStatus = Literal[
    "ok", "error", "output_limit", "timeout", "memory", "cpu_limit", "crashed", "stream_closed"
]
"""How a cell ended.

- "ok": the code ran to its end.
- "error": the code raised; `error` holds the end of the traceback. The worker lives on.
- "output_limit": as "ok", but output past `output_limit_bytes` was discarded.
- "timeout": the cell ran past `cell_timeout_s`; the worker was killed.
- "memory": the code hit `memory_bytes` (a `MemoryError`); the worker was killed, since its
  heap may still be full.
- "cpu_limit": the worker used up `cpu_seconds` of CPU time; it was killed.
- "crashed": the worker died (a signal, `os._exit`, a broken frame on the control channel).
- "stream_closed": the code closed or redirected fd 1 or 2, so no later output could reach
  the engine; the worker was killed (to be replaced).

The last five set `worker_dead`: call `restart()`; every variable is gone.
"""

WORKER_DEAD_STATUSES = frozenset({"timeout", "memory", "cpu_limit", "crashed", "stream_closed"})


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """Isolation and resource limits of REPL workers. `None` disables a limit."""

    isolation: Literal["auto", "bubblewrap", "landlock", "none"] = "auto"
    """Which isolation tier runs the model's code (`rlm-async doctor --sandbox` shows what works here).

    - "auto": the strongest tier that works here, bubblewrap then landlock; where neither
      does, starting a worker raises `IsolationUnavailable` naming what is missing and the
      fix. It never falls back to no isolation.
    - "bubblewrap": namespaces (own pid, network, ipc, mount view), or `IsolationUnavailable`.
    - "landlock": the unprivileged tier for containers without user namespaces: a Landlock
      filesystem allowlist and TCP denial, a seccomp filter (AF_UNIX stream sockets only,
      no `connect`, no ptrace), a private uid when the engine runs as root, and a
      non-dumpable engine; or `IsolationUnavailable`.
    - "none": a plain subprocess with a clean environment and the resource limits, for
      trusted code only: the code can read every file the worker's uid can read, reach the
      network (the engine's own loopback ports included) and, when the worker keeps root's
      uid, read the engine's environment through `/proc` and kill the engine.

    "bwrap" is accepted as the old name of "bubblewrap". `RLMResult.isolation`, the
    `worker.start` event and `Worker.tier` say which tier ran."""
    allow_network: bool = False
    """Trusted mode for tools that need the network. Opens exactly: the host's network
    namespace (every interface, so also services on this machine's loopback, the host's
    abstract Unix sockets, and cloud metadata endpoints such as 169.254.169.254) and
    read-only `/etc/resolv.conf`,
    `/etc/hosts`, `/etc/host.conf`, `/etc/nsswitch.conf`, `/etc/gai.conf`, `/etc/services`,
    `/etc/protocols`, `/etc/ssl`, `/etc/ca-certificates` and `/etc/pki` (name resolution
    and TLS roots). Filesystem, pid, environment and limits stay as without it."""
    cell_timeout_s: float | None = 60.0
    """Wall-clock limit per cell, enforced by killing the worker's processes. Time the cell
    spends blocked in `llm_query`/`llm_batch`/`rlm_*` does not count. Also bounds
    `get_variable`."""
    start_timeout_s: float | None = 30.0
    """Limit on starting a worker and loading its context."""
    memory_bytes: int | None = 2 * _GiB
    """Address space per process (RLIMIT_AS). A str context costs about its UTF-8 size once
    loaded (up to 4 bytes a character for non-Latin text), so 2 GiB leaves ample room for a
    40 MB context and the code's own work."""
    cpu_seconds: float | None = 600.0
    """CPU time per worker process over its whole life, all threads together (RLIMIT_CPU;
    rounded up to whole seconds). Bounds busy threads while the wall clock is paused for
    sub-calls. Every process the code forks has its own allowance."""
    nice: int = 19
    """How far below the engine's the workers' CPU priority is, 0 to 19: each worker runs
    at this Unix nice value over the engine's and, where the kernel schedules each session
    as a group of its own ("autogroup": most machines, but not processes in a container's
    or a service's own cgroup), its session's group is lowered as much. The code the model
    writes then gets the CPU the engine's event loop leaves over: cells that compute, or
    spin, cannot hold up every other query's model calls. The code cannot raise it again
    (in the `none` tier it can). 0: workers compete with the engine as equals."""
    file_size_bytes: int | None = 64 * _MiB
    """Largest file the code may write (RLIMIT_FSIZE); writing past it raises `OSError`."""
    tmp_size_bytes: int | None = 256 * _MiB
    """Size of the private `/tmp` tmpfs under bubblewrap (its pages are RAM). The landlock
    and none tiers use a private directory on the host's temp filesystem, which this does
    not cap (each file is still capped by `file_size_bytes`)."""
    open_files: int | None = 256
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    max_processes: int | None = 64
    """Processes and threads the worker may have at once, the worker and its reader thread
    included. Enforced by RLIMIT_NPROC on a uid of the worker's own (the engine runs as
    root: it gives each worker a private unprivileged uid) or on the user namespace
    bubblewrap creates (the engine runs unprivileged). Where the worker keeps the engine's
    uid (landlock or none tier, engine unprivileged) the limit counts every process and
    thread of that user, so it is a ceiling for the user as a whole: the user's tasks when
    the worker starts plus this many for each worker that may be alive with it (the engine's
    `max_workers`); one worker can then use its peers' share. Root keeps ignoring
    RLIMIT_NPROC, so a "none" worker that cannot drop root has no process cap; it is still
    killed whole at the deadline."""
    output_limit_bytes: int = 1_000_000
    """Bytes of stdout and of stderr kept per cell. Python-level output past it is counted
    and discarded inside the worker; raw writes to fds 1 and 2 are drained and discarded
    by the engine, so no amount of output reaches the engine's memory."""
    max_message_bytes: int = 64 * _MiB
    """Largest frame the worker may send: one `llm_batch` request with all its prompts, or
    a final answer. A larger request raises `ValueError` in the REPL; a forged oversized
    frame kills the worker."""
    max_batch_prompts: int = 100_000
    """Most prompts one `llm_batch`/`rlm_query_batched` call may carry. A larger call raises
    `ValueError` in the REPL before anything is sent; a forged frame past it kills the
    worker. Bounds the work of reading one request (the engine's admission then bounds how
    many prompts of a query run at once: `RLMConfig.max_pending_subcalls`)."""
    python: str | None = None
    """Interpreter for workers (only its stdlib is used); `None` is `sys.executable`. A
    venv's python runs as its base interpreter."""
    bwrap_path: str | None = None
    """The bubblewrap binary; `None` looks for `bwrap` on PATH and in /usr/bin."""

    def __post_init__(self) -> None:
        if self.isolation == "bwrap":  # type: ignore[comparison-overlap]  # the old name
            object.__setattr__(self, "isolation", "bubblewrap")
        if self.isolation not in ISOLATION_TIERS:
            raise ConfigError(
                "SandboxConfig.isolation must be one of "
                f"{', '.join(map(repr, ISOLATION_TIERS))}, not {self.isolation!r}"
            )
        for name in (
            "cell_timeout_s",
            "start_timeout_s",
            "memory_bytes",
            "cpu_seconds",
            "file_size_bytes",
            "tmp_size_bytes",
            "open_files",
            "max_processes",
        ):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"SandboxConfig.{name} must be positive or None, not {value!r}")
        if self.open_files is not None and self.open_files < 16:
            raise ConfigError("SandboxConfig.open_files must be at least 16: Python itself needs some")
        if self.max_processes is not None and self.max_processes < 4:
            raise ConfigError("SandboxConfig.max_processes must be at least 4 (the worker uses 2)")
        if not is_whole_number(self.nice) or not 0 <= self.nice <= 19:
            raise ConfigError(f"SandboxConfig.nice must be a whole number from 0 to 19, not {self.nice!r}")
        if self.output_limit_bytes < 0:
            raise ConfigError("SandboxConfig.output_limit_bytes must be >= 0")
        if self.max_batch_prompts < 1:
            raise ConfigError("SandboxConfig.max_batch_prompts must be at least 1")
        if self.max_message_bytes < 64 * 1024:
            raise ConfigError("SandboxConfig.max_message_bytes must be at least 64 KiB")


OnResult = Callable[[int, str], Awaitable[None]]
"""Told each slot's answer as soon as it is filled: (index, answer)."""


@dataclass(frozen=True, slots=True)
class WorkerRequest:
    """A sub-call the code asked for. Untrusted data: sizes are checked, content is not."""

    op: Literal["llm_query", "llm_batch", "llm_batch_stream", "rlm_query", "rlm_batch", "tool"]
    prompts: Sequence[str]
    """The prompts (a `SharedPrefixPrompts` where they share a long prefix); for "tool", one: the call's arguments as JSON text
    (`{"args": [...], "kwargs": {...}}`), untrusted."""
    model: str | None
    hedge: bool | None = None
    """The code's `hedge=` argument: `False` turns hedging off for this request, `True` on
    (with the model's `HedgeConfig` otherwise), `None` leaves the model's setting."""
    on_result: OnResult | None = field(default=None, compare=False)
    """Set by the sandbox for `llm_batch_stream` (the REPL's `llm_batch_as_completed`): the
    handler calls it as each slot is filled, so the worker can yield answers in completion
    order."""
    tool: str | None = None
    """For "tool": the name of the custom tool the code called. The handler returns one str,
    the result as JSON text, or raises `ToolCallError`."""


class ToolCallError(Exception):
    """A custom tool call failed in the engine (the tool raised, its arguments or result are
    not JSON data, no such tool): the code sees `ToolError` with this message."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplSetup:
    """What a worker's namespace holds beyond `context` and the helpers.

    Custom tools are names only: the worker defines a function of that name (with that
    docstring) which sends its JSON arguments over the control channel, so the tool itself,
    and whatever it holds (a connection, an API key), never enters the sandbox."""

    tools: tuple[tuple[str, str], ...] = ()
    """(name, docstring) of each host function the code may call."""
    values_json: str = ""
    """A JSON object of plain values set as variables (`custom_tools` entries that are not
    callable); empty for none."""
    list_variables: bool = False
    """Each cell's report names the namespace's plain variables (`CellResult.variables`),
    as the official package's observation format shows them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CellResult:
    stdout: str
    """What the cell wrote to stdout (Python-level and raw fd 1), at most
    `output_limit_bytes` of it; invalid UTF-8 is replaced."""
    stderr: str
    """Likewise for stderr."""
    error: str | None
    """The end of the traceback when the code raised, without the worker's own frames; or
    what happened to the worker (timeout, memory, crash)."""
    status: CellStatus
    final_answer: str | None
    """`str(answer["content"])` when the code left `answer["ready"] is True`."""
    dropped_output_bytes: int
    """Output bytes discarded because of `output_limit_bytes`."""
    duration_s: float
    """Wall-clock time of the cell, sub-calls included."""
    worker_dead: bool
    """The worker was killed or died: call `restart()`; the model's variables are gone."""
    variables: tuple[str, ...] | None = None
    """With `ReplSetup.list_variables`: the names of the namespace's variables of a plain
    type (str, int, float, bool, list, dict, tuple), in the official package's order."""


RequestHandler = Callable[[WorkerRequest], Awaitable[list[str]]]
