"""Which isolation tier a worker gets, decided at each `start_worker` (the probes behind it
run once per process): the strongest that works here, or `IsolationUnavailable`.

Tiers, strongest first:

- "bubblewrap": private pid, network, ipc, uts and mount namespaces (`_launch`).
- "landlock": the unprivileged tier, for containers and hosts without bubblewrap
  (`_unprivileged`).
- "none": a plain subprocess with a clean environment and resource limits, nothing more.
  Only when asked for by name; never chosen by "auto".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import anyio

from ..exceptions import IsolationUnavailable
from . import _launch as launch
from . import _unprivileged as unprivileged
from ._config import SandboxConfig

__all__ = ["TIER_SUMMARY", "Plan", "Tier", "check_isolation", "plan_isolation"]

Tier = Literal["bubblewrap", "landlock", "none"]

TIER_SUMMARY: dict[str, str] = {
    "bubblewrap": "namespaces: own pid/net/ipc/mount view; no host /proc, files or network",
    "landlock": "Landlock + seccomp + private uid: allowlisted files only, no /proc, no sockets",
    "none": "NO ISOLATION: the code can read the engine's files and secrets and reach the network",
}
"""One line per tier, for the doctor command and error messages."""

_FIXES = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) where user namespaces are "
    "allowed; or run on a Linux kernel with Landlock (>= 5.13; >= 6.12 when the engine does not run "
    "as root) on x86-64 or aarch64; or, for trusted code only, opt in to no isolation with "
    "SandboxConfig(isolation='none') / --isolation none. `rlm-async doctor --sandbox` shows what this "
    "machine supports."
)


@dataclass(frozen=True, slots=True)
class Plan:
    """How workers of one config are launched."""

    tier: Tier
    interp: launch.Interpreter
    bwrap: str | None
    drop_uid: bool
    """Each worker switches to a private unprivileged uid (the engine runs as root, and, in
    the "none" tier, the worker can still reach the interpreter after the switch)."""

    @property
    def isolated(self) -> bool:
        return self.tier != "none"


async def plan_isolation(config: SandboxConfig) -> Plan:
    """Choose the tier for `config`, or raise `IsolationUnavailable` naming what each tier
    lacks and how to fix it."""
    interp = await launch.find_interpreter(config.python)
    root = os.geteuid() == 0
    if config.isolation == "none":
        drop = root and await anyio.to_thread.run_sync(launch.can_drop_uid_unsandboxed, interp)
        return Plan(tier="none", interp=interp, bwrap=None, drop_uid=drop)
    missing: list[str] = []
    if config.isolation in ("auto", "bubblewrap"):
        bwrap = launch.find_bwrap(config.bwrap_path)
        if bwrap is None:
            why: str | None = (
                f"no bwrap executable found ({config.bwrap_path or 'bwrap on PATH, /usr/bin/bwrap'})"
            )
        else:
            why = await launch.probe_bwrap(bwrap, interp, allow_network=config.allow_network, may_setuid=root)
        if why is None:
            return Plan(tier="bubblewrap", interp=interp, bwrap=bwrap, drop_uid=root)
        missing.append(f"bubblewrap: {why}")
    if config.isolation in ("auto", "landlock"):
        why = await unprivileged.unavailable(interp, allow_network=config.allow_network)
        if why is None:
            unprivileged.harden_engine()
            return Plan(tier="landlock", interp=interp, bwrap=None, drop_uid=root)
        missing.append(f"landlock: {why}")
    wanted = "no isolation tier" if config.isolation == "auto" else f"the {config.isolation!r} tier"
    raise IsolationUnavailable(
        f"refusing to run model code: {wanted} can run here ({'; '.join(missing)}). Fix: {_FIXES}"
    )


async def check_isolation(config: SandboxConfig) -> Tier:
    """The tier a worker of `config` would run under, or `IsolationUnavailable`: the check
    `start_worker` makes first, on its own, so that a caller can refuse before it pays for
    anything (the engine makes it before a node's first model call, and starts the worker
    beside that call). Its probes run once per process."""
    return (await plan_isolation(config)).tier
