"""Which isolation a worker gets, decided once per `start_worker`: bubblewrap where it runs;
else the plain-subprocess fallback with one `ReducedIsolationWarning`, or
`IsolationUnavailable` where the config requires bubblewrap."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import anyio

from .. import _events
from ..exceptions import IsolationUnavailable
from . import _launch as launch
from ._config import SandboxConfig

__all__ = ["Plan", "ReducedIsolationWarning", "plan_isolation"]


class ReducedIsolationWarning(UserWarning):
    """bubblewrap cannot run here: REPL workers run as plain subprocesses (once per process)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """How workers of one config are launched."""

    isolated: bool
    """Under bubblewrap; else the plain-subprocess fallback."""
    interp: launch.Interpreter
    bwrap: str | None
    drop_uid: bool
    """Each worker switches to a private unprivileged uid (the engine runs as root, and the
    worker can still reach the interpreter after the switch)."""


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
        stacklevel=4,  # _warn_reduced <- plan_isolation <- start_worker <- its caller
    )


async def plan_isolation(config: SandboxConfig) -> Plan:
    """Probe bubblewrap (cached per process) and decide; warns or raises as `config` says."""
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
