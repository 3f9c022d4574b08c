"""The response journal: keys, reuse policy, storage, single-flight, file validation, and
durability across a real `kill -9`."""

from __future__ import annotations

import dataclasses
import inspect
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from rlm_async._events import JournalHit
from rlm_async._journal import APPLICATION_ID, Journal, request_key
from rlm_async._journal.keys import budget_note
from rlm_async._types import Completion, Message, ModelRequest, RateLimitInfo, Usage
from rlm_async.exceptions import JournalError, ServerError
from rlm_async.testing import capture_events

pytestmark = pytest.mark.anyio

CHILD = Path(__file__).with_name("_journal_crash_child.py")


def request(content: str = "What is 6 x 7?", **overrides: object) -> ModelRequest:
    fields: dict[str, object] = {
        "model": "gpt-test",
        "messages": (Message("system", "You are terse."), Message("user", content)),
        "temperature": 0.0,
        "max_tokens": 64,
    }
    fields.update(overrides)
    return ModelRequest(**fields)  # type: ignore[arg-type]


def completion(text: str = "42") -> Completion:
    return Completion(text=text, usage=Usage(120, 3, 64), model="gpt-test-2026", finish_reason="stop")


class Sender:
    """A `send` callable that counts calls; optionally blocks until `gate` is set.
    `entered` is set once `expect` calls have started."""

    def __init__(self, text: str = "42", *, gate: anyio.Event | None = None, expect: int = 1) -> None:
        self.calls = 0
        self.text = text
        self.gate = gate
        self.expect = expect
        self.entered = anyio.Event()

    async def __call__(self) -> Completion:
        self.calls += 1
        if self.calls >= self.expect:
            self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return completion(self.text)


@pytest.fixture
async def journal(tmp_path: Path):  # type: ignore[no-untyped-def]
    j = await Journal.open(tmp_path / "run.journal")
    yield j
    await j.aclose()


GOLDEN_KEY = "cd655d09bedc99f6fe1ec0521a3f927632a45b494fc16fa04d0eef2c3795a365"
"""Computed once; stored journals depend on it, so it must never change (a deliberate change
to how keys are built goes with a new `_KEY_SCHEME`, and then this value: v2 dropped the
endpoint from the key)."""


class TestKey:
    def test_key_is_byte_identical_across_runs(self) -> None:
        """The key of a fixed request is a fixed string: no hash(), ids or timestamps in it."""
        assert request_key(request()) == GOLDEN_KEY

    def test_key_same_in_a_fresh_interpreter(self) -> None:
        """A different process with a different hash seed computes the same key."""
        code = (
            "from rlm_async._journal import request_key;"
            "from rlm_async._types import ModelRequest, Message;"
            "print(request_key(ModelRequest(model='gpt-test', messages=("
            "Message('system', 'You are terse.'), Message('user', 'What is 6 x 7?')), "
            "temperature=0.0, max_tokens=64)))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "12345"},
        )
        assert out.stdout.strip() == GOLDEN_KEY

    @pytest.mark.parametrize(
        "changed",
        [
            pytest.param(request(model="gpt-other"), id="model"),
            pytest.param(request("What is 6 x 8?"), id="content"),
            pytest.param(request(temperature=0.5), id="temperature"),
            pytest.param(request(temperature=None), id="temperature-unset"),
            pytest.param(request(max_tokens=65), id="max_tokens"),
            pytest.param(request(max_tokens=None), id="max_tokens-unset"),
            pytest.param(
                request(messages=(Message("user", "You are terse."), Message("user", "What is 6 x 7?"))),
                id="role",
            ),
            pytest.param(
                request(messages=(Message("user", "What is 6 x 7?"), Message("system", "You are terse."))),
                id="order",
            ),
            pytest.param(
                request(messages=(Message("system", "You are terse.What is 6 x 7?"),)),
                id="message-boundary",
            ),
        ],
    )
    def test_key_differs_when_an_output_affecting_field_differs(self, changed: ModelRequest) -> None:
        """Any change that can change the answer gives a different key."""
        assert request_key(changed) != request_key(request())

    def test_key_is_what_was_asked_not_where_it_was_sent(self) -> None:
        """The endpoint is not hashed: a re-run against a server on another port (the
        in-process simulator picks one at random) finds the same rows."""
        assert "endpoint" not in inspect.signature(request_key).parameters
        assert "endpoint" not in inspect.signature(Journal.call).parameters

    def test_key_ignores_prompt_cache_key_and_int_float_spelling(self) -> None:
        """Routing hints and `0` vs `0.0` do not change the answer, so not the key."""
        base = request_key(request())
        assert request_key(request(prompt_cache_key="rlm-abc-3")) == base
        assert request_key(request(temperature=0)) == base

    def test_key_ignores_the_budget_note_in_user_messages_only(self) -> None:
        """The root prompt's budget line changes from run to run (a shared budget, journal
        hits that spend nothing), so a resumed query must still find its turns; the rest
        of the message, and the same text said by the assistant, stay in the key."""
        said = "out: 17\n\n[iteration 2 of 30; 28 left]\n"
        base = request_key(request(said + budget_note("$0.91 of $1.00; 12 calls")))
        assert request_key(request(said + budget_note("$1.00 of $1.00; 0 calls"))) == base
        assert request_key(request(said.replace("17", "18") + budget_note("$1.00"))) != base
        assistant = request(messages=(Message("assistant", budget_note("$1")), Message("user", "go")))
        other = request(messages=(Message("assistant", budget_note("$2")), Message("user", "go")))
        assert request_key(assistant) != request_key(other)
        assert request_key(request()) == GOLDEN_KEY  # keys without the line are as before

    def test_every_request_field_is_classified(self) -> None:
        """A field added to ModelRequest must be looked at here: it is in the key unless it is
        listed as not output-affecting."""
        names = {f.name for f in dataclasses.fields(ModelRequest)}
        assert names == {"model", "messages", "max_tokens", "temperature", "prompt_cache_key", "sampling"}


class TestReusable:
    @pytest.mark.parametrize("temperature", [0.0, 0, None, 0.7])
    async def test_every_call_is_replayable_by_default(
        self, journal: Journal, temperature: float | None
    ) -> None:
        """A journal is asked for to never pay twice: greedy and sampled calls both replay."""
        assert journal.reusable(request(temperature=temperature))

    @pytest.mark.parametrize(
        ("temperature", "expected"), [(0.0, True), (0, True), (None, False), (0.7, False)]
    )
    async def test_opt_out_reuses_only_greedy_calls(
        self, tmp_path: Path, temperature: float | None, expected: bool
    ) -> None:
        """reuse_nondeterministic=False: temperature 0 only; None is the server default (1.0)."""
        async with await Journal.open(tmp_path / "j", reuse_nondeterministic=False) as j:
            assert j.reusable(request(temperature=temperature)) is expected


class TestStorage:
    async def test_put_then_get_round_trips(self, journal: Journal) -> None:
        """A stored completion comes back equal, minus its stale rate-limit headers."""
        original = dataclasses.replace(
            completion("héllo\n\u2603"), rate_limit=RateLimitInfo(limit_requests=5)
        )
        await journal.put("k1", original)
        assert await journal.get("k1") == dataclasses.replace(original, rate_limit=None)
        assert await journal.get("missing") is None

    async def test_first_write_wins(self, journal: Journal) -> None:
        """A second row for a key is ignored, so a replay never changes under the caller."""
        await journal.put("k", completion("first"))
        await journal.put("k", completion("second"))
        got = await journal.get("k")
        assert got is not None and got.text == "first"

    async def test_rows_survive_reopening(self, tmp_path: Path) -> None:
        """Rows are in the file, not in memory."""
        path = tmp_path / "j"
        async with await Journal.open(path) as j:
            await j.put("k", completion("kept"))
        async with await Journal.open(path) as j:
            got = await j.get("k")
            assert got is not None and got.text == "kept"

    async def test_a_thousand_concurrent_puts_are_all_committed(self, journal: Journal) -> None:
        """Writes arriving together are committed in groups, none lost."""
        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(journal.put, f"k{i}", completion(str(i)))
        assert await journal.count() == 1000
        got = await journal.get("k999")
        assert got is not None and got.text == "999"

    async def test_two_journals_on_one_file_see_each_others_rows(self, tmp_path: Path) -> None:
        """Two openers (as two processes would) share the file through SQLite's locking."""
        path = tmp_path / "shared"
        async with await Journal.open(path) as a, await Journal.open(path) as b:
            await a.put("from-a", completion("a"))
            got = await b.get("from-a")
            assert got is not None and got.text == "a"

    async def test_closed_journal_refuses_use(self, tmp_path: Path) -> None:
        """Using a closed journal is an error that says to reopen it; closing twice is fine."""
        j = await Journal.open(tmp_path / "j")
        await j.aclose()
        await j.aclose()
        with pytest.raises(JournalError, match="closed"):
            await j.get("k")

    async def test_a_put_cancelled_while_queued_is_still_committed(self, tmp_path: Path) -> None:
        """The call was paid for: a cancelled `put` keeps its row, committed at the latest by
        `aclose()`."""
        path = tmp_path / "j"
        j = await Journal.open(path)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await j.put("k", completion("paid for"))
        await j.aclose()
        async with await Journal.open(path) as again:
            got = await again.get("k")
            assert got is not None and got.text == "paid for"

    async def test_a_writer_locked_out_gets_an_error_naming_the_fix(self, tmp_path: Path) -> None:
        """Another process holding the write lock past the busy timeout is reported, not hidden."""
        path = tmp_path / "j"
        async with await Journal.open(path, busy_timeout_s=0.05) as j:
            other = sqlite3.connect(path, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                with pytest.raises(JournalError, match=r"locked by another process.*busy_timeout_s"):
                    await j.put("k", completion())
            finally:
                other.close()
            await j.put("k", completion())  # and it recovers once the lock is gone
            assert await j.count() == 1

    async def test_created_at_uses_the_injected_clock(self, tmp_path: Path) -> None:
        """Time is injected, so rows carry the test's clock."""
        path = tmp_path / "j"
        async with await Journal.open(path, clock=lambda: 1234.5) as j:
            await j.put("k", completion())
        with sqlite3.connect(path) as conn:
            assert conn.execute("SELECT created_at FROM responses").fetchone()[0] == 1234.5
        conn.close()


class TestCall:
    async def test_miss_sends_then_hit_does_not(self, journal: Journal) -> None:
        """The first call is sent and recorded; the same call again is answered from the file."""
        send = Sender()
        first, from_journal = await journal.call(request(), send)
        assert (first.text, from_journal, send.calls) == ("42", False, 1)
        again, from_journal = await journal.call(request(prompt_cache_key="other"), send)
        assert (again, from_journal, send.calls) == (first, True, 1)

    async def test_hit_emits_journal_hit(self, journal: Journal) -> None:
        """A hit is visible in the trace, labelled with the caller's call id."""
        await journal.call(request(), Sender())
        with capture_events() as events:
            await journal.call(request(), Sender(), call_id="c7")
        assert events.kinds() == ["journal.hit"]
        assert [(e.kind, e.call_id, e.source) for e in events.of(JournalHit)] == [
            ("journal.hit", "c7", "journal")
        ]

    async def test_sampled_calls_are_sent_every_time_but_recorded(self, tmp_path: Path) -> None:
        """With reuse_nondeterministic=False, temperature=None is sent every time, yet a
        later run with reuse can replay it."""
        path = tmp_path / "j"
        send = Sender()
        async with await Journal.open(path, reuse_nondeterministic=False) as j:
            for _ in range(2):
                _, from_journal = await j.call(request(temperature=None), send)
                assert not from_journal
            assert send.calls == 2
        async with await Journal.open(path, reuse_nondeterministic=True) as j:
            _, from_journal = await j.call(request(temperature=None), send)
            assert from_journal and send.calls == 2

    async def test_a_rerun_replays_each_sample_occurrence_by_occurrence(self, tmp_path: Path) -> None:
        """Three identical sampled calls are three sends with three answers; a re-run gets
        the same three back in order and sends nothing; a fourth is a new draw."""
        path = tmp_path / "j"
        answers = iter(["a", "b", "c", "d"])

        async def send() -> Completion:
            return completion(next(answers))

        async with await Journal.open(path) as j:
            first = [(await j.call(request(temperature=None), send))[0].text for _ in range(3)]
        async with await Journal.open(path) as j:
            again = [await j.call(request(temperature=None), send) for _ in range(4)]
        assert first == ["a", "b", "c"]
        assert [(c.text, hit) for c, hit in again] == [("a", True), ("b", True), ("c", True), ("d", False)]

    async def test_identical_sampled_calls_in_flight_are_all_sent(self, journal: Journal) -> None:
        """Single-flight never collapses samples: five identical sampled calls are five sends."""
        gate = anyio.Event()
        send = Sender(gate=gate, expect=5)
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(journal.call, request(temperature=None), send)
            with anyio.fail_after(10):
                await send.entered.wait()
            gate.set()
        assert send.calls == 5

    async def test_hundred_identical_calls_in_flight_are_sent_once(self, journal: Journal) -> None:
        """Single-flight: 100 concurrent identical calls make one send; 99 share its answer."""
        gate = anyio.Event()
        send = Sender(gate=gate)
        results: list[tuple[Completion, bool]] = []

        async def one() -> None:
            results.append(await journal.call(request(), send))

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(one)
            with anyio.fail_after(10):
                await send.entered.wait()
            await anyio.wait_all_tasks_blocked()
            gate.set()
        assert send.calls == 1
        assert len(results) == 100 and len({id(c) for c, _ in results}) == 1
        assert sorted(f for _, f in results) == [False] + [True] * 99
        assert await journal.count() == 1

    async def test_leader_failure_hands_over_to_a_follower(self, journal: Journal) -> None:
        """When the call being waited on fails, one waiter sends instead; nobody hangs."""
        gate = anyio.Event()
        first_started = anyio.Event()
        attempts = 0

        async def flaky() -> Completion:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                first_started.set()
                await gate.wait()
                raise ServerError("502 from upstream")
            return completion("second try")

        outcomes: list[object] = []

        async def one() -> None:
            try:
                outcomes.append(await journal.call(request(), flaky))
            except ServerError as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one)
            with anyio.fail_after(10):
                await first_started.wait()
            await anyio.wait_all_tasks_blocked()
            gate.set()
        errors = [o for o in outcomes if isinstance(o, ServerError)]
        answers = [o for o in outcomes if isinstance(o, tuple)]
        assert attempts == 2 and len(errors) == 1 and len(answers) == 9
        assert {c.text for c, _ in answers} == {"second try"}
        assert sorted(f for _, f in answers) == [False] + [True] * 8

    async def test_leader_cancellation_hands_over_to_a_follower(self, journal: Journal) -> None:
        """A cancelled leader (its query was cancelled) does not strand the others."""
        sends = 0
        first_started = anyio.Event()

        async def send() -> Completion:
            nonlocal sends
            sends += 1
            if sends == 1:
                first_started.set()
                await anyio.sleep_forever()
            return completion("from the follower")

        results: list[tuple[Completion, bool]] = []

        async def follower() -> None:
            results.append(await journal.call(request(), send))

        async with anyio.create_task_group() as tg:
            leader_scope = anyio.CancelScope()

            async def leader() -> None:
                with leader_scope:
                    await journal.call(request(), send)

            tg.start_soon(leader)
            await first_started.wait()
            for _ in range(3):
                tg.start_soon(follower)
            await anyio.wait_all_tasks_blocked()
            leader_scope.cancel()
        assert sends == 2 and len(results) == 3
        assert {c.text for c, _ in results} == {"from the follower"}

    async def test_a_failed_call_is_not_recorded(self, journal: Journal) -> None:
        """Errors are never replayed: the next identical call is sent again."""

        async def failing() -> Completion:
            raise ServerError("boom")

        with pytest.raises(ServerError):
            await journal.call(request(), failing)
        send = Sender()
        _, from_journal = await journal.call(request(), send)
        assert not from_journal and send.calls == 1


class TestFileValidation:
    async def test_empty_file_becomes_a_journal(self, tmp_path: Path) -> None:
        """An empty file (e.g. made by `touch`) is taken as a new journal."""
        path = tmp_path / "j"
        path.touch()
        async with await Journal.open(path) as j:
            await j.put("k", completion())
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        conn.close()

    async def test_text_file_is_refused_and_untouched(self, tmp_path: Path) -> None:
        """A file that is not SQLite is named in the error and left as it was."""
        path = tmp_path / "notes.txt"
        path.write_text("my precious notes\n" * 100)
        with pytest.raises(JournalError, match=r"notes\.txt is not an rlm_async response journal.*new path"):
            await Journal.open(path)
        assert path.read_text() == "my precious notes\n" * 100

    async def test_other_applications_database_is_refused_and_untouched(self, tmp_path: Path) -> None:
        """A SQLite file with tables but no rlm_async marker is foreign; it is not switched to WAL."""
        path = tmp_path / "app.db"
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.commit()
        conn.close()
        before = path.read_bytes()
        with pytest.raises(JournalError, match=r"app\.db is a SQLite database of another application"):
            await Journal.open(path)
        assert path.read_bytes() == before

    async def test_database_with_another_application_id_is_refused(self, tmp_path: Path) -> None:
        """A different application_id is foreign even if it looks like a journal."""
        path = tmp_path / "other.db"
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA application_id = 42")
        conn.execute("CREATE TABLE responses (key TEXT)")
        conn.commit()
        conn.close()
        with pytest.raises(JournalError, match="application_id 0x0000002a"):
            await Journal.open(path)

    async def test_truncated_journal_is_refused(self, tmp_path: Path) -> None:
        """A journal cut short (a bad copy, a full disk) is reported as corrupt, with the fix."""
        path = tmp_path / "j"
        async with await Journal.open(path) as j:
            async with anyio.create_task_group() as tg:
                for i in range(300):
                    tg.start_soon(j.put, f"k{i}", completion("x" * 2000))
        cut_in_half(path)
        with pytest.raises(JournalError, match=r"corrupt or truncated.*start a new journal"):
            await Journal.open(path)

    async def test_file_shorter_than_one_page_is_refused(self, tmp_path: Path) -> None:
        """SQLite would take a stub that only starts with its magic for an empty database."""
        path = tmp_path / "j"
        path.write_bytes(b"SQLite format 3\x00" + b"\x00" * 40)
        with pytest.raises(JournalError, match="truncated"):
            await Journal.open(path)

    async def test_other_schema_version_is_refused(self, tmp_path: Path) -> None:
        """A journal written by an incompatible rlm_async says which version it is."""
        path = tmp_path / "j"
        async with await Journal.open(path):
            pass
        conn = sqlite3.connect(path)
        conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
        conn.commit()
        conn.close()
        with pytest.raises(JournalError, match="schema version 99"):
            await Journal.open(path)

    async def test_unreadable_row_is_an_error_not_a_miss(self, tmp_path: Path) -> None:
        """A damaged row raises instead of being silently re-sent or returned half-decoded."""
        path = tmp_path / "j"
        async with await Journal.open(path) as j:
            await j.put("k", completion())
        conn = sqlite3.connect(path)
        conn.execute("UPDATE responses SET completion = '{\"text\": 1'")
        conn.commit()
        conn.close()
        async with await Journal.open(path) as j:
            with pytest.raises(JournalError, match="unreadable row"):
                await j.get("k")

    async def test_verify_passes_on_a_sound_file(self, journal: Journal) -> None:
        """verify() runs the full integrity check."""
        await journal.put("k", completion())
        await journal.verify()

    async def test_bad_settings_are_refused(self, tmp_path: Path) -> None:
        """Misuse is caught before the file is touched."""
        with pytest.raises(JournalError, match="synchronous"):
            await Journal.open(tmp_path / "j", synchronous="off")  # type: ignore[arg-type]
        assert not (tmp_path / "j").exists()


class TestDurability:
    @pytest.mark.timeout(60)
    def test_every_reported_commit_survives_kill_9(self, tmp_path: Path) -> None:
        """A child writing many rows is SIGKILLed midway; every row it reported is in the
        file, intact, and the file passes the integrity check."""
        from _journal_crash_child import completion_for

        path = tmp_path / "crash.journal"
        with subprocess.Popen(
            [sys.executable, str(CHILD), str(path), "crash", "1000000", "50"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            reported: list[str] = []
            try:
                for line in proc.stdout:
                    reported.append(line)
                    if len(reported) >= 400:
                        break
                # Let it run on unread for a moment (its output fills the pipe buffer), so
                # the kill lands among commits in flight rather than right after a print.
                time.sleep(0.05)
                os.kill(proc.pid, signal.SIGKILL)
                rest, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert proc.returncode == -signal.SIGKILL, err
        # Only whole lines count: the kill may cut the last one short.
        reported.extend(rest.splitlines(keepends=True))
        keys = [line.split()[1] for line in reported if line.endswith("\n")]
        assert len(keys) >= 400

        async def check() -> int:
            async with await Journal.open(path) as j:
                await j.verify()
                for key in keys:
                    assert await j.get(key) == completion_for(key)
                return await j.count()

        stored = anyio.run(check)
        assert stored >= len(keys)

    @pytest.mark.timeout(60)
    def test_two_processes_write_one_file(self, tmp_path: Path) -> None:
        """Two processes creating and writing the same new journal at once both succeed."""
        path = tmp_path / "shared.journal"
        children = [
            subprocess.Popen(
                [sys.executable, str(CHILD), str(path), tag, "300", "30"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for tag in ("a", "b")
        ]
        for child in children:
            with child:
                _, err = child.communicate(timeout=50)
            assert child.returncode == 0, err

        async def count() -> int:
            async with await Journal.open(path) as j:
                return await j.count()

        assert anyio.run(count) == 600


def cut_in_half(path: Path) -> None:
    """Truncate a journal the way a bad copy or a full disk would."""
    assert not Path(f"{path}-wal").exists()  # checkpointed on close: the main file holds it all
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
