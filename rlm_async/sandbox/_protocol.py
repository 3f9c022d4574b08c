"""Reading what a worker reports: its frames, validated field by field, and its exit status,
explained. Everything a worker sends is untrusted; a frame that breaks the protocol raises
`ProtocolViolation`, and the caller kills that worker."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._prompt_batch import SharedPrefixPrompts, shared_prefix_bytes
from . import _bootstrap as proto
from ._channel import ProtocolViolation
from ._config import CellStatus, SandboxConfig, WorkerRequest

__all__ = ["Outcome", "clean", "describe_exit", "parse_cancel", "parse_done", "parse_request"]


@dataclass(slots=True)
class Outcome:
    """How a cell ended, as the engine learnt it (from `done`, a violation, or the worker's death)."""

    status: CellStatus
    error: str | None = None
    final_answer: str | None = None
    worker_dropped: int = 0
    kill: bool = False
    variables: tuple[str, ...] | None = None


def clean(text: str) -> str:
    """Strings from the worker may hold lone surrogates (JSON allows "\\ud800"); they would
    break any later UTF-8 encode in the engine."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _split_prompts(lengths: object, blob: bytearray) -> Sequence[str]:
    """A request's blob cut at `lengths` (bytes), each piece strict UTF-8: the decoder
    refuses lone surrogates and broken sequences, so what `clean` ensures for JSON strings
    holds here without a second pass (an honest worker already sent '?' for a surrogate).
    A prefix every prompt shares (`shared_prefix_bytes`) is decoded once and kept once
    (`SharedPrefixPrompts`).

    The blob is consumed: cut from its end, each decoded prompt's bytes are dropped, and a
    bytearray hands its memory back each time it shrinks below half. The peak is the prompts
    plus half the blob, not both whole (at 5,000 prompts of 13 KB, 33 MB less)."""
    if not isinstance(lengths, list) or not set(map(type, lengths)) <= {int}:
        raise ProtocolViolation("request lengths must be a list of integers")
    if min(lengths, default=0) < 0:
        raise ProtocolViolation(f"request lengths must not be negative (got {min(lengths)})")
    total = sum(lengths)
    if total != len(blob):
        raise ProtocolViolation(f"request lengths add up to {total:,} bytes but the blob has {len(blob):,}")
    shared = shared_prefix_bytes(blob, lengths)
    prefix = _decode(blob, 0, shared, 0, 0) if shared else ""
    prompts = [""] * len(lengths)
    for i in range(len(lengths) - 1, -1, -1):
        start = len(blob) - lengths[i]
        prompts[i] = _decode(blob, start + shared, len(blob), i, shared)
        del blob[start:]
    return SharedPrefixPrompts(prefix, tuple(prompts)) if shared else tuple(prompts)


def _decode(blob: bytearray, start: int, end: int, index: int, offset: int) -> str:
    """`blob[start:end]` as strict UTF-8, with no copy of the bytes; prompt `index`, whose
    bytes from `offset` these are, is a violation if it is not valid UTF-8."""
    try:
        with memoryview(blob) as view:  # released before the cut: a bytearray with a view cannot shrink
            return str(view[start:end], "utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation(
            f"request prompt {index} is not valid UTF-8 ({exc.reason} at byte {offset + exc.start})"
        ) from None


def parse_request(
    msg: dict[str, Any], blob: bytearray, max_prompts: int | None = None
) -> tuple[int, WorkerRequest]:
    """Validate a request frame. Its prompts come as a blob with `lengths`, or (as older
    workers and hand-made frames send them) as a JSON list `prompts` with no blob. More
    than `max_prompts` prompts is a violation (an honest worker refuses such a call itself).
    The blob is consumed: it is empty afterwards (see `_split_prompts`)."""
    rid, kind, model = msg.get("id"), msg.get("kind"), msg.get("model")
    count = msg.get("lengths", msg.get("prompts"))
    if max_prompts is not None and isinstance(count, list) and len(count) > max_prompts:
        raise ProtocolViolation(
            f"a request of {len(count):,} prompts, over max_batch_prompts={max_prompts:,}"
        )
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ProtocolViolation("request without an integer id")
    if kind not in proto.REQUEST_KINDS:
        raise ProtocolViolation(f"unknown request kind {kind!r}")
    if model is not None and not isinstance(model, str):
        raise ProtocolViolation("request model must be a str or null")
    tool = msg.get("tool")
    if kind == "tool":
        if not isinstance(tool, str) or not tool.isidentifier() or model is not None:
            raise ProtocolViolation("a tool request names its tool as an identifier, and no model")
    elif tool is not None:
        raise ProtocolViolation(f"a {kind} request names no tool")
    hedge = msg.get("hedge")
    if hedge is not None and not isinstance(hedge, bool):
        raise ProtocolViolation("request hedge must be a bool or null")
    single = kind in ("llm_query", "rlm_query", "tool")
    if "lengths" in msg:
        if "prompts" in msg:
            raise ProtocolViolation("a request carries either prompts or lengths, not both")
        lengths = msg["lengths"]
        if single and isinstance(lengths, list) and len(lengths) != 1:
            raise ProtocolViolation(f"{kind} carries exactly one prompt")
        prompts = _split_prompts(lengths, blob)
    else:
        raw = msg.get("prompts")
        if blob:
            raise ProtocolViolation("a request with a blob must give its prompts' lengths")
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise ProtocolViolation("request prompts must be a list of str")
        if single and len(raw) != 1:
            raise ProtocolViolation(f"{kind} carries exactly one prompt")
        prompts = tuple(clean(p) for p in raw)
    return rid, WorkerRequest(
        op=kind,
        prompts=prompts,
        model=None if model is None else clean(model),
        tool=tool,
        hedge=hedge,
    )


def parse_cancel(msg: dict[str, Any]) -> int:
    """Validate a `cancel` frame: the worker stopped iterating `llm_batch_as_completed`, so
    the engine stops that request's sub-calls. Only the id is read; an id that is not (or no
    longer) pending is ignored by the caller: the request may have just finished."""
    rid = msg.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ProtocolViolation("cancel without an integer id")
    if set(msg) != {"op", "id"}:
        raise ProtocolViolation(f"cancel frame with unexpected keys {sorted(set(msg) - {'op', 'id'})}")
    return rid


def parse_done(msg: dict[str, Any]) -> Outcome:
    status, error, final, dropped = (
        msg.get("status"),
        msg.get("error"),
        msg.get("final_answer"),
        msg.get("dropped"),
    )
    if status not in ("ok", "error", "memory"):
        raise ProtocolViolation(f"unknown cell status {status!r}")
    if not (error is None or isinstance(error, str)) or not (final is None or isinstance(final, str)):
        raise ProtocolViolation("cell error and final_answer must be str or null")
    streams = msg.get("streams")
    if streams is not None and (
        not isinstance(streams, list) or not streams or not all(isinstance(x, str) for x in streams)
    ):
        raise ProtocolViolation("cell 'streams' must be a non-empty list of str")
    if (
        not isinstance(dropped, list)
        or len(dropped) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dropped)
    ):
        raise ProtocolViolation("cell 'dropped' must be two non-negative integers")
    variables = msg.get("variables")
    if variables is not None:
        if not isinstance(variables, list) or not all(isinstance(v, str) for v in variables):
            raise ProtocolViolation("cell 'variables' must be a list of str")
        variables = tuple(clean(v)[:200] for v in variables[:10_000])
    if streams:
        said = "; ".join(clean(x)[:200] for x in streams[:2])
        return Outcome(
            status="stream_closed",
            error=(
                f"the code closed or redirected the REPL's standard streams ({said}), so its output "
                "could no longer be captured; the worker was replaced"
                + ("" if error is None else "\n" + clean(error))
            ),
            final_answer=None if final is None else clean(final),
            worker_dropped=sum(dropped),
            kill=True,
        )
    return Outcome(
        status=status,
        error=None if error is None else clean(error),
        final_answer=None if final is None else clean(final),
        worker_dropped=sum(dropped),
        kill=status == "memory",
        variables=variables,
    )


def describe_exit(rc: int | None, isolated: bool, config: SandboxConfig) -> tuple[CellStatus, str]:
    """The cell status and message for a worker that exited with `rc` (None: still running)."""
    if rc is None:
        return "crashed", "the worker closed its control channel and was killed"
    if rc == proto.EXIT_MEMORY:
        return "memory", f"the worker ran out of memory (memory_bytes={config.memory_bytes}) and exited"
    sig = -rc if rc < 0 else (rc - 128 if isolated and rc > 128 else None)
    if sig == signal.SIGXCPU:
        return (
            "cpu_limit",
            f"the worker used up its CPU time (cpu_seconds={config.cpu_seconds}) and was killed",
        )
    if sig == signal.SIGKILL:
        return (
            "crashed",
            "the worker was killed by SIGKILL (its CPU-time hard limit, or the kernel's OOM killer)",
        )
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return "crashed", f"the worker was killed by {name}"
    return "crashed", f"the worker exited with code {rc}"
