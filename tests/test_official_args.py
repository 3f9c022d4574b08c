"""The official constructor's smaller arguments: `sampling_args` / `sub_sampling_args`,
`max_errors`, `user_prologue`, `max_concurrent_subcalls`, `orchestrator` and `environment=`.

End-to-end tests run over real HTTP against the simulator and assert what it observed (its
request log, with bodies); the mapping tests read the configuration `RLM(...)` built.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from conftest import sandbox_config

from rlm_async import RLM, ModelConfig, ModelPrice, RLMResult
from rlm_async._journal.keys import request_key
from rlm_async._types import Message, ModelRequest
from rlm_async.exceptions import ConfigError
from rlm_async.sim import Policies, PolicySpec, SimConfig, SimServer

pytestmark = pytest.mark.e2e

LOCAL = {"model_name": "sim-model", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}


def fence(code: str) -> str:
    return f"Running it.\n```repl\n{code}\n```"


def scripted(*replies: str, **config: Any) -> SimConfig:
    policies = Policies(root=PolicySpec(name="script", options={"replies": list(replies)}))
    return SimConfig(record_bodies=True, policies=policies, **config)


async def run(sim: SimServer, *, context: str = "some text", **kwargs: Any) -> RLMResult:
    """`RLM(...)` with the official arguments, the simulator as its server, the test sandbox."""
    backend = {
        "model_name": "sim-model",
        "base_url": sim.base_url,
        "api_key": "k",
        "prices": ModelPrice.free(),
    }
    rlm = RLM(backend="openai", backend_kwargs=backend, **kwargs)
    rlm.config = dataclasses.replace(rlm.config, sandbox=sandbox_config())
    async with rlm:
        return await rlm.acompletion(context, "What is it?")


def bodies(sim: SimServer) -> list[dict[str, Any]]:
    return [e.body for e in sorted(sim.log, key=lambda e: e.seq) if e.body is not None]


DONE = fence('answer["content"] = "done"\nanswer["ready"] = True')


class TestSampling:
    @pytest.mark.asyncio
    async def test_sampling_args_are_sent_with_every_root_and_sub_request(self) -> None:
        """sampling_args reach every root request, sub_sampling_args every sub-call; temperature
        and max_tokens become the model's own settings, extra_body is merged in."""
        code = fence('s = llm_query("hello")\nanswer["content"] = "ok"\nanswer["ready"] = True')
        async with SimServer(scripted(code)) as sim:
            await run(
                sim,
                sampling_args={
                    "temperature": 0.5,
                    "top_p": 0.9,
                    "max_tokens": 300,
                    "extra_body": {"top_k": 4},
                },
                sub_sampling_args={"seed": 9, "stop": ["END"]},
            )
            root, sub = bodies(sim)
        assert (root["temperature"], root["top_p"], root["max_tokens"], root["top_k"]) == (0.5, 0.9, 300, 4)
        assert "seed" not in root
        # The sub model is a copy of the root (with its sampling args), plus its own.
        assert (sub["seed"], sub["stop"], sub["temperature"], sub["top_k"]) == (9, ["END"], 0.5, 4)

    def test_sampling_is_part_of_the_journal_key(self) -> None:
        """Two requests that differ only in a sampling field have different journal keys."""
        base = ModelRequest(model="m", messages=(Message("user", "hi"),), max_tokens=10)
        keys = {
            request_key(dataclasses.replace(base, sampling=s))
            for s in (None, {"seed": 1}, {"seed": 2}, {"seed": 1, "top_p": 0.5})
        }
        assert len(keys) == 4
        assert request_key(dataclasses.replace(base, sampling={"a": 1, "b": 2})) == request_key(
            dataclasses.replace(base, sampling={"b": 2, "a": 1})
        )

    @pytest.mark.asyncio
    async def test_a_journal_replays_only_calls_with_the_same_sampling(self, tmp_path: Path) -> None:
        """A re-run with the same sampling_args is answered from the journal (no request
        reaches the server); another seed is a new request."""
        journal = str(tmp_path / "j.sqlite")
        sent = []
        for seed in (1, 1, 2):
            async with SimServer(scripted(DONE)) as sim:
                backend = {"model_name": "sim-model", "base_url": sim.base_url, "api_key": "k"}
                rlm = RLM(backend_kwargs=backend, sampling_args={"seed": seed, "temperature": 0})
                rlm.config = dataclasses.replace(rlm.config, sandbox=sandbox_config(), journal_path=journal)
                async with rlm:
                    result = await rlm.acompletion("text", "q")
                assert result.response == "done"
                sent.append(len(sim.log))
        assert sent == [1, 0, 1]

    def test_fields_the_engine_writes_are_refused(self) -> None:
        """A sampling field the engine writes itself is a ConfigError naming the fix."""
        with pytest.raises(ConfigError, match="engine writes itself"):
            ModelConfig(model="m", sampling={"messages": []})
        with pytest.raises(ConfigError, match="JSON data"):
            RLM(backend_kwargs=LOCAL, sampling_args={"logit_bias": {1, 2}})


class TestMaxErrors:
    @pytest.mark.asyncio
    async def test_consecutive_failing_turns_end_the_run(self) -> None:
        """After max_errors turns in a row whose code raised, the run ends with status
        "error" and the error in its detail; no further request is sent."""
        async with SimServer(scripted(fence("raise ValueError('nope')"))) as sim:
            result = await run(sim, max_errors=3, max_iterations=10)
            requests = len(sim.log)
        assert result.status == "error"
        assert (
            result.detail is not None
            and "max_errors (3)" in result.detail
            and "ValueError: nope" in result.detail
        )
        assert requests == 3

    @pytest.mark.asyncio
    async def test_a_good_turn_resets_the_count(self) -> None:
        """Only errors in a row count: a turn whose code ran clean starts the count again."""
        bad, good = fence("raise ValueError('x')"), fence("print('fine')")
        async with SimServer(scripted(bad, good, bad, DONE)) as sim:
            result = await run(sim, max_errors=2)
        assert result.status == "ok" and result.response == "done"


class TestPrologueAndPrompts:
    @pytest.mark.asyncio
    async def test_user_prologue_follows_the_first_message(self) -> None:
        """user_prologue is a user message after the context's metadata, before the first turn."""
        async with SimServer(scripted(DONE)) as sim:
            await run(sim, user_prologue="Tip: the answer is short.")
            (body,) = bodies(sim)
        roles = [m["role"] for m in body["messages"]]
        assert roles == ["system", "user", "user"]
        assert body["messages"][2]["content"] == "Tip: the answer is short."

    def test_orchestrator_applies_to_the_official_prompt_only(self) -> None:
        """orchestrator is accepted; it adds the official addendum to a custom_system_prompt,
        and rlm_async's own default prompt stays as it is."""
        assert RLM(backend_kwargs=LOCAL, orchestrator=False).config.official_prompt is None
        prompt = RLM(
            backend_kwargs=LOCAL, custom_system_prompt="Be brief.", orchestrator=False
        ).config.official_prompt
        assert prompt is not None and prompt.orchestrator is False

    def test_a_prompt_that_str_format_cannot_fill_is_refused(self) -> None:
        """A custom_system_prompt with unescaped braces is refused at construction, naming the fix."""
        with pytest.raises(ConfigError, match=r"write literal braces as \{\{ and \}\}"):
            RLM(backend_kwargs=LOCAL, custom_system_prompt='Reply as {"a": 1}')


class TestConcurrency:
    @pytest.mark.asyncio
    async def test_max_concurrent_subcalls_caps_sub_calls_in_flight(self) -> None:
        """max_concurrent_subcalls is the governor's concurrency for the sub model: a batch of
        eight has at most two in flight at the server."""
        code = fence(
            "out = llm_batch([f'TASK ask\\nSay {i}.\\n<<<CHUNK\\nx\\nCHUNK>>>' for i in range(8)])\n"
            'answer["content"] = str(len(out))\nanswer["ready"] = True'
        )
        from rlm_async.sim import KindLatency, LatencyModel

        config = scripted(code, latency=LatencyModel(sub=KindLatency(ttft_s=0.05)))
        async with SimServer(config) as sim:
            result = await run(sim, max_concurrent_subcalls=2)
            peak = sim.log.max_in_flight("sub")
            subs = len(sim.log.of_kind("sub"))
        assert result.response == "8" and subs == 8
        assert peak <= 2

    def test_it_maps_to_the_sub_models_endpoint_limits(self) -> None:
        """The cap lands on every configured copy of the sub model's endpoint+model (the
        governor's limits are per endpoint+model and global), and nowhere else."""
        other = {"model_name": "other", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}
        rlm = RLM(
            backend_kwargs=LOCAL,
            other_backends=["openai"],
            other_backend_kwargs=[other],
            max_concurrent_subcalls=3,
        )
        assert rlm.config.sub is not None and rlm.config.sub.limits.max_concurrency == 3
        assert rlm.config.root.limits.max_concurrency != 3
        with pytest.raises(ConfigError, match="max_concurrent_subcalls"):
            RLM(backend_kwargs=LOCAL, max_concurrent_subcalls=0)


class TestEnvironment:
    @pytest.mark.parametrize(
        ("environment", "isolation"), [("local", "auto"), ("ipython", "auto"), ("docker", "bubblewrap")]
    )
    def test_environments_map_to_a_sandbox_tier(self, environment: str, isolation: str) -> None:
        """local and ipython keep the configured tier; docker is the bubblewrap tier."""
        assert RLM(backend_kwargs=LOCAL, environment=environment).config.sandbox.isolation == isolation

    @pytest.mark.parametrize("environment", ["modal", "e2b", "daytona", "prime"])
    def test_remote_environments_are_refused_naming_what_runs_instead(self, environment: str) -> None:
        """A remote cloud sandbox is refused with a message naming what rlm_async uses instead."""
        with pytest.raises(
            ConfigError, match=f"'{environment}'.*sandboxed worker process on this machine.*'local'"
        ):
            RLM(backend_kwargs=LOCAL, environment=environment)

    def test_an_unknown_environment_is_refused(self) -> None:
        with pytest.raises(ConfigError, match="'kubernetes' is unknown"):
            RLM(backend_kwargs=LOCAL, environment="kubernetes")
