"""Custom tool calls from the REPL, run in the engine.

The worker sends a tool's name and its arguments as JSON; `ToolRunner.call` runs the host
function here — an async one in the node's task, a sync one in a thread, so a slow tool
never blocks the event loop — and sends back its result as JSON. Each call is a task of its
own (the cell serves every request as a task), so calls made from the code's threads run
concurrently, each tool under its own optional cap (`Tool.max_concurrency`, shared by every
query of the engine, like a connection pool).

A tool call counts against the query's budget of calls (`BudgetLimits.max_calls`: one
call, no tokens, no dollars) and runs on the cell's own clock: unlike a sub-call, the time
it takes counts toward `cell_timeout_s`. What the model sees when it fails: `ToolError`
with the tool's exception and the last frames of its traceback, never the engine's.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import traceback
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anyio
import anyio.to_thread

from .. import _events
from .._governor import BudgetLedger, Charge
from .._tools import ToolEntry, ToolSet
from .._types import Usage
from ..sandbox import ToolCallError

__all__ = ["ToolLimiters", "ToolRunner"]

_TRACEBACK_FRAMES = 3
_TRACEBACK_CHARS = 2_000
_RESULT_PREVIEW = 200
_NOT_THE_TOOL = (os.path.dirname(anyio.__file__), os.path.abspath(__file__))
"""Frames of these files are the engine's, not the tool's: left out of what the model sees."""


class ToolLimiters:
    """The per-tool concurrency caps of one engine: one limiter per capped tool name."""

    def __init__(self) -> None:
        self._limiters: dict[tuple[str, int], anyio.CapacityLimiter] = {}

    def get(self, entry: ToolEntry) -> anyio.CapacityLimiter | None:
        if entry.max_concurrency is None:
            return None
        key = (entry.name, id(entry.value))
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = self._limiters[key] = anyio.CapacityLimiter(entry.max_concurrency)
        return limiter


class ToolRunner:
    """Serves one RLM node's tool calls: its `custom_tools` (root) or `custom_sub_tools`
    (a child RLM)."""

    def __init__(
        self, tools: ToolSet, ledger: BudgetLedger, limiters: ToolLimiters, *, clock: Callable[[], float]
    ) -> None:
        self._tools = tools
        self._ledger = ledger
        self._limiters = limiters
        self._clock = clock

    async def call(self, name: str, payload: str) -> str:
        """Run tool `name` on the JSON arguments `payload`; its result as JSON text. Raises
        `ToolCallError` (shown to the code as `ToolError`) or `BudgetExceeded`."""
        entry = self._tools.function(name)
        if entry is None:
            raise ToolCallError(f"there is no tool named {name!r} here")
        args, kwargs = _arguments(name, payload)
        charge = Charge(Usage(calls=1), Decimal(0))
        reservation = self._ledger.reserve(charge, model=f"tool:{name}")  # BudgetExceeded: not run
        _events.emit(_events.ToolStart, tool=name)
        started = self._clock()
        status, error = "ok", None
        try:
            limiter = self._limiters.get(entry)
            if limiter is None:
                value = await _invoke(entry.value, args, kwargs)
            else:
                async with limiter:
                    value = await _invoke(entry.value, args, kwargs)
            return _result(name, value)
        except ToolCallError as exc:
            status, error = "error", str(exc)
            raise
        except Exception as exc:
            status, error = "error", f"{type(exc).__name__}: {exc}"
            raise ToolCallError(_short_traceback(name, exc)) from None
        except BaseException:
            status = "cancelled"
            raise
        finally:
            # A tool that started was a call, whatever became of it.
            self._ledger.settle(reservation, charge)
            _events.emit(
                _events.ToolFinish,
                tool=name,
                status=status,
                duration_s=self._clock() - started,
                error=error,
            )


def _arguments(name: str, payload: str) -> tuple[list[Any], dict[str, Any]]:
    """The worker's JSON arguments, checked: they come from untrusted code."""
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise ToolCallError(f"{name}: the arguments are not JSON ({exc})") from None
    args = data.get("args") if isinstance(data, dict) else None
    kwargs = data.get("kwargs") if isinstance(data, dict) else None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ToolCallError(f"{name}: malformed arguments; expected {{'args': [...], 'kwargs': {{...}}}}")
    return args, kwargs


async def _invoke(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    # A sync tool may block (a database driver, requests): a thread, never the event loop.
    # Abandoned on cancellation (a thread cannot be interrupted): the cell still ends on time.
    value = await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), abandon_on_cancel=True)
    if inspect.isawaitable(value):  # an object with an async __call__, or a function returning a coroutine
        return await value
    return value


def _result(name: str, value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ToolCallError(
            f"{name} returned a {type(value).__name__}, which cannot cross into the sandbox ({exc}): a tool "
            f"must return JSON data (str, int, float, bool, None, lists, dicts with str keys); "
            f"its value began: {repr(value)[:_RESULT_PREVIEW]}"
        ) from None


def _short_traceback(name: str, exc: BaseException) -> str:
    """The tool's exception and its last few frames: enough to fix a call, without the
    engine's frames or a wall of text."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_NOT_THE_TOOL)]
    frames = frames[-_TRACEBACK_FRAMES:]
    lines = [f"{name} raised {type(exc).__name__}: {exc}", "Traceback (most recent call last, on the host):"]
    lines += [line.rstrip("\n") for line in traceback.format_list(frames)]
    text = "\n".join(lines)
    return text if len(text) <= _TRACEBACK_CHARS else text[: _TRACEBACK_CHARS - 3] + "..."
