"""`rlm-async doctor --sandbox`: which isolation tiers work on this machine, which one `auto` (or the
requested tier) would use, what it isolates, and proof that a worker starts under it.
Run it where the engine will be deployed (same image, same user) before deploying."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

from ..exceptions import IsolationUnavailable, SandboxError
from . import _landlock as landlock
from . import _launch as launch
from . import _seccomp as seccomp
from . import _unprivileged as unprivileged
from ._config import SandboxConfig
from ._isolation import TIER_SUMMARY, plan_isolation
from ._worker import Worker

__all__ = ["Diagnosis", "TierReport", "diagnose", "render"]

ISOLATES: dict[str, dict[str, str]] = {
    "bubblewrap": {
        "environment": "yes: empty environment; own pid namespace, bwrap started with an empty one",
        "other processes": "yes: own pid namespace, no host /proc",
        "files": "yes: only /usr and the interpreter, read-only; private size-capped /tmp",
        "network": "yes: own empty network namespace (no loopback of the host)",
        "signals": "yes: nothing outside the pid namespace can be named",
        "resources": "rlimits (memory, CPU, files, processes), per-cell deadline, tmpfs cap",
    },
    "landlock": {
        "environment": "yes: clean environment; the engine is non-dumpable, /proc is not readable",
        "other processes": "yes: no /proc; Landlock and seccomp refuse ptrace and process_vm_*",
        "files": "yes: Landlock allowlist (/usr and the interpreter read-only, a private temp dir); "
        "names can still be stat()ed",
        "network": "yes: only AF_UNIX stream sockets and no connect() (seccomp); TCP denied (Landlock)",
        "signals": "yes: Landlock signal scope (ABI >= 6) and/or a private uid",
        "resources": "rlimits, per-cell deadline; the temp dir's total size is not capped",
    },
    "none": {name: "NO" for name in ("environment", "other processes", "files", "network", "signals")}
    | {"resources": "rlimits and the per-cell deadline only"},
}
"""What each tier isolates, by the README's categories (docs/security.md has the detail)."""


@dataclass(frozen=True, slots=True)
class TierReport:
    tier: str
    available: bool
    reason: str | None
    """Why it cannot run here (None when it can)."""


@dataclass(frozen=True, slots=True)
class Diagnosis:
    requested: str
    chosen: str | None
    """The tier a worker gets with the requested isolation; None: it would be refused."""
    refusal: str | None
    tiers: list[TierReport]
    facts: dict[str, Any]
    worker_check: str | None
    """What happened when a worker was started under the chosen tier."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"isolates": ISOLATES.get(self.chosen or "", {})}


async def _tier_reports(config: SandboxConfig) -> list[TierReport]:
    interp = await launch.find_interpreter(config.python)
    root = os.geteuid() == 0
    bwrap = launch.find_bwrap(config.bwrap_path)
    if bwrap is None:
        why: str | None = "no bwrap executable found"
    else:
        why = await launch.probe_bwrap(bwrap, interp, allow_network=config.allow_network, may_setuid=root)
    reports = [TierReport("bubblewrap", why is None, why)]
    why = await unprivileged.unavailable(interp, allow_network=config.allow_network)
    reports.append(TierReport("landlock", why is None, why))
    reports.append(TierReport("none", True, None))
    return reports


async def diagnose(config: SandboxConfig) -> Diagnosis:
    """Probe every tier, then start one worker as `config` would and run a cell in it."""
    tiers = await _tier_reports(config)
    facts = {
        "euid": os.geteuid(),
        "landlock_abi": landlock.abi(),
        "seccomp_arch": seccomp.arch(),
        "interpreter": (await launch.find_interpreter(config.python)).executable,
    }
    try:
        plan = await plan_isolation(config)
    except IsolationUnavailable as exc:
        return Diagnosis(config.isolation, None, str(exc), tiers, facts, None)
    started = time.monotonic()
    try:
        worker = await Worker.start("", config, plan)
    except SandboxError as exc:
        return Diagnosis(config.isolation, plan.tier, None, tiers, facts, f"FAILED to start: {exc}")

    async def no_calls(request: object) -> list[str]:
        raise AssertionError("no sub-calls in the doctor's cell")

    try:
        cell = await worker.run_cell("import os\nprint(os.getuid(), os.nice(0))", no_calls)
        lowered = worker.priority
    finally:
        await worker.aclose()
    check = f"worker started and ran a cell in {time.monotonic() - started:.2f} s"
    if cell.status != "ok":
        return Diagnosis(
            config.isolation,
            plan.tier,
            None,
            tiers,
            facts,
            f"FAILED: the cell ended {cell.status}: {cell.error}",
        )
    uid, nice = cell.stdout.split()
    check += " (as uid 0: the worker could not drop root)" if uid == "0" else f" as uid {uid}"
    check += f", at nice {nice}{_SESSION.get(lowered or 'refused', '')}"
    return Diagnosis(config.isolation, plan.tier, None, tiers, facts, check)


_SESSION = {
    "lowered": ", its session's scheduling group lowered as much (autogroup)",
    "unneeded": "",
    "busy": (
        "; its session's scheduling group was NOT lowered: the kernel allows a process "
        "without CAP_SYS_ADMIN one change per 100 ms machine-wide (a worker pool retries)"
    ),
    "refused": "; its session's scheduling group could NOT be lowered",
}
"""How `Worker.priority` reads after the doctor's check (`_priority`)."""


def render(d: Diagnosis) -> str:
    """The diagnosis as lines of text for a terminal."""
    lines = ["isolation tiers on this machine:"]
    for t in d.tiers:
        state = "available" if t.available else "unavailable"
        lines.append(f"  {t.tier:<11} {state:<12} {TIER_SUMMARY[t.tier]}")
        if t.reason:
            lines.append(f"  {'':<11} why: {t.reason}")
    lines.append("facts: " + ", ".join(f"{k}={v}" for k, v in d.facts.items()))
    if d.chosen is None:
        lines.append(f"isolation={d.requested!r}: REFUSED. {d.refusal}")
        return "\n".join(lines)
    lines.append(f"isolation={d.requested!r} runs model code under: {d.chosen}")
    for what, how in ISOLATES[d.chosen].items():
        lines.append(f"  {what:<16} {how}")
    lines.append(f"check: {d.worker_check}")
    return "\n".join(lines)
