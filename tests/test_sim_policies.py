"""Scripted policies: the root policy's code is executed for real, against the sub policy,
in a small stand-in for the engine's loop, and must get every workload right."""

from __future__ import annotations

import contextlib
import io
import traceback
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from rlm_async._parsing import find_code_blocks, find_final
from rlm_async._prompts import describe_context, first_user_message, root_system_prompt, sub_system_prompt
from rlm_async._types import Message, ModelRequest
from rlm_async.exceptions import ConfigError
from rlm_async.sim import (
    KindLatency,
    LatencyModel,
    PolicyRequest,
    SimConfig,
    SimServer,
    make_policy,
    policy_names,
    serialize_messages,
)
from rlm_async.sim.policies import split_sub_prompt
from rlm_async.transport import OpenAITransport
from rlm_async.workloads import Workload, oolong_counting, oolong_pairs, s_niah

Policy = Callable[[PolicyRequest], str]


class MiniLoop:
    """The RLM protocol without the engine: root turns, ```repl blocks run with exec() in one
    namespace, REPL output sent back, `answer` dict / FINAL / FINAL_VAR, sub-calls answered by
    the sub policy, and rlm_query running a child loop while depth + 1 < max_depth."""

    def __init__(self, root: Policy, sub: Policy, *, max_depth: int = 1, max_turns: int = 6) -> None:
        self.root, self.sub = root, sub
        self.max_depth, self.max_turns = max_depth, max_turns
        self.sub_prompts: list[str] = []
        self.root_replies: list[str] = []

    def llm_query(self, prompt: str, model: str | None = None) -> str:
        self.sub_prompts.append(prompt)
        messages = (Message("system", sub_system_prompt()), Message("user", prompt))
        return self.sub(PolicyRequest(model="sim-mini", messages=messages, kind="sub"))

    def llm_batch(self, prompts: list[str], model: str | None = None) -> list[str]:
        return [self.llm_query(p) for p in prompts]

    def run(self, context: Any, query: str | None, depth: int = 0) -> str | None:
        messages = [
            Message("system", root_system_prompt()),
            Message("user", first_user_message(describe_context(context), query)),
        ]

        def rlm_query(prompt: str, model: str | None = None) -> str:
            if depth + 1 < self.max_depth:
                return self.run(prompt, None, depth + 1) or "Error: the child gave no answer"
            return self.llm_query(prompt)

        namespace: dict[str, Any] = {
            "context": context,
            "answer": {"content": None, "ready": False},
            "llm_query": self.llm_query,
            "llm_batch": self.llm_batch,
            "rlm_query": rlm_query,
            "rlm_query_batched": lambda ps, model=None: [rlm_query(p) for p in ps],
        }
        for _ in range(self.max_turns):
            reply = self.root(PolicyRequest(model="sim-model", messages=tuple(messages), kind="root"))
            self.root_replies.append(reply)
            messages.append(Message("assistant", reply))
            outputs = []
            for code in find_code_blocks(reply):
                buffer = io.StringIO()
                with contextlib.redirect_stdout(buffer):
                    try:
                        exec(code, namespace)
                    except Exception:
                        buffer.write(traceback.format_exc())
                outputs.append(buffer.getvalue())
            if namespace["answer"]["ready"]:
                return str(namespace["answer"]["content"])
            marker = find_final(reply)
            if marker is not None:
                return marker.value if marker.kind == "text" else str(namespace.get(marker.value))
            messages.append(Message("user", "REPL output:\n" + "\n".join(outputs)))
        return None


def workloads() -> list[Workload]:
    return [
        s_niah("64k", seed=1),
        s_niah("32k", seed=2, shape="list"),
        s_niah("32k", seed=3, shape="dict", depth=0.0),
        s_niah("32k", seed=4, depth=1.0),
        oolong_counting("64k", seed=1),
        oolong_counting("32k", seed=2, shape="list"),
        oolong_counting("32k", seed=3, shape="dict"),
        oolong_pairs("64k", seed=1),
        oolong_pairs("32k", seed=2, shape="list"),
    ]


@pytest.fixture(scope="module")
def all_workloads() -> list[Workload]:
    return workloads()


class TestRootPolicySolvesWorkloads:
    @pytest.mark.parametrize(
        "options",
        [
            {},
            {"finish": "final"},
            {"finish": "final_var", "peek": False},
            {"fanout": "llm_query", "chunks": 3},
        ],
        ids=["answer-dict", "FINAL", "FINAL_VAR-no-peek", "llm_query-loop"],
    )
    def test_every_workload_is_answered_right(
        self, all_workloads: list[Workload], options: dict[str, Any]
    ) -> None:
        """The root policy's code, run for real against the reader policy, answers every
        workload and context shape correctly, with one sub-call per chunk."""
        for w in all_workloads:
            loop = MiniLoop(make_policy("rlm", chunk_chars=20_000, **options), make_policy("reader"))
            answer = loop.run(w.context, w.query)
            assert w.score(answer), (w.name, answer and answer[:200])
            expected_chunks = options.get("chunks") or -(-w.context_chars // 20_000)
            assert len(loop.sub_prompts) in (expected_chunks, expected_chunks - 1), w.name

    def test_depth_two_uses_child_rlms_whose_root_is_the_same_policy(
        self, all_workloads: list[Workload]
    ) -> None:
        """With rlm_query_batched and max_depth=2, each chunk goes to a child RLM whose root
        (the same policy) reads its task from the prompt it was given and answers in the
        sub-call format; the parent still gets every workload right."""
        for w in all_workloads[::2]:
            loop = MiniLoop(
                make_policy("rlm", chunks=3, fanout="rlm_query_batched", child_chunks=2),
                make_policy("reader"),
                max_depth=2,
            )
            answer = loop.run(w.context, w.query)
            assert w.score(answer), (w.name, answer and answer[:200])
            assert len(loop.sub_prompts) == 6  # 3 children x 2 chunks each

    def test_sub_prompts_share_a_long_identical_prefix_with_the_chunk_last(self) -> None:
        """Every sub-call prompt of a fan-out starts with the same >= 1024-token prefix (system
        prompt included) and ends with its chunk between the markers."""
        w = oolong_counting("64k", seed=5)
        loop = MiniLoop(make_policy("rlm", chunks=8), make_policy("reader"))
        assert w.score(loop.run(w.context, w.query))
        serialized = [
            serialize_messages([Message("system", sub_system_prompt()), Message("user", p)])
            for p in loop.sub_prompts
        ]
        shared = 0
        while all(s[shared] == serialized[0][shared] for s in serialized):
            shared += 1
        assert shared // 4 >= 1024
        assert all(p.endswith("\nCHUNK>>>") for p in loop.sub_prompts)
        chunks = [split_sub_prompt(p)[1] for p in loop.sub_prompts]
        assert "".join(chunks) == w.context  # the chunks tile the context, at line boundaries

    def test_peek_turn_comes_first_and_its_output_is_read(self) -> None:
        """Turn one only looks at the context; turn two says what it read from the REPL output."""
        w = s_niah("32k", seed=9)
        loop = MiniLoop(make_policy("rlm", chunk_chars=50_000), make_policy("reader"))
        assert w.score(loop.run(w.context, w.query))
        first, second = loop.root_replies
        assert "llm_batch" not in first and "print(" in first
        assert f"From the REPL output: a str of {len(w.context)} characters" in second

    def test_final_answer_request_gets_a_final_line(self) -> None:
        """When the engine asks for a final answer, the root replies FINAL(...) with the value its
        code printed earlier."""
        root = make_policy("rlm")
        messages = (
            Message("system", root_system_prompt()),
            Message("user", "Your context is a str with 10 total characters.\nQuery: ?"),
            Message("assistant", "```repl\nprint(1)\n```"),
            Message("user", "REPL output:\nANSWER>>> 1234"),
            Message("assistant", "```repl\nprint(2)\n```"),
            Message("user", "You have used all 2 iterations. Give your best final answer now, ..."),
        )
        reply = root(PolicyRequest(model="m", messages=messages, kind="root"))
        marker = find_final(reply)
        assert marker is not None and marker.value == "1234"


class TestReaderPolicy:
    def test_reader_answers_from_the_chunk_in_each_format(self) -> None:
        """The reader finds needles, counts categories and lists users, from the chunk alone."""
        reader = make_policy("reader")

        def ask(prompt: str) -> str:
            messages = (Message("system", sub_system_prompt()), Message("user", prompt))
            return reader(PolicyRequest(model="m", messages=messages, kind="sub"))

        needle = "One of the special magic numbers for red-fox is: 1234567."
        assert (
            ask(f"TASK niah key=red-fox\nFind it.\n<<<CHUNK\nfoo\n{needle}\nbar\nCHUNK>>>")
            == "NUMBER: 1234567"
        )
        assert ask("TASK niah key=red-fox\nFind it.\n<<<CHUNK\nnothing\nCHUNK>>>") == "NONE"
        # The needle inside the instruction part does not count: only the chunk is read.
        assert ask(f"TASK niah key=red-fox\n{needle}\n<<<CHUNK\nnothing\nCHUNK>>>") == "NONE"
        records = "\n".join(
            [
                "Date: Jan 01, 2023 || User: 11111 || Instance: What does NASA stand for?",
                "Date: Jan 02, 2023 || User: 22222 || Instance: Where is the Alhambra located?",
                "Date: Jan 03, 2023 || User: 33333 || Instance: What does GDP stand for?",
            ]
        )
        assert ask(f"TASK count label=abbreviation\nCount.\n<<<CHUNK\n{records}\nCHUNK>>>") == "COUNT: 2"
        assert ask(f"TASK pairs labels=abbreviation,location\nList.\n<<<CHUNK\n{records}\nCHUNK>>>") == (
            "USERS: 11111, 22222, 33333"
        )
        assert ask(f"TASK pairs labels=human,numeric\nList.\n<<<CHUNK\n{records}\nCHUNK>>>") == "USERS: NONE"

    def test_reader_understands_a_workload_question_without_the_task_line(self) -> None:
        """A prompt some other root wrote ("question + text") is answered if it holds a known question."""
        w = s_niah("8k", seed=11)
        reader = make_policy("reader")
        prompt = f"{w.query}\n\n{w.context}"
        reply = reader(PolicyRequest(model="m", messages=(Message("user", prompt),), kind="sub"))
        assert reply == f"NUMBER: {w.truth}"


class TestMisbehavingPolicies:
    def request(self, turn: int = 0) -> PolicyRequest:
        messages = [Message("system", root_system_prompt()), Message("user", "Query: anything")]
        for _ in range(turn):
            messages += [Message("assistant", "..."), Message("user", "REPL output:\n")]
        return PolicyRequest(model="m", messages=tuple(messages), kind="root")

    def test_no_code_never_writes_code_or_final(self) -> None:
        """no_code replies with prose only."""
        reply = make_policy("no_code")(self.request())
        assert find_code_blocks(reply) == [] and find_final(reply) is None

    def test_syntax_error_code_does_not_compile(self) -> None:
        """syntax_error writes a ```repl block that is not valid Python."""
        (code,) = find_code_blocks(make_policy("syntax_error")(self.request()))
        with pytest.raises(SyntaxError):
            compile(code, "<repl>", "exec")

    def test_endless_reply_is_as_long_as_configured(self) -> None:
        """endless writes `chars` characters (the server then cuts it at max_tokens)."""
        assert len(make_policy("endless", chars=123_456)(self.request())) == 123_456

    def test_never_answers_keeps_writing_harmless_code(self) -> None:
        """never_answers writes runnable code every turn and the loop ends without an answer."""
        loop = MiniLoop(make_policy("never_answers"), make_policy("reader"), max_turns=4)
        assert loop.run("some context", "anything") is None
        assert len(loop.root_replies) == 4 and all(find_code_blocks(r) for r in loop.root_replies)

    def test_huge_fanout_asks_n_questions_in_one_batch(self) -> None:
        """huge_fanout sends one llm_batch of n prompts, then answers."""
        loop = MiniLoop(make_policy("huge_fanout", n=250), make_policy("reader"))
        assert loop.run("ctx", "anything") == "250"
        assert len(loop.sub_prompts) == 250

    def test_unhelpful_sub_policy_makes_the_root_answer_wrong_but_finish(self) -> None:
        """With an unhelpful sub model the root still finishes, with a wrong answer."""
        w = oolong_counting("16k", seed=1)
        answer = MiniLoop(make_policy("rlm"), make_policy("unhelpful")).run(w.context, w.query)
        assert answer == "0" and not w.score(answer)


class TestRegistry:
    def test_unknown_names_and_options_are_config_errors(self) -> None:
        """make_policy names what is known when given an unknown policy or option."""
        assert {"rlm", "reader", "echo", "no_code", "endless"} <= set(policy_names())
        with pytest.raises(ConfigError, match="unknown policy 'nope'"):
            make_policy("nope")
        with pytest.raises(ConfigError, match="policy 'rlm'"):
            make_policy("rlm", chunkz=3)
        with pytest.raises(ConfigError, match="fanout"):
            make_policy("rlm", fanout="telepathy")


class TestOverHTTP:
    @pytest.mark.anyio
    async def test_the_loop_runs_over_http_and_the_second_fanout_hits_the_prefix_cache(self) -> None:
        """Root turns and sub-calls served by SimServer solve the task; a batch of cold
        sub-calls sent together all miss the cache, and the same fan-out run again hits it."""
        w = oolong_counting("64k", seed=21)
        config = SimConfig(latency=LatencyModel(sub=KindLatency(ttft_s=0.05)))
        async with SimServer(config) as sim:
            transport = OpenAITransport(sim.base_url)

            def wire(model: str, messages: tuple[Message, ...]) -> ModelRequest:
                return ModelRequest(model=model, messages=messages, max_tokens=4096)

            def sub_messages(prompt: str) -> tuple[Message, ...]:
                return (Message("system", sub_system_prompt()), Message("user", prompt))

            async def batch(prompts: list[str]) -> list[str]:
                out = [""] * len(prompts)

                async def one(i: int) -> None:
                    out[i] = (await transport.complete(wire("sim-mini", sub_messages(prompts[i])))).text

                async with anyio.create_task_group() as tg:
                    for i in range(len(prompts)):
                        tg.start_soon(one, i)
                return out

            class HttpLoop(MiniLoop):
                def llm_query(self, prompt: str, model: str | None = None) -> str:
                    return self.llm_batch([prompt])[0]

                def llm_batch(self, prompts: list[str], model: str | None = None) -> list[str]:
                    self.sub_prompts.extend(prompts)
                    return anyio.from_thread.run(batch, prompts)

            def root(request: PolicyRequest) -> str:
                return anyio.from_thread.run(transport.complete, wire("sim-model", request.messages)).text

            def run_once() -> str | None:
                return HttpLoop(root, make_policy("reader")).run(w.context, w.query)

            first = await anyio.to_thread.run_sync(run_once)
            second = await anyio.to_thread.run_sync(run_once)
            await transport.aclose()
        assert w.score(first) and w.score(second)
        subs = sorted(sim.log.of_kind("sub"), key=lambda e: e.seq)
        n = -(-w.context_chars // 100_000)
        assert len(subs) == 2 * n and n > 1
        assert all(e.cached_tokens == 0 for e in subs[:n])
        assert all(e.cached_tokens >= 1024 for e in subs[n:])
        assert {e.kind for e in sim.log} == {"root", "sub"}
        assert sim.log.peak_concurrency(kind="sub") == n
