"""A fan-out's prompts hold their common prefix once: found on the control channel's bytes
(`shared_prefix_bytes`), kept as `SharedPrefixPrompts`, carried in the sub-calls' requests
as `PrefixedMessage`s. To every reader a prompt is the same text as before, and the server
receives the same bytes; end to end, a counting run over real HTTP sends byte-identical
sub-call bodies with sharing on and off."""

from __future__ import annotations

import dataclasses
import pickle
import random
from collections.abc import Callable, Sequence

import anyio
import anyio.lowlevel
import orjson
import pytest
from conftest import sandbox_config

from rlm_async._cache import CacheSettings, shared_prefix
from rlm_async._config import ModelConfig
from rlm_async._governor._estimate import CharsPerTokenEstimator, Utf8BytesEstimator
from rlm_async._journal.keys import request_key
from rlm_async._prompt_batch import (
    MIN_SHARED_BYTES,
    SharedPrefixPrompts,
    common_prefix_len,
    prompt_chars,
    shared_prefix_bytes,
)
from rlm_async._prompts import sub_system_prompt
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async._types import Completion, Message, ModelRequest, PrefixedMessage
from rlm_async.demo import demo_config
from rlm_async.sandbox import _protocol
from rlm_async.sandbox._channel import ProtocolViolation
from rlm_async.sandbox._protocol import parse_request
from rlm_async.sim import KindLatency, LatencyModel, Policies, PolicySpec, SimConfig, SimProcess
from rlm_async.transport import OpenAITransport, Transport, encode_body
from rlm_async.workloads import oolong_counting

INSTRUCTIONS = "Count the records below whose label is 'abbreviation'. Answer with a number.\n" * 5


def _frame(prompts: list[str]) -> tuple[dict[str, object], bytearray, list[int]]:
    """A batch request frame of `prompts`, its blob and its lengths."""
    return _frame_bytes([p.encode() for p in prompts])


def _frame_bytes(parts: list[bytes]) -> tuple[dict[str, object], bytearray, list[int]]:
    """A batch request frame of prompts given as bytes (valid UTF-8 or not)."""
    lengths = [len(b) for b in parts]
    msg = {"op": "request", "id": 1, "kind": "llm_batch", "model": None, "lengths": lengths}
    return msg, bytearray(b"".join(parts)), lengths


def _char_by_char_prefix(texts: list[str]) -> str:
    """The longest common start of `texts`, the slow way (the oracle)."""
    lo, hi = min(texts), max(texts)
    end = next((i for i, (a, b) in enumerate(zip(lo, hi, strict=False)) if a != b), min(len(lo), len(hi)))
    return lo[:end]


def _parse(prompts: list[str]) -> Sequence[str]:
    msg, blob, _ = _frame(prompts)
    return parse_request(msg, blob)[1].prompts


class TestSharedPrefixBytes:
    def test_the_prefix_every_prompt_starts_with(self) -> None:
        """Instructions before each chunk: their bytes, found on the blob."""
        prompts = [f"{INSTRUCTIONS}chunk {i}: ..." for i in range(50)]
        _, blob, lengths = _frame(prompts)
        assert shared_prefix_bytes(blob, lengths) == len((INSTRUCTIONS + "chunk ").encode())

    def test_a_cut_inside_a_character_moves_back_to_its_start(self) -> None:
        """'é' and 'è' share their first UTF-8 byte: the prefix stops before the character."""
        head = "x" * 300
        _, blob, lengths = _frame([head + "é", head + "è"])
        assert shared_prefix_bytes(blob, lengths) == 300

    @pytest.mark.parametrize(
        "prompts",
        [
            pytest.param(["x" * 1000], id="one-prompt"),
            pytest.param(["x" * (MIN_SHARED_BYTES - 1), "x" * 1000], id="a-prompt-too-short"),
            pytest.param(["a" + "x" * 1000, "b" + "x" * 1000], id="differ-at-once"),
            pytest.param([INSTRUCTIONS] * 5 + ["y" + INSTRUCTIONS], id="the-last-differs"),
        ],
    )
    def test_nothing_shared_below_the_minimum(self, prompts: list[str]) -> None:
        _, blob, lengths = _frame(prompts)
        assert shared_prefix_bytes(blob, lengths) == 0

    def test_random_batches_decode_to_their_prompts_with_the_longest_prefix(self) -> None:
        """Seeded batches of mixed-width text: the prompts come back exactly, and where the
        common prefix (by characters) is at least the minimum in bytes, it is held once."""
        rng = random.Random(11)
        alphabet = "ab é€𝄞\n"
        shared_seen = 0
        for _ in range(300):
            head = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 400)))
            prompts = [
                head + "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
                for _ in range(rng.randrange(1, 8))
            ]
            got = _parse(list(prompts))
            assert list(got) == prompts
            common = _char_by_char_prefix(prompts) if len(prompts) > 1 else ""
            if len(common.encode()) >= MIN_SHARED_BYTES + 3:  # + a character's width: no cut at the edge
                assert isinstance(got, SharedPrefixPrompts) and got.prefix == common
                shared_seen += 1
            elif len(common.encode()) < MIN_SHARED_BYTES:
                assert isinstance(got, tuple)
        assert shared_seen > 50


class TestParsing:
    def test_a_shared_prefix_is_decoded_once(self) -> None:
        """The request's prompts: one prefix object, each rest without it."""
        prompts = [f"{INSTRUCTIONS}chunk {i}" for i in range(20)]
        got = _parse(prompts)
        assert isinstance(got, SharedPrefixPrompts)
        assert got.prefix == INSTRUCTIONS + "chunk " and got.rests == tuple(str(i) for i in range(20))
        assert got == tuple(prompts) and list(got) == prompts

    def test_a_bad_byte_after_the_prefix_names_its_prompt_and_offset(self) -> None:
        """Offsets count from the prompt's start, prefix included."""
        msg, blob, _ = _frame_bytes([INSTRUCTIONS.encode() + b"ok", INSTRUCTIONS.encode() + b"a\xff"])
        with pytest.raises(
            ProtocolViolation,
            match=rf"request prompt 1 is not valid UTF-8 .* at byte {len(INSTRUCTIONS) + 1}",
        ):
            parse_request(msg, blob)

    def test_a_bad_byte_in_the_prefix_is_refused(self) -> None:
        bad = b"\xff" + INSTRUCTIONS.encode()
        msg, blob, _ = _frame_bytes([bad + b"1", bad + b"2"])
        with pytest.raises(ProtocolViolation, match=r"request prompt 0 is not valid UTF-8 .* at byte 0"):
            parse_request(msg, blob)


class TestSharedPrefixPrompts:
    def test_a_sequence_of_the_whole_prompts(self) -> None:
        prompts = SharedPrefixPrompts("head-", ("a", "bb", "ccc"))
        assert len(prompts) == 3 and prompts[1] == "head-bb" and prompts[-1] == "head-ccc"
        assert list(prompts) == ["head-a", "head-bb", "head-ccc"] and "head-a" in prompts
        assert prompts == ("head-a", "head-bb", "head-ccc") and prompts != ("head-a",)
        assert prompt_chars(prompts) == sum(map(len, prompts)) == 21

    def test_a_slice_keeps_the_prefix_shared(self) -> None:
        prompts = SharedPrefixPrompts("head-", ("a", "bb", "ccc"))
        part = prompts[:2]
        assert isinstance(part, SharedPrefixPrompts) and part.prefix is prompts.prefix
        assert list(part) == ["head-a", "head-bb"]

    def test_common_prefix_len(self) -> None:
        assert common_prefix_len("abcd", "abxy") == 2
        assert common_prefix_len("", "abc") == 0 and common_prefix_len("abc", "abc") == 3


class TestPrefixedMessage:
    def pair(self) -> tuple[PrefixedMessage, Message]:
        return PrefixedMessage("user", INSTRUCTIONS + "é€", "chunk 7"), Message(
            "user", INSTRUCTIONS + "é€chunk 7"
        )

    def test_it_reads_compares_and_pickles_as_a_message(self) -> None:
        prefixed, plain = self.pair()
        assert prefixed.content == plain.content and prefixed.chars() == plain.chars()
        cut = len(prefixed.prefix)
        for n in (0, 1, cut - 1, cut, cut + 3, cut + 100):
            assert prefixed.head(n) == plain.head(n) == plain.content[:n]
        assert prefixed == plain and plain == prefixed and hash(prefixed) == hash(plain)
        assert prefixed != Message("assistant", plain.content) and prefixed.to_dict() == plain.to_dict()
        back = pickle.loads(pickle.dumps(prefixed))
        assert type(back) is Message and back == plain
        assert repr(prefixed) == repr(plain).replace("Message", "PrefixedMessage", 1)

    def test_a_request_with_it_is_the_same_request(self) -> None:
        """On the wire, in the journal, to the budget and rate estimators: no difference."""
        prefixed, plain = self.pair()
        system = Message("system", "You answer sub-questions.")
        a = ModelRequest(model="m", messages=(system, prefixed), max_tokens=10, temperature=0.0)
        b = ModelRequest(model="m", messages=(system, plain), max_tokens=10, temperature=0.0)
        assert a == b and hash(a) == hash(b)
        assert encode_body(a) == encode_body(b)
        assert request_key(a) == request_key(b)
        assert a.prompt_chars() == b.prompt_chars()
        for estimator in (Utf8BytesEstimator(), CharsPerTokenEstimator(chars_per_token=3.0)):
            assert estimator.prompt_tokens(a) == estimator.prompt_tokens(b)

    def test_the_planner_finds_the_same_prefix_without_joining(self) -> None:
        """`shared_prefix` over requests whose messages share a prefix object: the same
        figure as over the whole texts."""
        head = INSTRUCTIONS + "chunk "
        rests = [f"{i}: records" for i in range(30)]
        system = Message("system", "sys")
        prefixed = [
            ModelRequest(model="m", messages=(system, PrefixedMessage("user", head, r))) for r in rests
        ]
        plain = [ModelRequest(model="m", messages=(system, Message("user", head + r))) for r in rests]
        assert shared_prefix(prefixed) == shared_prefix(plain)
        same = [ModelRequest(model="m", messages=(system, PrefixedMessage("user", head, "x"))) for _ in rests]
        assert shared_prefix(same) == shared_prefix(
            [ModelRequest(model="m", messages=(system, Message("user", head + "x")))] * 2
        )


# ============================================================================ end to end


class _Capturing(Transport):
    """The real HTTP transport, noting each sub-call's user message as it is sent."""

    def __init__(self, inner: Transport, seen: list[Message]) -> None:
        self.inner, self.endpoint, self.seen = inner, inner.endpoint, seen

    async def complete(self, request: ModelRequest) -> Completion:
        if request.messages[0].content == sub_system_prompt():
            self.seen.append(request.messages[-1])
        await anyio.lowlevel.checkpoint()
        return await self.inner.complete(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _count_run(seen: list[Message]) -> tuple[RLMResult, list[str]]:
    """A 40-chunk counting run on the demo's configuration: the result, and the SHA-256 of
    every sub-call body the server received, sorted."""
    workload = oolong_counting("100k", seed=5)
    sim = SimConfig(
        latency=LatencyModel(root=KindLatency(ttft_s=0.01), sub=KindLatency(ttft_s=0.05)),
        policies=Policies(root=PolicySpec(name="rlm", options={"chunks": 40})),
    )
    transport: Callable[[ModelConfig], Transport] = lambda model: _Capturing(  # noqa: E731
        OpenAITransport(model.base_url, api_key_env=None), seen
    )
    with SimProcess(sim) as server:
        assert server.base_url is not None
        config = demo_config(server.base_url)
        cache = CacheSettings(warm=False)  # every body the same in both runs: no warm-up order
        config = dataclasses.replace(
            config,
            sub=dataclasses.replace(config.sub, cache=cache) if config.sub else None,
            sandbox=sandbox_config(),
        )

        async def go() -> RLMResult:
            async with RLM(config=config, transport=transport) as rlm:
                return await rlm.acompletion(workload.context, workload.query)

        result = anyio.run(go)
    entries = server.read_log().entries
    assert result.status == "ok" and workload.score(result.response), (result.response, workload.truth)
    return result, sorted(str(e.body_sha256) for e in entries if e.kind == "sub")


@pytest.mark.e2e
class TestEndToEnd:
    def test_the_server_receives_the_same_bodies_with_sharing_on_and_off(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Over real HTTP, the demo's counting fan-out: with sharing, every sub-call's prompt
        is a `PrefixedMessage` on one prefix object; without it, plain messages; the answers
        and the 40 sub-call bodies the server hashed are the same."""
        shared: list[Message] = []
        on, on_bodies = _count_run(shared)
        assert len(shared) == 40 and all(isinstance(m, PrefixedMessage) for m in shared)
        assert len({id(m.prefix) for m in shared if isinstance(m, PrefixedMessage)}) == 1
        monkeypatch.setattr(_protocol, "shared_prefix_bytes", lambda blob, lengths: 0)
        plain: list[Message] = []
        off, off_bodies = _count_run(plain)
        assert len(plain) == 40 and not any(isinstance(m, PrefixedMessage) for m in plain)
        assert on.response == off.response and len(on_bodies) == 40 and on_bodies == off_bodies
        assert orjson.dumps(sorted(m.content for m in shared)) == orjson.dumps(
            sorted(m.content for m in plain)
        )
