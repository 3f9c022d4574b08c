"""The REPL worker: one sandboxed Python process per RLM, running the model's code cells.

    worker = await start_worker(context, SandboxConfig())
    result = await worker.run_cell("print(len(context))", on_request)
    await worker.aclose()

The code a model writes is untrusted. Where bubblewrap runs, the worker gets its own pid,
network, ipc, uts and mount namespaces, a read-only view of `/usr` and the interpreter's
install, a private size-capped `/tmp`, no home directory, no host `/proc`, an empty
environment, a seccomp filter against namespace, mount, ptrace, bpf, io_uring and keyring
calls (x86-64), and (when the engine runs as root) a private unprivileged uid with no
capabilities. Elsewhere it falls back to a plain subprocess with a clean environment and
the same resource limits, and warns once (`ReducedIsolationWarning`) that isolation is
reduced; `require_isolation=True` refuses instead. The `SandboxConfig.isolation` and
`allow_network` docs say exactly what each mode opens.

Sub-calls (`llm_query` and friends) travel over a socket passed to the worker as an extra
fd, not over stdout, so nothing the code prints can pose as a request. Every frame from the
worker is validated; a malformed one kills that worker (status "crashed"), never the engine.

Not a defence against kernel exploits (the worker shares the host kernel), nor a memory
cap across processes: RLIMIT_AS is per process.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import anyio

from . import _events
from . import _sandbox_launch as launch
from ._sandbox_types import (
    WORKER_DEAD_STATUSES,
    CellResult,
    CellStatus,
    RequestHandler,
    SandboxConfig,
    WorkerRequest,
)
from ._sandbox_worker import Plan, Worker
from .exceptions import ContextTypeError, IsolationUnavailable

__all__ = [
    "WORKER_DEAD_STATUSES",
    "CellResult",
    "CellStatus",
    "ReducedIsolationWarning",
    "RequestHandler",
    "SandboxConfig",
    "Worker",
    "WorkerRequest",
    "start_worker",
]


class ReducedIsolationWarning(UserWarning):
    """bubblewrap cannot run here: REPL workers run as plain subprocesses (once per process)."""


_warned = False


def _warn_reduced(why: str) -> None:
    global _warned
    _events.emit(_events.SandboxReducedIsolation, reason=why)
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"rlm_async: bubblewrap cannot run here ({why}). REPL workers run as plain subprocesses "
        "with REDUCED ISOLATION: model-written code can read any file the worker's user can read, "
        "reach the network including this machine's loopback services, and, when the worker cannot "
        "drop root, read the engine's environment (API keys) through /proc and kill the engine. "
        "Install bubblewrap, or set SandboxConfig(require_isolation=True) to refuse to run without it.",
        ReducedIsolationWarning,
        stacklevel=4,
    )


async def _plan(config: SandboxConfig) -> Plan:
    interp = await launch.find_interpreter(config.python)
    root = os.geteuid() == 0
    if config.isolation != "none":
        bwrap = launch.find_bwrap(config.bwrap_path)
        if bwrap is None:
            why: str | None = "no bwrap executable found"
        else:
            why = await launch.probe_bwrap(bwrap, interp, allow_network=config.allow_network, may_setuid=root)
        if why is None:
            return Plan(isolated=True, interp=interp, bwrap=bwrap, drop_uid=root)
        if config.isolation == "bwrap" or config.require_isolation:
            raise IsolationUnavailable(f"bubblewrap isolation is required but cannot run: {why}")
        _warn_reduced(why)
    drop = root and await anyio.to_thread.run_sync(launch.can_drop_uid_unsandboxed, interp)
    return Plan(isolated=False, interp=interp, bwrap=None, drop_uid=drop)


async def start_worker(context: str | list[Any] | dict[str, Any], config: SandboxConfig) -> Worker:
    """Start a worker with `context` (and `context_0`) loaded. Raises `ContextTypeError` for
    an unsupported context, `IsolationUnavailable` when isolation is required but cannot
    run, `SandboxError` when the worker does not come up (the message says why)."""
    if not isinstance(context, str | list | tuple | dict):
        raise ContextTypeError(f"the context must be a str, list or dict, not {type(context).__name__}")
    plan = await _plan(config)
    worker = Worker(context, config, plan)
    await worker._spawn()
    return worker
