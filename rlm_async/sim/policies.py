# Over 500 lines: the scripted root policy's REPL code is text here, beside the readers it drives.
"""Scripted policies: the simulated model, a function from a request's messages to reply text.

The server picks a policy by the request's kind (root turn, sub-call, other) from
`SimConfig.policies`, by registry name:

=================  ======================================================================
``rlm``            Root model. Recognises the task from the ``Query:`` line (or, in a
                   child RLM, from the parent's sub-call prompt it was given as context),
                   peeks at ``context``, then writes code that chunks it at line
                   boundaries, fans out with ``llm_batch`` (or ``llm_query``,
                   ``rlm_query_batched``), retries failed slots once, aggregates in Python
                   and sets ``answer["content"]`` / ``answer["ready"]`` (or finishes with
                   ``FINAL(...)`` / ``FINAL_VAR(...)`` lines).
``reader``         Sub model. Answers one sub-call prompt from its chunk alone: finds the
                   needle, counts records of a category, lists qualifying users.
``echo``           Anything else: ``ECHO: <start of the last user message>``.
``fixed``          Always the same reply (option ``text``), e.g. ``"FINAL(42)"``.
``script``         Reply ``replies[turn]`` (option ``replies``, a list; the last one
                   repeats), or per query (option ``by_query``: query line -> replies):
                   scripted conversations, e.g. hostile replies in tests. Option
                   ``on_last_user`` (text -> reply) answers first any request whose last
                   user message contains that text (a summary request, say).
``no_code``        Misbehaves: prose only, never a code block or FINAL.
``syntax_error``   Misbehaves: every code block is invalid Python.
``endless``        Misbehaves: a very long reply (option ``chars``), cut at ``max_tokens``.
``never_answers``  Misbehaves: harmless code every turn, never an answer.
``huge_fanout``    Misbehaves: one ``llm_batch`` of ``n`` prompts (budget tests).
``unhelpful``      Sub model that never answers in the expected format.
=================  ======================================================================

The sub-call prompts that ``rlm`` writes share a long byte-identical prefix (a ``TASK``
line, the instruction, and ``pad_chars`` of reminders, so the prefix passes the 1024-token
cache minimum) and put the chunk last, between ``<<<CHUNK`` and ``CHUNK>>>`` lines.

Policies are pure and deterministic: the same messages give the same reply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .._types import Message
from ..exceptions import ConfigError
from ..workloads import (
    CATEGORIES,
    QueryTask,
    classify_question,
    count_records,
    find_needle,
    parse_query,
    parse_records,
)
from ._config import PolicySpec

__all__ = [
    "NOT_AN_ANSWER",
    "SUB_NOT_AN_ANSWER",
    "Policy",
    "PolicyRequest",
    "make_policy",
    "policy_names",
    "split_sub_prompt",
    "sub_prompt_header",
]

_OPEN, _CLOSE = "<<<CHUNK\n", "\nCHUNK>>>"
_TASK_LINE = re.compile(r"^TASK (niah|count|pairs|ask)(?: (\S.*))?$", re.M)
_META = re.compile(r"Your context is a (\w+) with (\d+) total characters")
_PEEK = re.compile(r"TYPE (\w+) LEN (\d+)")
_ANSWER_LINE = re.compile(r"^ANSWER>>> ?(.*)$", re.M)
_FINAL_ASKED = ("final answer now", "Give your best final answer")


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyRequest:
    """What a policy sees: the conversation and a few request fields."""

    model: str
    messages: tuple[Message, ...]
    kind: str = "other"
    max_tokens: int | None = None

    def first_user(self) -> str:
        return next((m.content for m in self.messages if m.role == "user"), "")

    def last_user(self) -> str:
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")

    def turn(self) -> int:
        """How many replies the model already gave in this conversation."""
        return sum(1 for m in self.messages if m.role == "assistant")


class Policy(Protocol):
    name: str

    def __call__(self, request: PolicyRequest) -> str: ...


# ================================================================ the sub-call prompt protocol


def task_line(task: QueryTask | None) -> str:
    if task is None:
        return "TASK ask"
    if task.kind == "niah":
        return f"TASK niah key={task.key}"
    if task.kind == "count":
        return f"TASK count label={task.label}"
    return f"TASK pairs labels={','.join(task.labels)}"


def parse_task_line(text: str) -> QueryTask | str | None:
    """The task of a sub-call prompt's TASK line; "ask" for a free question; `None` if none."""
    m = _TASK_LINE.search(text[:2000])
    if m is None:
        return None
    kind, args = m.group(1), dict(kv.split("=", 1) for kv in (m.group(2) or "").split() if "=" in kv)
    if kind == "niah" and "key" in args:
        return QueryTask(kind="niah", key=args["key"])
    if kind == "count" and "label" in args:
        return QueryTask(kind="count", label=args["label"])
    if kind == "pairs" and "labels" in args:
        return QueryTask(kind="pairs", labels=tuple(args["labels"].split(",")))
    return "ask"


def split_sub_prompt(prompt: str) -> tuple[str, str]:
    """(instruction, chunk) of a sub-call prompt; the whole prompt is the chunk if it has no
    chunk markers."""
    start = prompt.find(_OPEN)
    if start < 0:
        return "", prompt
    end = prompt.rfind(_CLOSE)
    body_start = start + len(_OPEN)
    return prompt[:start], prompt[body_start : end if end >= body_start else len(prompt)]


def _instruction(task: QueryTask | None, query: str | None) -> str:
    cats = ", ".join(CATEGORIES)
    if task is None:
        return (
            f"Answer this question from the text below alone: {query or 'What is this text about?'}\n"
            "If the text holds nothing relevant, answer exactly NONE.\n"
        )
    if task.kind == "niah":
        return (
            f"Find the special magic number for {task.key} in the text below.\n"
            "If the text contains it, answer exactly NUMBER: <the number>. Otherwise answer exactly NONE.\n"
        )
    records = (
        "Each line of the text below is one record: 'Date: ... || User: <id> || Instance: <question>'.\n"
        f"Every question belongs to exactly one of these categories: {cats}.\n"
        "Decide each record's category from what its question asks.\n"
    )
    if task.kind == "count":
        return (
            records + f"Count the records in the category '{task.label}'. Answer exactly COUNT: <integer>.\n"
        )
    a, b = task.labels
    return records + (
        f"List the user IDs that have at least one record in the category '{a}' or '{b}'.\n"
        "Answer exactly USERS: <id>, <id>, ... or USERS: NONE.\n"
    )


# ================================================================ root policy


_PEEK_CODE = """\
print("TYPE", type(context).__name__, "LEN", len(context))
if isinstance(context, str):
    print(context[:300])
elif isinstance(context, dict):
    first = next(iter(context), None)
    print("FIRST KEY", first)
    print(str(context[first])[:300] if first is not None else "")
else:
    print("ITEM LENGTHS", [len(str(x)) for x in context[:5]])
    print(str(context[0])[:300] if len(context) else "")"""

_TEXT_CODE = """\
# One text with line structure, whatever the container.
if isinstance(context, dict):
    text = "\\n".join(str(v) for v in context.values())
elif isinstance(context, (list, tuple)):
    text = "\\n".join(str(v) for v in context)
else:
    text = str(context)"""

_CHILD_CODE = """\
# My context is a parent's sub-call prompt: keep only the data between the chunk markers.
if "<<<CHUNK\\n" in text:
    text = text.split("<<<CHUNK\\n", 1)[1].rsplit("\\nCHUNK>>>", 1)[0]"""

_CHUNK_CODE = """\
# Cut into @N@ roughly equal chunks, each ending at a line boundary.
n_chunks = max(1, min(@N@, len(text)))
bounds = [0]
for i in range(1, n_chunks):
    pos = i * len(text) // n_chunks
    nl = text.find("\\n", pos, pos + 20000)
    cut = pos if nl == -1 else nl + 1
    if bounds[-1] < cut < len(text):
        bounds.append(cut)
bounds.append(len(text))
chunks = [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a] or [""]"""

_FANOUT_CODE = {
    "llm_batch": "answers = llm_batch(prompts)",
    "llm_query": "answers = [llm_query(p) for p in prompts]",
    "rlm_query_batched": "answers = rlm_query_batched(prompts)",
    "rlm_query": "answers = [rlm_query(p) for p in prompts]",
}

_RETRY_CODE = {
    "llm_batch": "again = llm_batch([prompts[i] for i in failed])",
    "llm_query": "again = [llm_query(prompts[i]) for i in failed]",
    "rlm_query_batched": "again = rlm_query_batched([prompts[i] for i in failed])",
    "rlm_query": "again = [rlm_query(prompts[i]) for i in failed]",
}

NOT_AN_ANSWER = (
    "[rlm_async.sim cannot answer this question: it is a scripted simulator, not a model. "
    "It answers only the synthetic workloads' questions (rlm_async.workloads, `rlm-async demo`); "
    "what follows is the first line of each chunk it read, to show the fan-out.]"
)
"""The first line of every answer the ``rlm`` policy gives to a question it cannot really
answer (any question not written by `rlm_async.workloads`), so no one mistakes the
simulator's output for a model's."""

SUB_NOT_AN_ANSWER = "[simulated, not an answer] first line:"
"""How the ``reader`` policy starts its reply to a free question it cannot answer."""

_AGGREGATE_CODE = {
    "niah": """\
found = None
for a in answers:
    if "NUMBER:" in a:
        words = a.split("NUMBER:", 1)[1].split()
        if words and words[0].strip(".").isdigit():
            found = words[0].strip(".")
            break""",
    "count": """\
total = 0
for a in answers:
    if "COUNT:" in a:
        words = a.split("COUNT:", 1)[1].split()
        if words and words[0].strip(".").isdigit():
            total += int(words[0].strip("."))""",
    "pairs": """\
users = set()
for a in answers:
    if "USERS:" in a:
        for word in a.split("USERS:", 1)[1].replace(",", " ").split():
            if word.isdigit():
                users.add(int(word))
ids = sorted(users)
pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]""",
    "ask": """\
useful = [a.strip() for a in answers if a.strip() and a.strip().upper() != "NONE"]
useful = [a for a in useful if not a.startswith("Error")]""",
}

_FINAL_TEXT = {
    ("niah", False): 'final_answer = found if found else "NOT FOUND"',
    ("niah", True): 'final_answer = "NUMBER: " + found if found else "NONE"',
    ("count", False): "final_answer = str(total)",
    ("count", True): 'final_answer = "COUNT: " + str(total)',
    ("pairs", False): 'final_answer = ", ".join(f"({a}, {b})" for a, b in pairs) if pairs else "NONE"',
    ("pairs", True): 'final_answer = "USERS: " + (", ".join(str(u) for u in ids) if ids else "NONE")',
    (
        "ask",
        False,
    ): f'final_answer = {NOT_AN_ANSWER!r} + "\\n" + ("\\n".join(useful)[:4000] if useful else "NONE")',
    (
        "ask",
        True,
    ): f'final_answer = {NOT_AN_ANSWER!r} + "\\n" + ("\\n".join(useful)[:4000] if useful else "NONE")',
}

_REMINDER = "Reminder: answer from this chunk alone, in exactly the format asked above, with no preamble.\n"
_FANOUTS = tuple(_FANOUT_CODE)


def _pad_lines(pad_chars: int) -> int:
    return -(-pad_chars // len(_REMINDER)) if pad_chars > 0 else 0


def sub_prompt_header(query: str | None, *, pad_chars: int = 4_800) -> str:
    """The text every sub-call prompt that the ``rlm`` root policy writes for `query` starts
    with, byte for byte (a top-level query; ``pad_chars`` as the policy's option): what a
    benchmark needs to know how many prompt tokens the sub-calls share."""
    task = parse_query(query) if query else None
    return task_line(task) + "\n" + _instruction(task, query) + _REMINDER * _pad_lines(pad_chars)


def _fence(code: str) -> str:
    return f"```repl\n{code}\n```"


class RLMRootPolicy:
    """The scripted root model of an RLM loop (see the module docstring)."""

    name = "rlm"

    def __init__(
        self,
        *,
        chunk_chars: int = 100_000,
        chunks: int | None = None,
        max_chunks: int = 1000,
        fanout: str = "llm_batch",
        peek: bool = True,
        finish: str = "answer",
        pad_chars: int = 4_800,
        retry_failed: bool = True,
        child_chunks: int = 2,
    ) -> None:
        if fanout not in _FANOUTS:
            raise ValueError(f"fanout must be one of {list(_FANOUTS)}, got {fanout!r}")
        if finish not in ("answer", "final", "final_var"):
            raise ValueError(f"finish must be 'answer', 'final' or 'final_var', got {finish!r}")
        if chunk_chars < 1 or max_chunks < 1 or (chunks is not None and chunks < 1) or child_chunks < 1:
            raise ValueError("chunk_chars, chunks, max_chunks and child_chunks must be >= 1")
        self.chunk_chars = chunk_chars
        self.chunks = chunks
        self.max_chunks = max_chunks
        self.fanout = fanout
        self.peek = peek
        self.finish = finish
        self.pad_chars = pad_chars
        self.retry_failed = retry_failed
        self.child_chunks = child_chunks

    def __call__(self, request: PolicyRequest) -> str:
        first = request.first_user()
        task, child, query = self._understand(first)
        turn = request.turn()
        compute_turn = 1 if self.peek else 0
        last = request.last_user()
        if any(phrase in last for phrase in _FINAL_ASKED) and turn > 0:
            return self._final_from_output(request)
        if turn < compute_turn:
            return "Let me look at the structure of the context first.\n" + _fence(_PEEK_CODE)
        if turn == compute_turn:
            return self._compute_reply(request, first, task, child, query)
        if self.finish == "final_var" and turn == compute_turn + 1:
            return "The answer is in the variable final_answer.\nFINAL_VAR(final_answer)"
        return self._final_from_output(request)

    # ------------------------------------------------------------ reading the conversation

    @staticmethod
    def _understand(first: str) -> tuple[QueryTask | None, bool, str | None]:
        """(task, whether this is a child RLM given a parent's sub-call prompt, query text)."""
        query = None
        for line in first.splitlines():
            if line.startswith("Query: "):
                query = line[len("Query: ") :]
                break
        sub_task = parse_task_line(first)
        if isinstance(sub_task, QueryTask):
            return sub_task, True, query
        task = parse_query(query) if query else None
        return task, sub_task == "ask", query

    def _plan_chunks(self, request: PolicyRequest, first: str, child: bool) -> tuple[int, str]:
        """How many chunks, and a sentence saying what was read to decide it."""
        if child:
            return self.child_chunks, "This is a sub-task; I will split its data in a few parts."
        meta = _META.search(first)
        total = int(meta.group(2)) if meta else 0
        seen = "the metadata"
        peek = _PEEK.search(request.last_user()) if request.turn() > 0 else None
        if peek and peek.group(1) == "str":
            total = int(peek.group(2))
            seen = "the REPL output"
        if self.chunks is not None:
            n = self.chunks
        else:
            n = max(1, min(self.max_chunks, -(-total // self.chunk_chars)))
        kind = peek.group(1) if peek else (meta.group(1) if meta else "context")
        return n, f"From {seen}: a {kind} of {total} characters, so I will use {n} chunk(s)."

    def _final_from_output(self, request: PolicyRequest) -> str:
        value = None
        for m in reversed(request.messages):
            if m.role == "user":
                found = _ANSWER_LINE.findall(m.content)
                if found:
                    value = found[-1].strip()
                    break
        return f"Here is my final answer.\nFINAL({value if value else 'unknown'})"

    # ------------------------------------------------------------ writing code

    def _compute_reply(
        self, request: PolicyRequest, first: str, task: QueryTask | None, child: bool, query: str | None
    ) -> str:
        n, plan = self._plan_chunks(request, first, child)
        kind = task.kind if task is not None else "ask"
        header = task_line(task) + "\n" + _instruction(task, query)
        pad_lines = _pad_lines(self.pad_chars)
        parts = [_TEXT_CODE]
        if child:
            parts.append(_CHILD_CODE)
        parts.append(_CHUNK_CODE.replace("@N@", str(n)))
        parts.append(
            "# Every prompt shares this prefix byte for byte; the chunk goes last.\n"
            f"HEADER = {header!r}\n"
            f"HEADER += {_REMINDER!r} * {pad_lines}\n"
            'prompts = [HEADER + f"Chunk {i + 1} of {len(chunks)}.\\n<<<CHUNK\\n{c}\\nCHUNK>>>" '
            "for i, c in enumerate(chunks)]"
        )
        parts.append(_FANOUT_CODE[self.fanout])
        parts.append('failed = [i for i, a in enumerate(answers) if a.startswith("Error")]')
        if self.retry_failed:
            parts.append(
                "if failed:  # one more try for the slots that failed\n"
                f"    {_RETRY_CODE[self.fanout]}\n"
                "    for i, a in zip(failed, again):\n"
                "        answers[i] = a\n"
                '    failed = [i for i in failed if answers[i].startswith("Error")]'
            )
        parts.append(_AGGREGATE_CODE[kind])
        parts.append(_FINAL_TEXT[(kind, child)])
        parts.append('print("chunks:", len(chunks), "failed:", len(failed))')
        parts.append('print("ANSWER>>>", final_answer)')
        if self.finish == "answer":
            parts.append('answer["content"] = final_answer\nanswer["ready"] = True')
        what = {
            "niah": "find the needle",
            "count": "count the records of the category",
            "pairs": "find the qualifying users",
            "ask": "ask the question",
        }[kind]
        prose = f"{plan} I will ask a sub-model to {what} in each chunk, then combine the answers in Python."
        return prose + "\n" + _fence("\n".join(parts))


# ================================================================ sub policy


class ReaderPolicy:
    """The scripted sub model: answers a sub-call prompt from its chunk alone."""

    name = "reader"

    def __init__(self) -> None:
        # The oracle's question pools are built on first use (about 0.2 s): here, at server
        # start, rather than inside the first sub-call, a fan-out's warm-up.
        classify_question("")
        for label in CATEGORIES:
            count_records("", label)

    def __call__(self, request: PolicyRequest) -> str:
        prompt = request.last_user()
        instruction, chunk = split_sub_prompt(prompt)
        task = parse_task_line(instruction or prompt[:2000])
        if task is None:  # a prompt someone else wrote: look for a known question anywhere in it
            task = parse_query(prompt) or "ask"
        if task == "ask" or not isinstance(task, QueryTask):
            line = next((ln.strip() for ln in chunk.splitlines() if ln.strip()), "")
            return f"{SUB_NOT_AN_ANSWER} {line[:200]}" if line else "NONE"
        if task.kind == "niah":
            assert task.key is not None
            value = find_needle(chunk, task.key)
            return "NONE" if value is None else f"NUMBER: {value}"
        if task.kind == "count" and task.label is not None:
            return f"COUNT: {count_records(chunk, task.label)}"
        records = parse_records(chunk)
        if task.kind == "count":
            return f"COUNT: {sum(1 for _, category in records if category == task.label)}"
        wanted = set(task.labels)
        users = {user for user, category in records if category in wanted}
        return "USERS: " + (", ".join(str(u) for u in sorted(users)) if users else "NONE")


# ================================================================ simple and misbehaving policies


class EchoPolicy:
    name = "echo"

    def __call__(self, request: PolicyRequest) -> str:
        return "ECHO: " + request.last_user()[:200]


class FixedPolicy:
    name = "fixed"

    def __init__(self, *, text: str = "FINAL(42)") -> None:
        self.text = text

    def __call__(self, request: PolicyRequest) -> str:
        return self.text


class ScriptPolicy:
    """Reply `replies[turn]`; with `by_query`, the replies of the conversation whose
    ``Query:`` line is that key (so one server can script many concurrent queries)."""

    name = "script"

    def __init__(
        self,
        *,
        replies: list[str] | tuple[str, ...] = ("FINAL(42)",),
        by_query: Mapping[str, list[str] | tuple[str, ...]] | None = None,
        on_last_user: Mapping[str, str] | None = None,
    ) -> None:
        if not replies or any(not r for r in (by_query or {}).values()):
            raise ValueError("every script must hold at least one reply")
        self.replies = tuple(replies)
        self.by_query = {k: tuple(v) for k, v in (by_query or {}).items()}
        self.on_last_user = dict(on_last_user or {})

    def __call__(self, request: PolicyRequest) -> str:
        if self.on_last_user:
            last = request.last_user()
            for text, reply in self.on_last_user.items():
                if text in last:
                    return reply
        replies = self.replies
        if self.by_query:
            query = next(
                (
                    line[len("Query: ") :]
                    for line in request.first_user().splitlines()
                    if line.startswith("Query: ")
                ),
                None,
            )
            replies = self.by_query.get(query or "", replies)
        return replies[min(request.turn(), len(replies) - 1)]


class NoCodePolicy:
    """Never writes a code block or a FINAL line."""

    name = "no_code"

    def __call__(self, request: PolicyRequest) -> str:
        return (
            "I think the answer is somewhere in the middle of the document. "
            f"Let me reflect on it a little longer (turn {request.turn() + 1})."
        )


class SyntaxErrorPolicy:
    """Every reply's code block is invalid Python."""

    name = "syntax_error"

    def __call__(self, request: PolicyRequest) -> str:
        return "Let me count.\n" + _fence(f"for i in range({request.turn() + 3})\n    print(i")


class EndlessPolicy:
    """A reply far longer than any sensible `max_tokens`."""

    name = "endless"

    def __init__(self, *, chars: int = 400_000) -> None:
        self.chars = chars

    def __call__(self, request: PolicyRequest) -> str:
        unit = "I keep thinking about the context and what it might contain. "
        return (unit * (self.chars // len(unit) + 1))[: self.chars]


class NeverAnswersPolicy:
    """Harmless code every turn; never sets an answer or writes FINAL."""

    name = "never_answers"

    def __call__(self, request: PolicyRequest) -> str:
        step = request.turn() + 1
        return f"Step {step}: let me look again.\n" + _fence(f"print('step', {step}, len(context))")


class HugeFanoutPolicy:
    """One `llm_batch` of `n` prompts, then an answer (for budget and limiter tests)."""

    name = "huge_fanout"

    def __init__(
        self, *, n: int = 10_000, prompt: str = "TASK ask\nSay hi.\n<<<CHUNK\nhello\nCHUNK>>>"
    ) -> None:
        self.n = n
        self.prompt = prompt

    def __call__(self, request: PolicyRequest) -> str:
        if request.turn() > 0:
            return "FINAL(done)"
        code = (
            f"answers = llm_batch([{self.prompt!r}] * {self.n})\n"
            'print("ANSWER>>>", len(answers))\n'
            'answer["content"] = str(len(answers))\nanswer["ready"] = True'
        )
        return f"I will ask {self.n} questions at once.\n" + _fence(code)


class UnhelpfulPolicy:
    """A sub model that never answers in the format asked."""

    name = "unhelpful"

    def __call__(self, request: PolicyRequest) -> str:
        return "I cannot determine that from this text."


_REGISTRY: dict[str, Callable[..., Policy]] = {
    cls.name: cls
    for cls in (
        RLMRootPolicy,
        ReaderPolicy,
        EchoPolicy,
        FixedPolicy,
        ScriptPolicy,
        NoCodePolicy,
        SyntaxErrorPolicy,
        EndlessPolicy,
        NeverAnswersPolicy,
        HugeFanoutPolicy,
        UnhelpfulPolicy,
    )
}


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(spec: PolicySpec | str, **options: Any) -> Policy:
    """Build a policy from a `PolicySpec` or a registry name plus options.
    Unknown names or options raise `ConfigError` naming what is known."""
    if isinstance(spec, str):
        spec = PolicySpec(name=spec, options=options)
    elif options:
        spec = PolicySpec(name=spec.name, options={**spec.options, **options})
    factory = _REGISTRY.get(spec.name)
    if factory is None:
        raise ConfigError(f"unknown policy {spec.name!r}; known: {policy_names()}")
    opts: Mapping[str, Any] = spec.options
    try:
        return factory(**opts)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"policy {spec.name!r}: {exc}") from None
