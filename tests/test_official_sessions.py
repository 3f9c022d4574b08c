"""The same script under the official `rlms` package and under rlm_async, against the
simulator over real HTTP: a persistent session's answers and the variables it exposes, and
the run log's structure, must agree (issue 18).

The script is one text; only its import line differs (`from rlm import RLM` or rlm_async's).
Under rlm_async it runs in a thread of this process (its synchronous `completion` keeps its
event loop in a thread of its own, as `persistent=True` needs), with the test sandbox."""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

import anyio
import pytest
from _official import rlm_async_backend_kwargs, run_official
from _session_scripts import VARIABLES, scripted, steps
from conftest import sandbox_config

import rlm_async
from rlm_async.sim import SimServer
from rlm_async.sim._config import Persona

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ASK = '```repl\nreply = llm_query("TASK ask\\nsay hello")\nprint(len(reply) > 0)\n```'
SCRIPT = """
import glob, json, tempfile

with tempfile.TemporaryDirectory() as log_dir:
    r = RLM(backend="openai", backend_kwargs=backend_kwargs(), persistent=True, logger=RLMLogger(log_dir=log_dir))
    answers = [r.completion(c, root_prompt="What is here?").response for c in ("alpha", ["beta"], {"g": "gamma"})]
    r.close()
    lines = []
    for path in glob.glob(log_dir + "/*.jsonl"):
        with open(path) as f:
            lines += [json.loads(line) for line in f]
report(answers=answers, log=lines)
"""
OFFICIAL_IMPORTS = "from rlm import RLM\nfrom rlm.logger import RLMLogger\n"


class _TestRLM(rlm_async.RLM):
    """rlm_async's RLM with the test sandbox (bubblewrap where it works, else "none")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = dataclasses.replace(self.config, sandbox=sandbox_config())


def _run_ours(script: str, sim: SimServer) -> dict[str, Any]:
    """Run `script` under rlm_async in this thread, with what the official harness's
    preamble gives a script (`backend_kwargs`, `report`); return what it reported."""
    reported: dict[str, Any] = {}
    namespace: dict[str, Any] = {
        "RLM": _TestRLM,
        "RLMLogger": rlm_async.RLMLogger,
        "backend_kwargs": lambda model=None: rlm_async_backend_kwargs(sim, model or "sim-model"),
        "report": reported.update,
    }
    exec(compile(textwrap.dedent(script), "<same script>", "exec"), namespace)
    return reported


async def _run_both(script: str, sim: SimServer) -> tuple[dict[str, Any], dict[str, Any]]:
    """What `script` reported under the official package, then under rlm_async."""
    official = await run_official(OFFICIAL_IMPORTS + textwrap.dedent(script), sim)
    ours = await anyio.to_thread.run_sync(_run_ours, script, sim)
    return official.report, ours


def _shape(value: Any, key: str = "") -> Any:
    """The structure of a log line: keys and value types, not values. `locals` is a dict in
    both (of values officially, of descriptions in ours); a list by its first item."""
    if key == "locals":
        return "dict"
    if isinstance(value, dict):
        return {k: _shape(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0], key)] if value else []
    return type(value).__name__


class TestPersistentParity:
    @pytest.mark.asyncio
    async def test_the_same_script_gives_the_same_answers_variables_and_log_structure(self) -> None:
        """Three calls of one persistent RLM: the official package and rlm_async answer the
        same, expose the same context_N/history_N variables, and write logs of the same
        structure (the same line types, keys and value types)."""
        config = scripted(ASK, VARIABLES)
        async with SimServer(config) as sim:
            theirs, ours = await _run_both(SCRIPT, sim)
        expected = [
            "call 1: ['context', 'context_0']",
            "call 2: ['context', 'context_0', 'context_1', 'history', 'history_0']",
            "call 3: ['context', 'context_0', 'context_1', 'context_2', 'history', 'history_0', 'history_1']",
        ]
        assert theirs["answers"] == expected
        assert ours["answers"] == expected
        theirs_log, our_log = theirs["log"], ours["log"]
        assert [line["type"] for line in our_log] == [line["type"] for line in theirs_log]
        assert [line["type"] for line in our_log] == ["metadata"] + ["iteration"] * 6
        assert [_shape(line) for line in our_log] == [_shape(line) for line in theirs_log]
        # The sub-call the first turn made is in both logs, with its prompt.
        for log in (theirs_log, our_log):
            call = log[1]["code_blocks"][0]["result"]["rlm_calls"][0]
            assert call["prompt"] == "TASK ask\nsay hello"


STEPS = steps("lorem ipsum dolor ", 200, until=10)
"""Each turn prints 3,600 characters (about 900 tokens): an 8,192-token window fills fast."""

COMPACTION_SCRIPT = """
r = RLM(backend="openai", backend_kwargs=backend_kwargs(model="gpt-4"), compaction=True, max_iterations=20)
report(answer=r.completion("some context", root_prompt="Count the steps.").response)
"""


class TestCompactionParity:
    @pytest.mark.asyncio
    async def test_the_same_long_conversation_is_compacted_alike(self) -> None:
        """A model with an 8,192-token window (the official package knows gpt-4's; rlm_async
        reads it from the server): the same script, compacted at 85%, ends with the same
        answer, and the REPL's `history` holds the same turns and summaries."""
        summary = "SUMMARY: printed lorem ipsum each step; the counter is `step`."
        config = dataclasses.replace(
            scripted(STEPS, on_last_user={"Summarize your progress": summary}),
            persona=Persona.vllm(),
            context_window=8192,
            models=("gpt-4",),
        )
        async with SimServer(config) as sim:
            theirs, ours = await _run_both(COMPACTION_SCRIPT, sim)
        assert theirs["answer"].startswith("10 steps; history: ")
        assert not theirs["answer"].endswith(" 0 summaries")
        assert ours["answer"] == theirs["answer"], (ours, theirs)
