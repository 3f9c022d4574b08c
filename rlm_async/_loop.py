"""The event loop rlm_async starts where it owns one: synchronous `RLM.completion()` and
`RLM.batch()`, a persistent RLM's background thread, and the CLI (`run`, `batch`, `serve`,
`demo`, `doctor`). A program that awaits `rlm.acompletion(...)` keeps its own loop.

uvloop where it is installed (a dependency on Linux and macOS), else asyncio;
`RLM_ASYNC_LOOP=asyncio` asks for asyncio, `RLM_ASYNC_LOOP=uvloop` requires uvloop. Why
uvloop: with the transport's direct connections (`transport.py`) a wide fan-out costs the
engine less CPU per sub-call on it (docs/design.md has the measurement).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple

import anyio

from .exceptions import ConfigError

__all__ = ["ENV", "backend_options", "loop_name", "run"]

ENV = "RLM_ASYNC_LOOP"
_CHOICES = ("uvloop", "asyncio")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def backend_options() -> dict[str, bool]:
    """anyio's asyncio backend options for the loop `RLM_ASYNC_LOOP` asks for (see above)."""
    raw = os.environ.get(ENV, "")
    choice = raw.strip().lower()
    if choice and choice not in _CHOICES:
        raise ConfigError(
            f"{ENV}={raw!r} is not a loop: use 'uvloop' or 'asyncio', or unset it (uvloop where installed)"
        )
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        raise ConfigError(f"{ENV}=uvloop, but uvloop is not installed: `pip install uvloop`, or unset {ENV}")
    return {"use_uvloop": installed and choice != "asyncio"}


def run(func: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
    """`anyio.run` on the loop `backend_options` picks."""
    return anyio.run(func, *args, backend_options=backend_options())


def loop_name() -> str:
    """The running event loop's kind: "uvloop" or "asyncio" (for reports and results)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
