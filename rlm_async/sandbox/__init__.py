"""The REPL worker: one sandboxed Python process per RLM, running the model's code cells.

    worker = await start_worker(context, SandboxConfig())
    result = await worker.run_cell("print(len(context))", on_request)
    await worker.aclose()

The code a model writes is untrusted. It runs under the strongest isolation tier that
works here (`SandboxConfig.isolation="auto"`), and where none does, it does not run:
`IsolationUnavailable` names what is missing and the fix.

- "bubblewrap": its own pid, network, ipc, uts and mount namespaces, a read-only view of
  `/usr` and the interpreter's install, a private size-capped `/tmp`, no home directory,
  no host `/proc`, an empty environment, a seccomp filter, and (as root) a private
  unprivileged uid with no capabilities.
- "landlock", for containers and hosts where bubblewrap cannot create namespaces: a
  Landlock allowlist (read-only `/usr` and the interpreter, a private temp directory, no
  `/proc`), TCP and every non-UNIX socket denied (Landlock + seccomp, no `connect`),
  signals and ptrace confined to the worker, `no_new_privs`, a private uid when the engine
  runs as root, a non-dumpable engine, and a supervisor that reaps every orphan.
- "none", only when asked for by name: a plain subprocess, for trusted code.

`rlm-async doctor --sandbox` (`diagnose()`) says which tiers work here and what each isolates.

`WorkerPool` keeps workers pre-started (up, no context yet) so a query need not wait for a
start-up; each is handed out once and killed after, never reused.

Sub-calls (`llm_query` and friends) travel over a socket passed to the worker as an extra
fd, not over stdout, so nothing the code prints can pose as a request. Every frame from the
worker is validated; a malformed one kills that worker (status "crashed"), never the engine.

Not a defence against kernel exploits (every tier shares the host kernel), nor a memory
cap across processes: RLIMIT_AS is per process.
"""

from __future__ import annotations

from ._bootstrap import HELPER_NAMES as REPL_NAMES
from ._config import (
    ISOLATION_TIERS,
    CellResult,
    CellStatus,
    OnResult,
    ReplSetup,
    RequestHandler,
    SandboxConfig,
    ToolCallError,
    WorkerRequest,
)
from ._doctor import Diagnosis, diagnose, render
from ._isolation import Tier, check_isolation
from ._pool import PoolStats, WorkerPool
from ._worker import Worker, start_worker

__all__ = [
    "ISOLATION_TIERS",
    "REPL_NAMES",
    "CellResult",
    "CellStatus",
    "Diagnosis",
    "OnResult",
    "PoolStats",
    "ReplSetup",
    "RequestHandler",
    "SandboxConfig",
    "Tier",
    "ToolCallError",
    "Worker",
    "WorkerPool",
    "WorkerRequest",
    "check_isolation",
    "diagnose",
    "render",
    "start_worker",
]
