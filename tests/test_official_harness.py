"""The compatibility harness itself (`tests/_official.py`): an official script runs against
the simulator over real HTTP, and the simulator's log holds what it sent."""

from __future__ import annotations

import pytest
from _official import run_official

from rlm_async.sim import Policies, PolicySpec, SimConfig, SimServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class TestHarness:
    @pytest.mark.asyncio
    async def test_official_script_runs_against_the_simulator(self) -> None:
        """An official RLM answers from the simulator, and its requests are logged with bodies."""
        # The official prompt is not one the simulator knows, so the "other" policy answers.
        done = '```repl\nanswer["content"] = "forty-two"\nanswer["ready"] = True\n```'
        config = SimConfig(
            record_bodies=True,
            policies=Policies(other=PolicySpec(name="script", options={"replies": [done]})),
        )
        async with SimServer(config) as sim:
            run = await run_official(
                """
                from rlm import RLM
                r = RLM(backend="openai", backend_kwargs=backend_kwargs())
                report(answer=r.completion("some context", root_prompt="What is it?").response)
                """,
                sim,
            )
        assert run.report == {"answer": "forty-two"}
        assert len(run.requests) == 1 and run.requests[0].model == "sim-model"
        messages = run.messages()[0]
        assert [m["role"] for m in messages] == ["system", "user", "user"]
        assert messages[1]["content"].startswith("Answer the following: What is it?")
