"""The official package's run log: `RLMLogger` and the records it writes, in its JSONL format.

    from rlm_async import RLM, RLMLogger
    rlm = RLM(..., logger=RLMLogger(log_dir="logs"))

A log file holds one `metadata` line (the run's configuration), then one `iteration` line per
root turn: the messages sent, the reply, each code block with what it printed, the sub-calls
it made and the answer it set. The official visualizer (`visualizer/` of the `rlms`
repository) opens these files; `tests/test_official_sessions.py` compares their structure
with the log the official package writes for the same script.

What differs from the official package's log, on purpose: a code block's `locals` describes
each variable (its type, and length where it has one) instead of holding its value, because
the values live in a sandboxed worker and `context` alone may be gigabytes; a child RLM's
`rlm_calls` entry carries its answer but no usage (the tree's usage is in `RLMResult`).

Not our trace format (`rlm_async._trace`, docs/trace-format.md): the trace holds every event
of the call tree with timings and costs; this log holds what the root model saw, turn by turn.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["CodeBlock", "LoggedCall", "REPLResult", "RLMIteration", "RLMLogger", "RLMMetadata"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggedCall:
    """One sub-call a code block made (`llm_query`, `rlm_query`, one slot of a batch)."""

    model: str
    prompt: str
    response: str
    execution_time: float
    input_tokens: int | None = None
    """None for a child RLM: its usage is its whole tree's, reported in `RLMResult`."""
    output_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        summaries: dict[str, Any] = {}
        if self.input_tokens is not None:
            summaries[self.model] = {
                "total_calls": 1,
                "total_input_tokens": self.input_tokens,
                "total_output_tokens": self.output_tokens or 0,
            }
        return {
            "root_model": self.model,
            "prompt": self.prompt,
            "response": self.response,
            "usage_summary": {"model_usage_summaries": summaries},
            "execution_time": self.execution_time,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class REPLResult:
    """What one code block did, in the official shape."""

    stdout: str
    stderr: str
    locals: dict[str, str]
    """Variable name -> its description (type, length), not its value."""
    execution_time: float
    rlm_calls: tuple[LoggedCall, ...] = ()
    final_answer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "stdout": self.stdout,
            "stderr": self.stderr,
            "locals": dict(self.locals),
            "execution_time": self.execution_time,
            "rlm_calls": [c.to_dict() for c in self.rlm_calls],
            "final_answer": self.final_answer,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeBlock:
    code: str
    result: REPLResult

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "result": self.result.to_dict()}


@dataclass(frozen=True, slots=True, kw_only=True)
class RLMIteration:
    """One root turn: the messages sent, the reply, its code blocks, the answer if one was set."""

    prompt: list[dict[str, str]]
    response: str
    code_blocks: tuple[CodeBlock, ...] = ()
    final_answer: str | None = None
    iteration_time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "response": self.response,
            "code_blocks": [b.to_dict() for b in self.code_blocks],
            "final_answer": self.final_answer,
            "iteration_time": self.iteration_time,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RLMMetadata:
    """The run's configuration, as the log's first line shows it (API keys never included)."""

    root_model: str
    max_depth: int
    max_iterations: int
    backend: str
    backend_kwargs: dict[str, Any] = field(default_factory=dict)
    environment_type: str = "local"
    environment_kwargs: dict[str, Any] = field(default_factory=dict)
    other_backends: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "root_model": self.root_model,
            "max_depth": self.max_depth,
            "max_iterations": self.max_iterations,
            "backend": self.backend,
            "backend_kwargs": {k: _jsonable(v) for k, v in self.backend_kwargs.items()},
            "environment_type": self.environment_type,
            "environment_kwargs": {k: _jsonable(v) for k, v in self.environment_kwargs.items()},
            "other_backends": self.other_backends,
        }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


class RLMLogger:
    """Keeps each completion's trajectory (metadata + iterations) in memory, for
    `RLMResult.metadata`; with `log_dir`, also appends it to
    `<log_dir>/<file_name>_<timestamp>_<id>.jsonl`, one JSON object a line.

    The official package's constructor and methods. Each `completion` starts a new
    trajectory in memory (`clear_iterations`); the file keeps every completion's lines."""

    def __init__(
        self,
        log_dir: str | None = None,
        file_name: str = "rlm",
        *,
        now: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.log_dir = log_dir
        self.log_file_path: str | None = None
        self._now = now
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            stamp = now().strftime("%Y-%m-%d_%H-%M-%S")
            self.log_file_path = os.path.join(log_dir, f"{file_name}_{stamp}_{uuid.uuid4().hex[:8]}.jsonl")
        self._run_metadata: dict[str, Any] | None = None
        self._iterations: list[dict[str, Any]] = []
        self._iteration_count = 0

    def log_metadata(self, metadata: RLMMetadata) -> None:
        """Keep (and write) the run's metadata; only the first call counts, as officially."""
        if self._run_metadata is not None:
            return
        self._run_metadata = metadata.to_dict()
        self._append({"type": "metadata", "timestamp": self._now().isoformat(), **self._run_metadata})

    def log(self, iteration: RLMIteration) -> None:
        """Keep (and write) one root turn."""
        self._iteration_count += 1
        entry = {
            "type": "iteration",
            "iteration": self._iteration_count,
            "timestamp": self._now().isoformat(),
            **iteration.to_dict(),
        }
        self._iterations.append(entry)
        self._append(entry)

    def clear_iterations(self) -> None:
        """Start the next completion's trajectory (the file keeps what was written)."""
        self._iterations = []
        self._iteration_count = 0

    def get_trajectory(self) -> dict[str, Any] | None:
        """`{"run_metadata", "iterations"}` of the current completion; None before metadata."""
        if self._run_metadata is None:
            return None
        return {"run_metadata": self._run_metadata, "iterations": list(self._iterations)}

    @property
    def iteration_count(self) -> int:
        return self._iteration_count

    def _append(self, entry: dict[str, Any]) -> None:
        if self.log_file_path is None:
            return
        with open(self.log_file_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
