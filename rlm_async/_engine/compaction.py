"""Compaction of the root conversation (`RLMConfig.compaction`), as the official package does
it: when the conversation reaches `compaction_threshold_pct` of the root model's context
window, the model is asked to summarise its progress, and the conversation goes on from
the system prompt, the first user message, that summary and a "continue" message. Every
turn's messages, and each summary, are appended to the REPL list `history`, so nothing
the model saw is lost to it.

Why the prefix cache keeps working: the summary request is the conversation with one
message appended (a provider serves all of it from cache), and the conversation after it
keeps the first two messages byte for byte, so every later turn still hits their cached
prefix; after the summary the history is append-only again.

Size is estimated the way rate meters estimate it (`Governor.rate_estimator`, about four
characters a token), as the official package estimates without tiktoken. The window comes
from the configuration, else from the server (`_servers`), else 128,000 tokens, the
official package's default for a model it does not know.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .. import _events
from .._config import ModelConfig
from .._prompts import COMPACTION_REQUEST, compaction_resume
from .._types import Message, ModelRequest
from ..exceptions import SandboxError
from ..sandbox import Worker

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["DEFAULT_WINDOW", "Compactor", "SummaryCall"]

DEFAULT_WINDOW = 128_000
"""Tokens assumed when neither the configuration nor the server gives the window."""

_KEPT = 2
"""Messages kept as they are: the system prompt and the first user message."""

SummaryCall = Callable[[list[Message]], Awaitable[str]]
"""Makes the summary call (a root call) over the messages given; returns its text."""


class Compactor:
    """Compaction for one root loop: `prepare` the REPL's `history`, `record` each turn, and
    `maybe_compact` before each root call."""

    def __init__(self, engine: Engine, model: ModelConfig) -> None:
        self._engine = engine
        self._model = model
        self._pct = engine.config.compaction_threshold_pct
        self.count = 0

    async def prepare(self, worker: Worker) -> None:
        """`history` exists from the first turn (empty), and only once per worker: a
        persistent session's `history` spans its calls."""
        if not worker.holds("history"):
            await worker.set_variable("history", [])

    async def record(self, worker: Worker, turn: list[Message]) -> None:
        """Append one turn's new messages (the reply and what its code printed)."""
        await _append(worker, [m.to_dict() for m in turn])

    async def maybe_compact(
        self, worker: Callable[[], Awaitable[Worker]], messages: list[Message], summarise: SummaryCall
    ) -> None:
        """Summarise `messages` in place when they reached the threshold; `worker` gives the
        REPL's worker (awaited only then: it may still be starting). Raises what the
        summary call raises (`BudgetExceeded` ends the loop as a refused root turn does)."""
        if len(messages) <= _KEPT + 2:
            return  # nothing to compact beyond the kept prefix and a summary
        settings = await self._engine.server_settings(self._model)
        window = settings.context_window
        source = settings.window_source if window is not None else "default"
        window = window or DEFAULT_WINDOW
        request = ModelRequest(model=self._model.model, messages=tuple(messages))
        tokens = self._engine.governor.rate_estimator.prompt_tokens(request)
        threshold = int(self._pct * window)
        if tokens < threshold:
            return
        summary = await summarise([*messages, Message("user", COMPACTION_REQUEST)])
        self.count += 1
        await _append(await worker(), {"type": "summary", "content": summary})
        before = len(messages)
        messages[_KEPT:] = [Message("assistant", summary), Message("user", compaction_resume(self.count))]
        _events.emit(
            _events.RootCompacted,
            count=self.count,
            tokens=tokens,
            threshold_tokens=threshold,
            context_window=window,
            window_source=source,
            messages_before=before,
            messages_after=len(messages),
        )


async def _append(worker: Worker, entry: object) -> None:
    try:
        await worker.set_variable("history", entry, append=True)
    except SandboxError:
        pass  # the worker died (and is killed): the entry is kept, and its replacement gets it
