"""`Session`: one REPL across several calls of an `RLM`, closed deterministically.

    async with rlm.session() as s:
        first = await s.completion(report, "What were the Q3 sales?")
        second = await s.completion(notes, "Do the notes agree with the report?")
    # here the session's worker is dead and reaped, whatever happened inside

Each call adds its context as the next `context_N` (`context` stays `context_0`) and, when it
ends, its messages as the next `history_N` (`history` is `history_0`), as the official
package's `persistent=True` does; the variables the code created stay defined. A worker that
dies is replaced with every context and history reloaded, and the model is told that its own
variables are gone. `RLM(persistent=True)` keeps one such session per event loop for its
plain `completion` / `acompletion` calls (docs/sessions.md).

A session's calls take turns (one REPL runs one cell at a time); separate sessions, and calls
outside any session, run concurrently as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio.lowlevel

from . import _events
from ._context import Context
from ._engine.session import SessionState
from ._result import RLMResult
from .exceptions import ConfigError

__all__ = ["Session"]


RunQuery = Callable[..., Awaitable[RLMResult]]
"""How a session runs one query: `RLM`'s own query path, called with `session=` its state."""


class Session:
    """A persistent REPL across calls of one `RLM`, bound to the event loop it was first used
    in. Use it as `async with`; `aclose()` ends it by hand. Not reusable once closed."""

    def __init__(self, run: RunQuery, open_state: Callable[[], Awaitable[SessionState]]) -> None:
        """Made by `RLM.session()`: `run` runs a query in a session's state, `open_state`
        makes that state (in the engine of the current event loop)."""
        self._run = run
        self._open_state = open_state
        self._state: SessionState | None = None
        self._loop: object | None = None
        self._closed = False

    @property
    def contexts(self) -> int:
        """Contexts loaded so far (`context_0` to `context_{contexts - 1}`)."""
        return 0 if self._state is None else self._state.contexts

    @property
    def histories(self) -> int:
        """Histories kept so far (`history_0` to `history_{histories - 1}`)."""
        return 0 if self._state is None else self._state.histories

    @property
    def worker_pid(self) -> int | None:
        """Host pid of the session's worker while one runs (for tests and diagnostics)."""
        worker = None if self._state is None else self._state.worker
        return worker.pid if worker is not None and worker.alive else None

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def completion(
        self,
        prompt: Context,
        root_prompt: str | None = None,
        *,
        event_sinks: Sequence[_events.EventSink] = (),
        **options: Any,
    ) -> RLMResult:
        """`RLM.acompletion` in this session's REPL: `prompt` becomes the next `context_N`.
        `options` are `acompletion`'s other keyword arguments (`max_depth`, `budget`, ...)."""
        state = await self._open()
        async with state.busy:
            return await self._run(prompt, root_prompt, event_sinks=event_sinks, session=state, **options)

    acompletion = completion

    async def aclose(self) -> None:
        """Kill the session's worker and every process it started, and reap them. Idempotent."""
        self._closed = True
        state, self._state = self._state, None
        if state is not None:
            await state.aclose()

    async def _open(self) -> SessionState:
        if self._closed:
            raise ConfigError("this session is closed; open a new one with rlm.session()")
        loop = anyio.lowlevel.current_token()
        if self._state is None:
            self._state, self._loop = await self._open_state(), loop
        elif loop != self._loop:
            raise ConfigError(
                "this session's worker belongs to another event loop; use a session only in the loop "
                "it was first used in (RLM.completion with persistent=True does this for you)"
            )
        return self._state
