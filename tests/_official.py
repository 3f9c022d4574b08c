"""The compatibility harness: run a script under the official `rlms` package (0.1.3, module
`rlm`) against the simulator over real HTTP, and read back what it did.

The official package lives in a venv of its own, `.venv-official/` (`.ci/install-official`
makes it: its google-genai pins tenacity below rlm_async's). A test writes the script body;
the harness puts a preamble before it and runs it with `.venv-official/bin/python` in a
subprocess whose environment holds no API key of the host. The script talks to the
simulator through the official client (its `openai` backend, `base_url` pointing at the
simulator), so the simulator's request log holds what the official package sent on the
wire; with `SimConfig(record_bodies=True)` each entry carries the request's JSON body.

The preamble gives the script:

    BASE_URL, MODEL, SUB_MODEL      the simulator's URL and its two model names
    backend_kwargs(model=None)      {"model_name", "base_url", "api_key"} for `RLM(...)`
    report(**values)                JSON-compatible values the test reads back (merged)

    async with SimServer(SimConfig(record_bodies=True)) as sim:
        run = await run_official("r = RLM(backend_kwargs=backend_kwargs())\\n"
                                 "report(answer=r.completion('ctx', root_prompt='q').response)", sim)
        run.report["answer"], run.messages()[0]

Without `.venv-official` the calling test is skipped with a reason naming
`.ci/install-official`; under `CI=true` it fails instead (CI must run these tests).
"""

from __future__ import annotations

import json
import os
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from rlm_async.sim import LogEntry, SimServer

__all__ = [
    "OFFICIAL_PYTHON",
    "OfficialRun",
    "official_python",
    "rlm_async_backend_kwargs",
    "run_official",
    "wire_messages",
]

ROOT = Path(__file__).resolve().parent.parent
OFFICIAL_PYTHON = ROOT / ".venv-official" / "bin" / "python"
IN_CI = os.environ.get("CI", "").lower() == "true"
API_KEY = "sim-key"
"""What both packages send as their API key: the simulator takes any unless configured."""

_PREAMBLE = """\
import json as _json
import os as _os

BASE_URL = _os.environ["RLM_SIM_BASE_URL"]
MODEL = _os.environ["RLM_SIM_MODEL"]
SUB_MODEL = _os.environ["RLM_SIM_SUB_MODEL"]
_REPORT = {}


def backend_kwargs(model=None, **extra):
    return {"model_name": model or MODEL, "base_url": BASE_URL, "api_key": _os.environ["RLM_SIM_API_KEY"], **extra}


def report(**values):
    _REPORT.update(values)
    with open(_os.environ["RLM_OFFICIAL_OUT"], "w", encoding="utf-8") as _f:
        _json.dump(_REPORT, _f)


"""


@dataclass(frozen=True, slots=True)
class OfficialRun:
    """What one official script did."""

    report: dict[str, Any]
    """Everything the script passed to `report(...)`."""
    requests: list[LogEntry]
    """The simulator's log entries of the requests it sent, in arrival order."""
    stdout: str
    stderr: str

    def messages(self) -> list[list[dict[str, Any]]]:
        """The `messages` of each request, in arrival order (needs `record_bodies`)."""
        return wire_messages(self.requests)


def official_python() -> Path:
    """The official venv's interpreter; skips the test when it is missing (fails under CI)."""
    if OFFICIAL_PYTHON.exists():
        return OFFICIAL_PYTHON
    why = f"the official rlms package is not installed ({OFFICIAL_PYTHON} is missing)"
    if IN_CI:
        pytest.fail(f"CI=true but {why}; .ci/run must call .ci/install-official")
    pytest.skip(f"{why}; run .ci/install-official to install it")


def wire_messages(entries: list[LogEntry]) -> list[list[dict[str, Any]]]:
    """Each logged request's `messages` as sent, in arrival order."""
    out: list[list[dict[str, Any]]] = []
    for entry in sorted(entries, key=lambda e: e.seq):
        if entry.body is None:
            raise AssertionError(
                "the simulator did not keep request bodies: start it with SimConfig(record_bodies=True)"
            )
        messages = entry.body.get("messages")
        assert isinstance(messages, list)
        out.append(messages)
    return out


def rlm_async_backend_kwargs(sim: SimServer, model: str = "sim-model") -> dict[str, Any]:
    """What the preamble's `backend_kwargs()` gives the official script, for rlm_async's `RLM`."""
    return {"model_name": model, "base_url": sim.base_url, "api_key": API_KEY}


async def run_official(
    script: str,
    sim: SimServer,
    *,
    model: str = "sim-model",
    sub_model: str = "sim-mini",
    timeout_s: float = 180.0,
) -> OfficialRun:
    """Run `script` (after the preamble) with the official package against `sim`; raises
    `AssertionError` with its output if it exits non-zero."""
    python = official_python()
    before = {entry.id for entry in sim.log}
    with tempfile.TemporaryDirectory(prefix="rlm-official-") as tmp:
        work = Path(tmp)
        path = work / "script.py"
        out = work / "report.json"
        path.write_text(_PREAMBLE + textwrap.dedent(script), encoding="utf-8")
        env = {
            # Only what the script needs: no API key or proxy setting of the host leaks in.
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tmp,
            "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONDONTWRITEBYTECODE": "1",
            "RLM_SIM_BASE_URL": sim.base_url,
            "RLM_SIM_MODEL": model,
            "RLM_SIM_SUB_MODEL": sub_model,
            "RLM_SIM_API_KEY": API_KEY,
            "RLM_OFFICIAL_OUT": str(out),
        }
        with anyio.fail_after(timeout_s):
            done = await anyio.run_process([str(python), str(path)], cwd=tmp, env=env, check=False)
        stdout = done.stdout.decode("utf-8", "replace")
        stderr = done.stderr.decode("utf-8", "replace")
        if done.returncode != 0:
            raise AssertionError(
                f"the official script exited with {done.returncode}\n--- stderr\n{stderr[-4000:]}\n"
                f"--- stdout\n{stdout[-2000:]}"
            )
        report: dict[str, Any] = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    requests = sorted((e for e in sim.log if e.id not in before), key=lambda e: e.seq)
    return OfficialRun(report=report, requests=requests, stdout=stdout, stderr=stderr)
