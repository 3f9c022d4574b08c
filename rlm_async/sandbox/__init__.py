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

from ._config import CellResult, CellStatus, OnResult, RequestHandler, SandboxConfig, WorkerRequest
from ._isolation import ReducedIsolationWarning
from ._worker import Worker, start_worker

__all__ = [
    "CellResult",
    "CellStatus",
    "OnResult",
    "ReducedIsolationWarning",
    "RequestHandler",
    "SandboxConfig",
    "Worker",
    "WorkerRequest",
    "start_worker",
]
