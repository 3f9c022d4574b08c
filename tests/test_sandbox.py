"""The REPL worker's normal behaviour: loading contexts, cells, sub-calls, answers,
variables, restarts, limits and configuration. Isolation tiers: test_sandbox_tiers.py."""

from __future__ import annotations

import hashlib
import json
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from test_sandbox_support import (
    DEFAULT_ISOLATION,
    SYSTEM_PYTHON,
    Recorder,
    assert_nothing_left,
    config,
    needs_bwrap,
    needs_system_python,
    open_worker,
)

from rlm_async import _events
from rlm_async.exceptions import (
    BudgetExceeded,
    ConfigError,
    ContextTypeError,
    IsolationUnavailable,
    SandboxError,
)
from rlm_async.sandbox import SandboxConfig, WorkerRequest, start_worker
from rlm_async.sandbox import _bootstrap as bootstrap
from rlm_async.sandbox import _launch as launch
from rlm_async.sandbox._bootstrap import HEADER
from rlm_async.sandbox._channel import Channel, ChannelClosed, ProtocolViolation
from rlm_async.sandbox._protocol import parse_request as _parse_request

pytestmark = pytest.mark.anyio


async def no_requests(request: WorkerRequest) -> list[str]:
    raise AssertionError(f"unexpected sub-call {request}")


class TestContextLoading:
    @pytest.mark.parametrize(
        ("context", "code", "expected"),
        [
            (
                "plain text",
                "print(type(context).__name__, len(context), context_0 is context)",
                "str 10 True",
            ),
            ("héllo wörld ✓ 𝄞", "print(len(context), context[-1] == '\\U0001d11e')", "15 True"),
            (
                ["a", "bb", "ccc"],
                "print(type(context).__name__, [len(x) for x in context])",
                "list [1, 2, 3]",
            ),
            (
                {"k": [1, 2], "z": None},
                "print(type(context).__name__, sorted(context), context['k'])",
                "dict ['k', 'z'] [1, 2]",
            ),
            ("", "print(repr(context))", "''"),
        ],
    )
    async def test_each_context_type_loads(self, context: object, code: str, expected: str) -> None:
        """A str, list or dict context arrives as the same value in `context` and `context_0`."""
        async with open_worker(context) as worker:
            result = await worker.run_cell(code, no_requests)
        assert result.status == "ok", result
        assert result.stdout.strip() == expected

    async def test_lone_surrogates_in_a_str_context_survive(self) -> None:
        """A str that is not valid UTF-8 (a lone surrogate) loads without error."""
        async with open_worker("a\ud800b") as worker:
            result = await worker.run_cell("print(len(context), hex(ord(context[1])))", no_requests)
        assert result.stdout.strip() == "3 0xd800"

    @pytest.mark.parametrize("bad", [42, {1, 2}, b"bytes", None])
    async def test_unsupported_context_is_refused(self, bad: object) -> None:
        """A context of another type raises ContextTypeError before any process starts."""
        with pytest.raises(ContextTypeError):
            await start_worker(bad, config())  # type: ignore[arg-type]

    async def test_non_json_list_is_refused(self) -> None:
        """A list holding something JSON cannot carry is a ContextTypeError."""
        with pytest.raises(ContextTypeError):
            await start_worker([object()], config())  # type: ignore[list-item]

    async def test_non_ascii_context_arrives_exact_across_send_slices(self) -> None:
        """A str context goes to the worker encoded a slice (1 MiB of characters) at a
        time: multi-byte characters, a lone surrogate and an astral character straddling
        the slice boundaries arrive as the same str (its UTF-8 digest and length match)."""
        piece = "é€\ud800😀x" * 70_000  # 350,000 characters, several UTF-8 widths
        context = piece * 7  # 2.45 M characters: slice boundaries fall inside the pattern
        expected = hashlib.sha256(context.encode("utf-8", "surrogatepass")).hexdigest()
        async with open_worker(context) as worker:
            result = await worker.run_cell(
                "import hashlib\n"
                "print(len(context), hashlib.sha256(context.encode('utf-8', 'surrogatepass')).hexdigest())",
                no_requests,
            )
        assert result.stdout.split() == [str(len(context)), expected]

    async def test_40_mb_context_loads(self) -> None:
        """A 40 MB str context loads whole (the time is printed, not asserted)."""
        context = ("lorem ipsum dolor sit amet, " * 1_500_000)[:40_000_000]
        started = time.monotonic()
        async with open_worker(context) as worker:
            loaded = time.monotonic() - started
            result = await worker.run_cell("print(len(context), context[-10:])", no_requests)
        print(f"40 MB context: worker started and loaded in {loaded:.3f} s")
        assert result.stdout.split()[0] == "40000000"

    async def test_context_larger_than_memory_limit_fails_clearly(self) -> None:
        """A context that cannot fit in memory_bytes is a SandboxError naming the limit."""
        with pytest.raises(SandboxError, match="memory_bytes"):
            await start_worker("x" * 150_000_000, config(memory_bytes=128 * 2**20))


class TestCells:
    async def test_variables_persist_between_cells(self) -> None:
        """A variable assigned in one cell is there in the next."""
        async with open_worker() as worker:
            await worker.run_cell("x = 21", no_requests)
            result = await worker.run_cell("print(x * 2)", no_requests)
        assert result.stdout == "42\n"

    async def test_last_expression_is_echoed(self) -> None:
        """Like the interactive interpreter, a final bare expression's repr is printed."""
        async with open_worker("abc") as worker:
            result = await worker.run_cell("n = len(context)\nn * 2", no_requests)
            silent = await worker.run_cell("None", no_requests)
        assert result.stdout == "6\n"
        assert silent.stdout == ""

    async def test_exception_gives_short_traceback_without_bootstrap_frames(self) -> None:
        """An exception in the code is status "error" with the end of the traceback; the worker lives."""
        async with open_worker() as worker:
            result = await worker.run_cell("def f():\n    raise ValueError('boom')\nf()", no_requests)
            after = await worker.run_cell("print('alive')", no_requests)
        assert result.status == "error" and not result.worker_dead
        assert result.error is not None
        assert "ValueError: boom" in result.error and "<cell-1>" in result.error
        assert "bootstrap" not in result.error
        assert after.stdout == "alive\n"

    async def test_syntax_error_is_an_error(self) -> None:
        """Code that does not parse is status "error" with the SyntaxError."""
        async with open_worker() as worker:
            result = await worker.run_cell("def (:", no_requests)
        assert result.status == "error"
        assert result.error is not None and "SyntaxError" in result.error

    async def test_system_exit_does_not_end_the_worker(self) -> None:
        """`raise SystemExit` is reported as an error; the worker keeps running."""
        async with open_worker() as worker:
            result = await worker.run_cell("import sys; sys.exit(3)", no_requests)
            after = await worker.run_cell("print(1)", no_requests)
        assert result.status == "error" and "SystemExit" in (result.error or "")
        assert after.status == "ok"

    async def test_stderr_and_raw_fd_writes_are_captured(self) -> None:
        """print to stderr and os.write on fds 1 and 2 land in the cell's stdout/stderr."""
        code = textwrap.dedent(
            """
            import os, sys
            print('py-out')
            print('py-err', file=sys.stderr)
            os.write(1, b'fd-out\\n')
            os.write(2, b'fd-err\\n')
            """
        )
        async with open_worker() as worker:
            result = await worker.run_cell(code, no_requests)
        assert "py-out" in result.stdout and "fd-out" in result.stdout
        assert "py-err" in result.stderr and "fd-err" in result.stderr

    async def test_output_limit_truncates_and_counts(self) -> None:
        """Output past output_limit_bytes is dropped and counted; status says so."""
        async with open_worker(output_limit_bytes=1000) as worker:
            result = await worker.run_cell("print('x' * 5000)", no_requests)
        assert result.status == "output_limit"
        assert len(result.stdout) == 1000
        assert result.dropped_output_bytes == 4001

    async def test_output_is_per_cell(self) -> None:
        """Each cell's result holds only what that cell printed."""
        async with open_worker() as worker:
            first = await worker.run_cell("print('one')", no_requests)
            second = await worker.run_cell("print('two')", no_requests)
        assert (first.stdout, second.stdout) == ("one\n", "two\n")


class TestAnswers:
    async def test_answer_ready_gives_final_answer(self) -> None:
        """answer["ready"] = True makes str(answer["content"]) the final answer."""
        async with open_worker() as worker:
            not_yet = await worker.run_cell("answer['content'] = 'draft'", no_requests)
            done = await worker.run_cell("answer['content'] = [1, 2]\nanswer['ready'] = True", no_requests)
        assert not_yet.final_answer is None
        assert done.final_answer == "[1, 2]"

    async def test_truthy_but_not_true_ready_is_not_final(self) -> None:
        """Only `ready is True` counts, so a model's typo does not end the run."""
        async with open_worker() as worker:
            result = await worker.run_cell("answer['content'] = 'x'; answer['ready'] = 'yes'", no_requests)
        assert result.final_answer is None

    async def test_get_variable_and_final_var(self) -> None:
        """get_variable returns str(value); FINAL_VAR in the REPL returns the same; undefined is None."""
        async with open_worker() as worker:
            result = await worker.run_cell("result = {'a': 1}\nprint(FINAL_VAR('result'))", no_requests)
            assert result.stdout.strip() == "{'a': 1}"
            assert await worker.get_variable("result") == "{'a': 1}"
            assert await worker.get_variable("missing") is None
            assert await worker.get_variable("not an identifier") is None
            missing = await worker.run_cell("print(FINAL_VAR('nope'))", no_requests)
            assert "not defined" in missing.stdout

    async def test_get_variable_with_raising_str(self) -> None:
        """A value whose __str__ raises gives a description of the error, not an exception."""
        async with open_worker() as worker:
            await worker.run_cell(
                "class B:\n    def __str__(self):\n        raise RuntimeError('no')\nb = B()", no_requests
            )
            value = await worker.get_variable("b")
            assert worker.alive
        assert value is not None and "RuntimeError" in value

    async def test_get_variable_with_hanging_str_kills_the_worker(self) -> None:
        """A __str__ that never returns is bounded by cell_timeout_s; the worker is killed."""
        async with open_worker(cell_timeout_s=1.0) as worker:
            await worker.run_cell(
                "class H:\n    def __str__(self):\n        while True: pass\nh = H()", no_requests
            )
            assert await worker.get_variable("h") is None
            assert not worker.alive
            result = await worker.run_cell("print(1)", no_requests)
            assert result.status == "crashed" and result.worker_dead
            await worker.restart()
            assert (await worker.run_cell("print(1)", no_requests)).stdout == "1\n"

    async def test_show_vars_lists_user_variables(self) -> None:
        """SHOW_VARS names the code's variables, not the helpers."""
        async with open_worker("ctx") as worker:
            result = await worker.run_cell("chunks = [1, 2]\ncount = 3\nprint(SHOW_VARS())", no_requests)
        assert "chunks: list, len 2" in result.stdout and "count: int" in result.stdout
        assert "llm_query" not in result.stdout and "context" not in result.stdout


class TestSubCalls:
    async def test_llm_query_and_batch_results_in_order(self) -> None:
        """llm_query returns one reply; llm_batch returns replies in prompt order."""
        recorder = Recorder()
        code = textwrap.dedent(
            """
            print(llm_query('q'))
            print(llm_batch([f'p{i}' for i in range(50)]))
            print(llm_query_batched(['z']))
            """
        )
        async with open_worker() as worker:
            result = await worker.run_cell(code, recorder)
        lines = result.stdout.splitlines()
        assert lines[0] == "echo:q"
        assert json.loads(lines[1].replace("'", '"')) == [f"echo:p{i}" for i in range(50)]
        assert lines[2] == "['echo:z']"
        assert [r.op for r in recorder.requests] == ["llm_query", "llm_batch", "llm_batch"]

    async def test_rlm_ops_and_model_are_passed(self) -> None:
        """rlm_query/rlm_query_batched send their own ops; model= is forwarded."""
        recorder = Recorder()
        async with open_worker() as worker:
            await worker.run_cell("rlm_query('a', model='m1'); rlm_query_batched(['b', 'c'])", recorder)
        assert [(r.op, r.prompts, r.model) for r in recorder.requests] == [
            ("rlm_query", ("a",), "m1"),
            ("rlm_batch", ("b", "c"), None),
        ]

    async def test_wrong_argument_types_raise_in_the_repl(self) -> None:
        """Bad arguments are a TypeError in the code, never a request."""
        recorder = Recorder()
        async with open_worker() as worker:
            r1 = await worker.run_cell("llm_query(42)", recorder)
            r2 = await worker.run_cell("llm_batch('not a list')", recorder)
            r3 = await worker.run_cell("llm_batch(['a', 1])", recorder)
        assert all(r.status == "error" and "TypeError" in (r.error or "") for r in (r1, r2, r3))
        assert recorder.requests == []

    async def test_budget_exceeded_is_raised_inside_and_catchable(self) -> None:
        """on_request raising BudgetExceeded becomes the REPL's own BudgetExceeded."""

        async def refuse(request: WorkerRequest) -> list[str]:
            raise BudgetExceeded("cost_usd", 1.0, 0.9, 0.2)

        code = (
            "try:\n    llm_query('x')\nexcept BudgetExceeded as e:\n    print('caught:', e)\nllm_query('y')"
        )
        async with open_worker() as worker:
            result = await worker.run_cell(code, refuse)
        assert "caught: budget exceeded: cost_usd cap is 1" in result.stdout
        assert result.status == "error" and "BudgetExceeded" in (result.error or "")

    async def test_calls_from_threads_are_concurrent_and_matched(self) -> None:
        """llm_query from many threads: requests are served concurrently, each gets its own reply."""
        recorder = Recorder()
        recorder.delay = 0.2
        code = (
            "from concurrent.futures import ThreadPoolExecutor\n"
            "with ThreadPoolExecutor(8) as ex:\n"
            "    out = list(ex.map(llm_query, [f'p{i}' for i in range(16)]))\n"
            "print(out == [f'echo:p{i}' for i in range(16)])"
        )
        async with open_worker() as worker:
            result = await worker.run_cell(code, recorder)
        assert result.stdout == "True\n", result
        assert recorder.max_in_flight > 1

    async def test_time_in_sub_calls_does_not_count_against_the_deadline(self) -> None:
        """A cell whose sub-calls take longer than cell_timeout_s in total still finishes ok."""
        recorder = Recorder()
        recorder.delay = 1.2
        async with open_worker(cell_timeout_s=1.0) as worker:
            result = await worker.run_cell(
                "for i in range(2):\n    llm_query(str(i))\nprint('done')", recorder
            )
        assert result.status == "ok" and result.stdout == "done\n"

    async def test_on_request_error_propagates_and_kills(self) -> None:
        """Any other exception from on_request is the engine's: it propagates and the worker dies."""

        async def broken(request: WorkerRequest) -> list[str]:
            raise KeyError("engine bug")

        async with open_worker() as worker:
            with pytest.raises(KeyError):
                await worker.run_cell("llm_query('x')", broken)
            assert not worker.alive

    async def test_on_request_wrong_result_count_is_a_sandbox_error(self) -> None:
        """on_request must return one str per prompt."""

        async def short(request: WorkerRequest) -> list[str]:
            return []

        async with open_worker() as worker:
            with pytest.raises(SandboxError, match="one per prompt"):
                await worker.run_cell("llm_batch(['a', 'b'])", short)

    async def test_llm_query_outside_a_cell_is_refused(self) -> None:
        """A thread still calling llm_query after its cell ended gets an error, not a hang."""
        recorder = Recorder()
        code = (
            "import threading, time\nbox = []\n"
            "def late():\n    time.sleep(0.3)\n"
            "    try:\n        llm_query('late')\n"
            "    except Exception as e:\n        box.append(type(e).__name__)\n"
            "t = threading.Thread(target=late); t.start()"
        )
        async with open_worker() as worker:
            await worker.run_cell(code, recorder)
            await anyio.sleep(2.0)  # the thread calls while no cell runs (margin for a loaded CI)
            result = await worker.run_cell("t.join(); print(box)", recorder)
        assert result.stdout == "['RuntimeError']\n"
        assert all("late" not in r.prompts for r in recorder.requests)

    async def test_sub_call_outliving_its_cell_is_abandoned(self) -> None:
        """A thread still waiting on a sub-call when its cell ends is told so, not left hanging."""
        recorder = Recorder()
        recorder.delay = 3.0
        code = textwrap.dedent(
            """
            import threading, time
            box = []
            asking = threading.Event()
            def ask():
                asking.set()
                try:
                    box.append(llm_query('slow'))
                except RuntimeError as e:
                    box.append(str(e))
            t = threading.Thread(target=ask)
            t.start()
            asking.wait()
            time.sleep(0.5)  # the request is on its way; the cell ends before its reply
            """
        )
        async with open_worker() as worker:
            first = await worker.run_cell(code, recorder)
            second = await worker.run_cell("t.join(5)\nprint(box)", recorder)
        assert first.status == "ok"
        assert "the cell finished before this sub-call was answered" in second.stdout

    async def test_cancelling_run_cell_kills_the_worker(self) -> None:
        """Cancelling run_cell from outside kills the worker, and nothing is left."""
        recorder = Recorder()
        recorder.delay = 10
        async with open_worker() as worker:
            with anyio.move_on_after(0.5):
                await worker.run_cell("llm_query('slow')", recorder)
            assert not worker.alive
            pid, uid = worker.pid, worker.uid
            await assert_nothing_left(pid, uid)


def _request(kind: str = "llm_batch", **fields: object) -> dict[str, object]:
    return {"op": "request", "id": 7, "kind": kind, "model": None, **fields}


class TestRequestParsing:
    def test_blob_is_cut_at_lengths_and_decoded(self) -> None:
        """A blob request becomes its prompts, cut at byte lengths, multi-byte text and empty prompts included."""
        prompts = ["héllo", "", "𝄞 x\n", "plain"]
        parts = [p.encode() for p in prompts]
        rid, request = _parse_request(_request(lengths=[len(b) for b in parts]), bytearray(b"".join(parts)))
        assert (rid, request.op, request.prompts, request.model) == (7, "llm_batch", tuple(prompts), None)

    def test_the_blob_is_consumed_as_it_is_cut(self) -> None:
        """The blob is emptied as its prompts are decoded (its memory handed back as it
        shrinks, so a 60 MB batch is not held twice), and the prompts come out in order."""
        prompts = [f"{i}:" + "é" * (i % 7) + "x" * (1000 * (i % 3)) for i in range(300)]
        parts = [p.encode() for p in prompts]
        blob = bytearray(b"".join(parts))
        request = _parse_request(_request(lengths=[len(b) for b in parts]), blob)[1]
        assert request.prompts == tuple(prompts)
        assert len(blob) == 0

    def test_a_bad_prompt_names_its_index(self) -> None:
        """A prompt that is not UTF-8 is named by its index in the batch."""
        parts = [b"ok", b"a\xff", b"fine"]
        with pytest.raises(ProtocolViolation, match="request prompt 1 is not valid UTF-8"):
            _parse_request(_request(lengths=[len(b) for b in parts]), bytearray(b"".join(parts)))

    def test_an_empty_batch_has_no_blob(self) -> None:
        """lengths [] with an empty blob is a batch of no prompts."""
        assert _parse_request(_request(lengths=[]), bytearray())[1].prompts == ()

    @pytest.mark.parametrize(
        ("lengths", "blob", "match"),
        [
            pytest.param([2, 2], b"abc", "add up to 4 bytes but the blob has 3", id="sum-over"),
            pytest.param([1], b"abc", "add up to 1 bytes but the blob has 3", id="sum-under"),
            pytest.param([-1, 4], b"abc", "must not be negative", id="negative"),
            pytest.param([True, 2], b"abc", "list of integers", id="bool"),
            pytest.param([1.0, 2], b"abc", "list of integers", id="float"),
            pytest.param(["3"], b"abc", "list of integers", id="str"),
            pytest.param({"a": 3}, b"abc", "list of integers", id="not-a-list"),
            pytest.param(None, b"", "list of integers", id="null"),
        ],
    )
    def test_bad_lengths_are_a_protocol_violation(self, lengths: object, blob: bytes, match: str) -> None:
        """lengths must be non-negative integers adding up to exactly the blob's size."""
        with pytest.raises(ProtocolViolation, match=match):
            _parse_request(_request(lengths=lengths), bytearray(blob))

    @pytest.mark.parametrize("kind", ["llm_query", "rlm_query"])
    @pytest.mark.parametrize("lengths", [[], [1, 1]])
    def test_single_prompt_kinds_carry_exactly_one(self, kind: str, lengths: list[int]) -> None:
        """llm_query and rlm_query frames with zero or two lengths are refused."""
        with pytest.raises(ProtocolViolation, match="exactly one prompt"):
            _parse_request(_request(kind, lengths=lengths), bytearray(b"x" * sum(lengths)))

    @pytest.mark.parametrize(
        ("lengths", "blob"),
        [
            pytest.param([2], b"a\xff", id="invalid-byte"),
            pytest.param([3], b"\xed\xa0\x80", id="encoded-lone-surrogate"),
            pytest.param([1, 1], "é".encode(), id="cut-inside-a-character"),
            pytest.param([4], b"\xf4\x90\x80\x80", id="beyond-u10ffff"),
        ],
    )
    def test_prompts_that_are_not_utf8_are_refused(self, lengths: list[int], blob: bytes) -> None:
        """Each slice is decoded strictly: no lone surrogate or invalid byte reaches the engine."""
        with pytest.raises(ProtocolViolation, match="not valid UTF-8"):
            _parse_request(_request(lengths=lengths), bytearray(blob))

    def test_prompts_and_lengths_together_are_refused(self) -> None:
        """A frame naming both forms of prompts is ambiguous."""
        with pytest.raises(ProtocolViolation, match="not both"):
            _parse_request(_request(lengths=[1], prompts=["x"]), bytearray(b"x"))

    def test_a_blob_needs_lengths(self) -> None:
        """A request with JSON prompts may not also carry a blob."""
        with pytest.raises(ProtocolViolation, match="lengths"):
            _parse_request(_request(prompts=["x"]), bytearray(b"x"))

    def test_json_prompts_still_have_surrogates_cleaned(self) -> None:
        """The JSON-list form (hand-made frames) keeps _clean: a lone surrogate becomes '?'."""
        request = _parse_request(_request(prompts=["a\ud800b"], model="m\udcff"), bytearray())[1]
        assert (request.prompts, request.model) == (("a?b",), "m?")


class TestWorkerRequestEncoding:
    def test_prompts_become_utf8_with_lone_surrogates_as_question_marks(self) -> None:
        """Each prompt is one UTF-8 piece; a lone surrogate becomes '?', as encode_frame makes it in JSON."""
        assert bootstrap.encode_prompts(["a\ud800b", "é𝄞", ""]) == [b"a?b", "é𝄞".encode(), b""]

    @pytest.mark.parametrize("size", [5000, 50_000])
    def test_parts_arrive_whole_and_in_order(self, size: int) -> None:
        """_send_parts delivers the head and every piece in order, joined (mostly tiny pieces)
        or gathered over many short sendmsg calls (big ones)."""
        parts = [bytes([i % 256]) * (i * 37 % size) for i in range(2000)]
        expected = b"HEAD" + b"".join(parts)
        got = bytearray()
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        def read() -> None:
            while len(got) < len(expected) and (data := b.recv(1 << 16)):
                got.extend(data)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            bootstrap._send_parts(a, b"HEAD", parts)
        finally:
            reader.join(10)
            a.close()
            b.close()
        assert got == expected


@contextmanager
def channel_pair(max_inbound: int) -> Iterator[tuple[Channel, socket.socket]]:
    """An engine-side Channel and the raw socket a test writes forged frames into."""
    a, b = socket.socketpair()
    channel = Channel(a, max_inbound=max_inbound)
    try:
        yield channel, b
    finally:
        channel.close()
        b.close()


def frame(obj: dict[str, object], blob: bytes = b"", blob_len: int | None = None) -> bytes:
    data = json.dumps(obj).encode()
    return HEADER.pack(len(data), len(blob) if blob_len is None else blob_len) + data + blob


class TestChannelReceive:
    async def test_request_blob_arrives_whole(self) -> None:
        """A request's blob, bigger than the socket buffer, comes back byte for byte with its JSON."""
        blob = bytes(range(256)) * 40_000  # 10 MB
        data = frame(_request(lengths=[len(blob)]), blob)
        with channel_pair(64 << 20) as (channel, peer):
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, lambda: peer.sendall(data))
                with anyio.fail_after(10):
                    obj, got = await channel.receive()
        assert obj["lengths"] == [len(blob)] and got == blob

    async def test_frames_without_a_blob_come_back_with_an_empty_one(self) -> None:
        """Back-to-back frames are read one at a time, each exactly."""
        with channel_pair(1 << 16) as (channel, peer):
            peer.sendall(frame({"op": "var", "found": False}) + frame({"op": "ready", "pid": 2}))
            with anyio.fail_after(5):
                assert await channel.receive() == ({"op": "var", "found": False}, bytearray())
                assert await channel.receive() == ({"op": "ready", "pid": 2}, bytearray())

    @pytest.mark.parametrize("op", ["done", "var", "ready", "reply"])
    async def test_a_blob_on_any_other_op_is_refused_before_it_is_read(self, op: str) -> None:
        """Only a request may carry a blob; the refusal comes from the header and JSON alone."""
        with channel_pair(1 << 20) as (channel, peer):
            peer.sendall(frame({"op": op}, blob_len=1000))  # the blob itself never comes
            with anyio.fail_after(5), pytest.raises(ProtocolViolation, match="only requests carry one"):
                await channel.receive()

    @pytest.mark.parametrize(("json_len", "blob_len"), [(70_000, 0), (10, 65_527), (2**32 - 1, 2**32 - 1)])
    async def test_an_oversized_frame_is_refused_from_its_header(self, json_len: int, blob_len: int) -> None:
        """JSON and blob together over max_inbound: refused before anything else is read or allocated."""
        with channel_pair(65_536) as (channel, peer):
            peer.sendall(HEADER.pack(json_len, blob_len))
            with (
                anyio.fail_after(5),
                pytest.raises(ProtocolViolation, match="over the limit of 65,536 bytes"),
            ):
                await channel.receive()

    async def test_a_receive_cancelled_mid_frame_closes_the_channel(self) -> None:
        """The rest of a half-read frame would be misread as a header: the channel refuses to go on."""
        with channel_pair(1 << 20) as (channel, peer):
            peer.sendall(frame({"op": "request"}, blob_len=100))
            with anyio.move_on_after(0.2):
                await channel.receive()
            with pytest.raises(ChannelClosed, match="stopped mid-frame"):
                await channel.receive()


_FORGE = """
import os, json, struct, socket, time
for fd in range(3, 64):
    try:
        if socket.socket(fileno=os.dup(fd)).type == socket.SOCK_STREAM:
            break
    except OSError:
        pass
body = json.dumps({fields}).encode()
os.write(fd, struct.pack('>II', len(body), len({blob!r})) + body + {blob!r})
time.sleep(30)
"""


class TestRequestBlobs:
    async def test_surrogates_in_prompts_arrive_as_question_marks(self) -> None:
        """Lone surrogates in prompts and model become '?' (as in the JSON frames); other text is exact."""
        recorder = Recorder()
        code = "print(llm_batch(['a\\ud800b', '\\udcff', 'é𝄞\\n', ''], model='m\\ud800'))"
        async with open_worker() as worker:
            result = await worker.run_cell(code, recorder)
        assert result.status == "ok", result
        assert [(r.prompts, r.model) for r in recorder.requests] == [(("a?b", "?", "é𝄞\n", ""), "m?")]

    async def test_a_big_batch_arrives_intact(self) -> None:
        """1,500 distinct multi-byte prompts (more than one sendmsg of 512 pieces) arrive whole and in order."""
        recorder = Recorder(reply="")
        code = "prompts = [f'{i} ' + 'ü€𝄞x' * (i % 700) for i in range(1500)]\nprint(llm_batch(prompts) == prompts)"
        async with open_worker() as worker:
            result = await worker.run_cell(code, recorder)
        assert result.stdout == "True\n", result
        assert recorder.requests[0].prompts == tuple(f"{i} " + "ü€𝄞x" * (i % 700) for i in range(1500))

    async def test_the_size_limit_counts_the_blob(self) -> None:
        """The limit counts the blob's UTF-8 bytes, not characters: 40 M characters of 'é' are
        80 MB, over max_message_bytes, a ValueError in the REPL; nothing is sent."""
        recorder = Recorder()
        code = "try:\n    llm_batch(['é' * 40_000] * 1000)\nexcept ValueError as e:\n    print('too big')"
        async with open_worker(max_message_bytes=64 * 2**20) as worker:
            result = await worker.run_cell(code, recorder)
        assert result.stdout == "too big\n"
        assert recorder.requests == []

    @pytest.mark.parametrize(
        ("fields", "blob", "match"),
        [
            pytest.param(
                {
                    "op": "done",
                    "cell": 1,
                    "status": "ok",
                    "error": None,
                    "final_answer": None,
                    "dropped": [0, 0],
                },
                b"hello",
                "only requests carry one",
                id="blob-on-done",
            ),
            pytest.param(_request(lengths=[3, 3]), b"hello", "add up to 6 bytes", id="lengths-mismatch"),
            pytest.param(_request(lengths=[-1, 6]), b"hello", "negative", id="negative-length"),
            pytest.param(_request(lengths=[5]), b"he\xffl\xed", "not valid UTF-8", id="invalid-utf8"),
            pytest.param(
                _request("llm_query", lengths=[2, 3]), b"hello", "exactly one", id="two-in-llm-query"
            ),
        ],
    )
    async def test_forged_blob_frames_kill_only_the_worker(
        self, fields: dict[str, object], blob: bytes, match: str
    ) -> None:
        """Bad blob frames written to the control socket end the cell as a protocol violation."""
        recorder = Recorder()
        async with open_worker() as worker:
            result = await worker.run_cell(_FORGE.format(fields=fields, blob=blob), recorder)
            assert result.status == "crashed" and result.worker_dead, result
            assert "protocol violation" in (result.error or "") and match in (result.error or "")
        assert recorder.requests == []


class TestForkedChildren:
    async def test_forked_child_does_not_report_as_the_worker(self) -> None:
        """A child forked by the code runs to the end of the cell and exits silently."""
        async with open_worker() as worker:
            result = await worker.run_cell(
                "import os\npid = os.fork()\nprint('parent' if pid else 'child')", no_requests
            )
            after = await worker.run_cell("print('next')", no_requests)
        assert result.status == "ok"
        assert sorted(result.stdout.split()) in (["child", "parent"], ["parent"])
        assert after.stdout.split()[-1] == "next" and after.status == "ok"

    async def test_multiprocessing_pool_works(self) -> None:
        """multiprocessing (fork start method) works inside the sandbox: /dev/shm is a small tmpfs."""
        if DEFAULT_ISOLATION == "landlock":
            pytest.skip("the landlock tier has no private /dev/shm (docs/security.md)")
        code = textwrap.dedent(
            """
            import multiprocessing as mp
            with mp.get_context('fork').Pool(2) as pool:
                print(pool.map(abs, [-1, -2, -3]))
            """
        )
        async with open_worker() as worker:
            result = await worker.run_cell(code, no_requests)
        assert result.stdout == "[1, 2, 3]\n", result


class TestRestartAndConcurrency:
    async def test_restart_reloads_context_and_drops_variables(self) -> None:
        """After restart the context is back and the old variables are gone."""
        async with open_worker("the context") as worker:
            await worker.run_cell("x = 1\ncontext = 'overwritten'", no_requests)
            old = (worker.pid, worker.uid)
            await worker.restart()
            await assert_nothing_left(*old)
            result = await worker.run_cell("print(context)\nprint('x' in globals())", no_requests)
        assert result.stdout == "the context\nFalse\n"

    async def test_concurrent_workers_do_not_mix_output(self) -> None:
        """Cells of several workers running at once each get only their own output and requests."""
        results: dict[int, str] = {}
        recorders = {i: Recorder(reply=f"w{i}:") for i in range(4)}

        async def one(i: int) -> None:
            async with open_worker(f"worker-{i}") as worker:
                code = "for k in range(200):\n    print(context, k, flush=True)\nprint(llm_query(context))"
                results[i] = (await worker.run_cell(code, recorders[i])).stdout

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(one, i)
        for i in range(4):
            lines = results[i].splitlines()
            assert lines[:-1] == [f"worker-{i} {k}" for k in range(200)]
            assert lines[-1] == f"w{i}:worker-{i}"

    async def test_aclose_is_idempotent_and_run_after_close_reports_dead(self) -> None:
        """aclose twice is fine; a cell on a closed worker says it is not running."""
        worker = await start_worker("", config())
        await worker.aclose()
        await worker.aclose()
        result = await worker.run_cell("print(1)", no_requests)
        assert result.status == "crashed" and result.worker_dead
        assert await worker.get_variable("context") is None
        await assert_nothing_left(worker.pid, worker.uid)

    async def test_aclose_during_a_running_cell(self) -> None:
        """aclose from another task ends a running cell as crashed and leaves nothing behind."""
        results = []
        async with open_worker() as worker:

            async def run() -> None:
                results.append(await worker.run_cell("import time\ntime.sleep(60)", no_requests))

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await anyio.sleep(0.5)
                await worker.aclose()
        assert results[0].status == "crashed" and results[0].worker_dead
        assert "closed" in (results[0].error or "")

    async def test_events_are_emitted(self) -> None:
        """Starting, running and killing a worker emit worker.start, worker.cell, worker.kill."""
        seen: list[str] = []
        with _events.sinks(lambda e: seen.append(e.kind)):
            async with open_worker() as worker:
                await worker.run_cell("pass", no_requests)
        assert seen == ["worker.start", "worker.cell", "worker.kill"]


class TestLimits:
    async def test_file_size_limit(self) -> None:
        """Writing a file past file_size_bytes raises OSError (EFBIG) in the code."""
        code = "try:\n    open('f', 'wb').write(b'x' * 2_000_000)\nexcept OSError as e:\n    print(e.errno)"
        async with open_worker(file_size_bytes=1_000_000) as worker:
            result = await worker.run_cell(code, no_requests)
        assert result.stdout.strip() == "27"

    async def test_open_files_limit(self) -> None:
        """Opening more than open_files descriptors raises OSError (EMFILE)."""
        code = textwrap.dedent(
            """
            fs = []
            try:
                for i in range(100):
                    fs.append(open('/dev/null'))
            except OSError as e:
                print(e.errno, len(fs) < 32)
            """
        )
        async with open_worker(open_files=32) as worker:
            result = await worker.run_cell(code, no_requests)
        assert result.stdout.strip() == "24 True"

    async def test_cpu_limit_kills(self) -> None:
        """A worker that spends cpu_seconds of CPU is killed with status cpu_limit."""
        async with open_worker(cpu_seconds=1) as worker:
            result = await worker.run_cell("while True: pass", no_requests)
        assert result.status == "cpu_limit" and result.worker_dead


class TestConfigAndIsolation:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"isolation": "docker"},
            {"cell_timeout_s": 0},
            {"memory_bytes": -1},
            {"open_files": 3},
            {"max_processes": 1},
            {"max_message_bytes": 10},
        ],
    )
    def test_bad_config_is_refused(self, kwargs: dict[str, object]) -> None:
        """Contradictory or impossible settings raise ConfigError at construction."""
        with pytest.raises(ConfigError):
            SandboxConfig(**kwargs)  # type: ignore[arg-type]

    async def test_bubblewrap_required_but_missing(self) -> None:
        """isolation="bubblewrap" without a working bwrap raises IsolationUnavailable."""
        with pytest.raises(IsolationUnavailable, match="bubblewrap: no bwrap executable"):
            await start_worker("", config(isolation="bubblewrap", bwrap_path="/nonexistent/bwrap"))

    @needs_bwrap
    async def test_isolated_worker_reports_itself(self) -> None:
        """Under bwrap the worker is isolated, and (as root) runs as a private uid."""
        async with open_worker(isolation="bubblewrap") as worker:
            result = await worker.run_cell("import os; print(os.getuid(), os.getpid())", no_requests)
        assert worker.isolated and worker.tier == "bubblewrap"
        uid, pid = map(int, result.stdout.split())
        assert pid == 2  # pid 1 is bwrap's reaper, in a pid namespace of its own
        assert uid == (worker.uid if worker.uid is not None else uid)

    @needs_system_python
    async def test_fallback_drops_root_when_it_can(self) -> None:
        """A fallback worker whose interpreter is world-readable runs as a private uid."""
        async with open_worker(isolation="none", python=SYSTEM_PYTHON) as worker:
            result = await worker.run_cell("import os; print(os.getuid())", no_requests)
            assert not worker.isolated and worker.tier == "none"
        if worker.uid is not None:
            assert result.stdout.strip() == str(worker.uid)

    def test_fallback_keeps_root_where_no_private_uid_can_reach_the_bootstrap(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A checkout under a 0700 directory (what `mktemp -d` makes): a worker switched to
        a private uid could not run the bootstrap, so the fallback does not drop root (and
        its warning says the engine's keys are exposed) instead of starting a broken worker."""
        private = tmp_path / "clone"
        private.mkdir()
        private.chmod(0o700)
        bootstrap = private / "bootstrap.py"
        bootstrap.write_text("")
        bootstrap.chmod(0o644)
        interp = launch.Interpreter(executable="/usr/bin/env", roots=())
        monkeypatch.setattr(launch, "BOOTSTRAP_PATH", str(bootstrap))
        assert not launch.can_drop_uid_unsandboxed(interp)
        monkeypatch.setattr(launch, "BOOTSTRAP_PATH", "/usr/bin/env")
        assert launch.can_drop_uid_unsandboxed(interp)

    async def test_fallback_runs_cells(self) -> None:
        """The plain-subprocess fallback runs cells and sub-calls like the sandbox."""
        recorder = Recorder()
        async with open_worker("ctx", isolation="none") as worker:
            result = await worker.run_cell("print(context, llm_query('x'))", recorder)
        assert result.stdout == "ctx echo:x\n"
