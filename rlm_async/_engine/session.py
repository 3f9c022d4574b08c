"""What a persistent session keeps between its queries: one root REPL worker (and the worker
slot it holds), the contexts given so far (`context_0`, `context_1`, ...) and the message
histories of the calls before (`history_0`, ...), named as the official package names them.

The worker holds the contexts and histories as variables the engine set
(`Worker.set_variable`), so a worker that died — mid-cell, or between two calls — is
replaced with every context and history reloaded; what the code created is lost, and the
model is told so in its next message. Child RLMs are never persistent: each still gets a
worker of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import anyio

from .._context import Context
from .._types import Message
from ..exceptions import ConfigError, SandboxError
from ..sandbox import ReplSetup, Worker
from .slots import WorkerSlots

__all__ = ["SessionState"]


class SessionState:
    """The engine's side of one session. One query at a time; `aclose()` ends it."""

    def __init__(
        self,
        *,
        slots: WorkerSlots,
        start: Callable[[Context, ReplSetup | None], Awaitable[Worker]],
        below: int,
        compaction: bool,
    ) -> None:
        self._slots = slots
        self._start = start
        """Starts the root worker (`Engine.start_worker`: from the worker pool when one is
        open, with the engine's `peers` count)."""
        self._below = below
        self.compaction = compaction
        self.worker: Worker | None = None
        self.contexts = 0
        self.histories = 0
        self.closed = False
        self._stack = AsyncExitStack()
        self._busy = anyio.Lock()

    @property
    def busy(self) -> anyio.Lock:
        """Held for the length of one query: a session's calls take turns."""
        return self._busy

    async def attach(
        self, context: Context, setup: ReplSetup | None = None
    ) -> tuple[Worker, int, str | None]:
        """Load this call's context as the next `context_N` and return the worker, N, and a
        note for the model when the worker had to be replaced since the last call. `setup`
        (tools and values) counts only for the worker's first start."""
        if self.closed:
            raise ConfigError("this session is closed; open a new one with rlm.session()")
        index = self.contexts
        lost: str | None = None
        if self.worker is None:
            await self._stack.enter_async_context(self._slots.hold(below=self._below))
            try:
                self.worker = await self._start(context, setup)
            except BaseException:
                await self._stack.aclose()  # the slot goes back; the next call tries afresh
                raise
        else:
            try:
                await self.worker.set_variable(f"context_{index}", context)
            except SandboxError:
                pass  # it had died while idle (and is killed now): the restart below loads the context
            # The last call's answer must not end this one: its `answer` starts unset again.
            await self._reset_answer()
            if not self.worker.alive:
                await self.worker.restart()
                lost = (
                    "[the REPL worker had stopped since the last call and a fresh one started: every "
                    "context and history is reloaded, but the variables you created are gone]"
                )
        self.contexts = index + 1
        return self.worker, index, lost

    async def _reset_answer(self) -> None:
        assert self.worker is not None
        try:
            await self.worker.set_variable("answer", {"content": None, "ready": False})
        except SandboxError:
            pass  # dead: a fresh worker's answer is unset anyway

    async def add_history(self, messages: list[Message]) -> None:
        """Keep one call's messages as the next `history_N` (`history` is `history_0`, unless
        compaction owns that name)."""
        assert self.worker is not None
        index = self.histories
        aliases = ("history",) if index == 0 and not self.compaction else ()
        self.histories = index + 1
        try:
            await self.worker.set_variable(
                f"history_{index}", [m.to_dict() for m in messages], aliases=aliases
            )
        except SandboxError:
            pass  # the worker died: the history is kept, and the next call's restart loads it

    async def aclose(self) -> None:
        """Kill the worker (every process of it) and give its slot back. Idempotent."""
        with anyio.CancelScope(shield=True):
            self.closed = True
            worker, self.worker = self.worker, None
            if worker is not None:
                await worker.aclose()
            await self._stack.aclose()
