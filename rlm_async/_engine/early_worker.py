"""A node's REPL worker, started while its first root call is in flight.

The first root turn needs only the context's description (`describe_context`), not the
worker. Starting the worker first (a sandbox, an interpreter, the context loaded: about
0.15 s at 40 MB) put that start before every query's first request. `EarlyWorker` runs
the start as a task of the node's task group and hands the worker out when the first cell
(or a FINAL_VAR) needs it. The isolation check is not made here: the caller makes it
before sending anything, so a sandbox that refuses still refuses before any model call is
paid for. A start that fails after that call was sent ends the node with status "error"
(`RunEnded`), so the result keeps the call it paid for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from ..exceptions import SandboxError
from ..sandbox import Worker
from .outcome import RunEnded

__all__ = ["EarlyWorker", "WorkerReady"]

WorkerReady = Callable[[], Awaitable[Worker]]
"""Gives the node's worker, waiting for its start to finish; raises what the start raised."""


class EarlyWorker:
    """One worker start, run as a task (`run`) and awaited where needed (`get`). Always
    `aclose()` it (shielded): it kills the worker if one came up."""

    def __init__(self, start: WorkerReady) -> None:
        self._start = start
        self._worker: Worker | None = None
        self._error: Exception | None = None
        self._done = anyio.Event()

    async def run(self) -> None:
        """The start. A failure is kept for `get`, not raised into the task group: that
        would cancel the root call in flight, which is paid for; the node ends with the
        start's error when its first cell needs the worker. Cancelled, the start kills
        what it launched (`Worker.start` does)."""
        try:
            self._worker = await self._start()
        except Exception as exc:
            self._error = exc
        finally:
            self._done.set()

    async def get(self) -> Worker:
        """The worker, once up. A start that failed (`SandboxError`: the worker did not come
        up, the context did not fit) raises `RunEnded` naming why; anything else, itself."""
        await self._done.wait()
        if isinstance(self._error, SandboxError):
            raise RunEnded("error", f"the REPL worker could not start: {self._error}") from self._error
        if self._error is not None:
            raise self._error
        if self._worker is None:
            raise SandboxError("the REPL worker's start was cancelled")
        return self._worker

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._worker is not None:
                await self._worker.aclose()
