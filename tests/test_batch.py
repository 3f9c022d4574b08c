"""The batch's separable pieces without a server: input checks, the output file (append,
torn-line repair, resume index), admission against the batch ledger, the summary."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from rlm_async._config import ModelConfig, RLMConfig
from rlm_async._governor import BudgetLedger, BudgetLimits, Charge, ModelPrice, PriceTable
from rlm_async._types import Usage
from rlm_async.batch import (
    BatchBudget,
    BatchItem,
    BatchOutputError,
    BatchRow,
    BatchSummary,
    CostEstimator,
    InvalidItem,
    OutputFile,
    SpendLog,
    read_items,
)
from rlm_async.exceptions import ConfigError

PRICE = ModelPrice(input_per_mtok=1.0, cached_input_per_mtok=0.1, output_per_mtok=10.0)


def config(**budget: float) -> RLMConfig:
    return RLMConfig(
        root=ModelConfig(model="m", api_key_env=None, max_tokens=1000, prices=PRICE),
        budget=BudgetLimits(**budget),  # type: ignore[arg-type]
    )


class TestInput:
    def test_bad_lines_become_invalid_items_naming_the_line(self, tmp_path: Path) -> None:
        """Malformed JSON, a missing query, both or neither context, a duplicate id and an
        oversized context each become an `InvalidItem` that names its line; good lines
        around them still become items."""
        (tmp_path / "doc.txt").write_text("hello", encoding="utf-8")
        lines = [
            json.dumps({"id": "a", "query": "q?", "context": "text"}),
            "{not json",
            json.dumps({"id": "b", "context": "text"}),
            json.dumps({"id": "c", "query": "q?"}),
            json.dumps({"id": "d", "query": "q?", "context": "x", "context_file": "doc.txt"}),
            json.dumps({"id": "a", "query": "again", "context": "text"}),
            json.dumps({"id": "e", "query": "q?", "context": "x" * 101}),
            "",
            json.dumps({"id": "f", "query": "q?", "context_file": "doc.txt"}),
            json.dumps({"query": "no id", "context": [1, 2]}),
        ]
        path = tmp_path / "in.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        items = list(read_items(path, max_context_chars=100))
        assert [type(i).__name__ for i in items] == [
            "BatchItem",
            "InvalidItem",
            "InvalidItem",
            "InvalidItem",
            "InvalidItem",
            "InvalidItem",
            "InvalidItem",
            "BatchItem",
            "InvalidItem",
        ]
        problems = [i.problem for i in items if isinstance(i, InvalidItem)]
        assert problems[0].startswith("line 2: not valid JSON")
        assert problems[1].startswith("line 3: 'query'")
        assert "exactly one of" in problems[2] and "exactly one of" in problems[3]
        assert problems[4] == "line 6: duplicate id 'a' (first on line 1)"
        assert problems[5].startswith("line 7: context has 101 characters")
        assert problems[6].startswith("line 10:") and "list" in problems[6]
        good = items[7]
        assert isinstance(good, BatchItem) and good.context_file == tmp_path / "doc.txt"
        assert good.load_context() == "hello"

    def test_csv_rows_read_like_jsonl_lines(self, tmp_path: Path) -> None:
        """A CSV with id, query and context columns gives the same items; a row without a
        query is invalid and names its line."""
        path = tmp_path / "in.csv"
        path.write_text('id,query,context\n007,"How many?","a,b"\n8,,ctx\n', encoding="utf-8")
        first, second = list(read_items(path))
        assert isinstance(first, BatchItem) and first.id == "007" and first.context == "a,b"
        assert isinstance(second, InvalidItem) and second.problem.startswith("line 3: 'query'")


def row(item_id: str, status: str = "ok", **kw: object) -> BatchRow:
    return BatchRow(id=item_id, line=1, status=status, answer="x", **kw)  # type: ignore[arg-type]


class TestOutputFile:
    def test_a_torn_last_line_is_cut_and_finished_rows_are_kept(self, tmp_path: Path) -> None:
        """A file whose last line a crash cut short is repaired on open: the torn line is
        removed, the complete rows index the items to skip, and appending continues."""
        path = tmp_path / "out.jsonl"
        with OutputFile.open(path) as out:
            out.append(row("a"))
            out.append(row("b", "error", error="boom"))
        with path.open("ab") as f:
            f.write(b'{"id": "c", "status": "o')
        with OutputFile.open(path) as out:
            assert out.resumed.repaired_tail and out.resumed.kept == 2
            assert out.done("a") and out.done("b") and not out.done("c")
            out.append(row("c"))
        assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]

    def test_not_started_rows_are_dropped_so_each_input_keeps_one_row(self, tmp_path: Path) -> None:
        """`not_started` rows and rows cut short by the batch cap are not final: on open
        they are removed from the file (rewritten atomically) and their items run again."""
        path = tmp_path / "out.jsonl"
        with OutputFile.open(path) as out:
            out.append(row("a"))
            out.append(row("b", "not_started", error="budget: ..."))
            out.append(row("c", "budget_exceeded", limit_hit="batch.usd"))
            out.append(row("d", "budget_exceeded", limit_hit="usd"))
        with OutputFile.open(path) as out:
            assert out.resumed.dropped == 2
            assert sorted(out.rows) == ["a", "d"]
        assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "d"]

    def test_a_file_that_is_not_a_batch_output_is_refused(self, tmp_path: Path) -> None:
        """A line in the middle that is not a row raises, naming the line; the file is
        left as it was."""
        path = tmp_path / "notes.jsonl"
        path.write_text('{"id": "a", "status": "ok"}\nsome notes\n{"id": "b", "status": "ok"}\n')
        before = path.read_bytes()
        with pytest.raises(BatchOutputError, match="line 2"):
            OutputFile.open(path)
        assert path.read_bytes() == before


class TestSpendLog:
    def test_a_rerun_carries_settled_spend_and_reservations_a_crash_left_open(self, tmp_path: Path) -> None:
        """The batch ledger writes each reservation before it returns and each settlement
        after; reopened, the log carries what was spent plus what unsettled reservations
        held (calls in flight when the process died, at their upper bound)."""
        path = tmp_path / "out.jsonl.spend"
        log = SpendLog.open(path, fresh=True)
        batch = BudgetLedger(BudgetLimits(max_usd=1.0), name="batch", log=log)
        query = BudgetLedger(parent=batch)
        paid = query.reserve(Charge(Usage(1000, 500, calls=1), Decimal("0.006")))
        query.settle(paid, Charge(Usage(1000, 20, 800, calls=1), Decimal("0.0015")))
        query.reserve(Charge(Usage(2000, 500, calls=1), Decimal("0.007")))  # in flight at the "crash"
        refused = query.reserve(Charge(Usage(calls=1), Decimal("0.5")))
        query.release(refused)  # released unsent: counts nothing
        log.close()
        with path.open("ab") as f:
            f.write(b'{"reserve":{"usd":"0.')  # a write the crash cut short: never returned
        again = SpendLog.open(path, fresh=False)
        assert again.carried.usd == Decimal("0.0085")
        assert again.carried.usage.total_tokens == 1020 + 2500
        again.close()
        # Compacted into one record, and carried again by the next run.
        assert len(path.read_text().splitlines()) == 1
        assert SpendLog.open(path, fresh=False).carried == again.carried

    def test_a_new_batch_starts_a_new_log(self, tmp_path: Path) -> None:
        """`fresh` (no output file yet): an old log at that path belongs to another batch
        and is discarded."""
        path = tmp_path / "out.jsonl.spend"
        path.write_text(
            '{"carried":{"usd":"3","prompt_tokens":1,"completion_tokens":1,"cached_tokens":0,"calls":1}}\n'
        )
        with SpendLog.open(path, fresh=True) as log:
            assert log.carried == Charge()
        assert path.read_text() == ""

    def test_a_reservation_that_cannot_be_written_is_refused(self, tmp_path: Path) -> None:
        """A log that cannot be written refuses reservations (nothing is sent that a rerun
        could not count), naming the file and the fix."""
        log = SpendLog.open(tmp_path / "out.jsonl.spend", fresh=True)
        log.close()
        ledger = BudgetLedger(name="batch", log=log)
        with pytest.raises(BatchOutputError, match=r"spend log .*rerun to resume"):
            ledger.reserve(Charge(Usage(calls=1), Decimal("0.001")))
        assert ledger.reserved == Usage()


class TestAdmission:
    def budget(self, cap: float, cfg: RLMConfig | None = None, spent: Charge | None = None) -> BatchBudget:
        cfg = cfg or config()
        return BatchBudget(
            BudgetLimits(max_usd=cap),
            CostEstimator(cfg, PriceTable()),
            parent=BudgetLedger(name="process"),
            spent_before=spent,
        )

    def test_the_first_query_runs_alone_with_what_is_left_then_the_estimate_is_learnt(self) -> None:
        """With nothing learnt, a query whose prior exceeds the cap still starts alone,
        holding the whole cap; once it finished, the estimate comes from what it held."""
        b = self.budget(0.05)
        prior = Charge(Usage(10_000, 10_000), Decimal("0.2"))
        lease = b.admit(prior)
        assert lease is not None and lease.estimate["usd"] == Decimal("0.05")
        assert b.admit(prior) is None  # nothing beside a probe
        q = BudgetLedger(parent=lease.ledger)
        r = q.reserve(Charge(Usage(calls=1), Decimal("0.01")))
        q.settle(r, Charge(Usage(calls=1), Decimal("0.004")))
        lease.close(learn=True)
        # Learnt: held 0.01 of a 0.2 prior -> 0.05 of the prior, x1.25 margin.
        nxt = b.admit(prior)
        assert nxt is not None and nxt.estimate["usd"] == Decimal("0.0125")

    def test_running_queries_hold_their_outstanding_estimate(self) -> None:
        """Admission counts what is committed plus what running queries may still
        commit; when that leaves too little, the refusal names the cap and the numbers."""
        b = self.budget(0.03)
        prior = Charge(usd=Decimal("0.01"))
        b.estimator.observe(
            prior, {"usd": Decimal("0.008"), "total_tokens": Decimal(0)}
        )  # ratio 0.8 -> est 0.01
        leases = [b.admit(prior) for _ in range(3)]
        assert all(lease is not None for lease in leases)
        assert b.admit(prior) is None
        assert b.last_refusal is not None and b.last_refusal.limit == "batch.usd"
        assert "$0.0300" in str(b.last_refusal)
        first = leases[0]
        assert first is not None
        first.close(learn=False)
        assert b.admit(prior) is not None

    def test_a_query_that_replayed_the_journal_teaches_nothing(self) -> None:
        """A resumed batch's cut-off queries replay their paid calls for nothing; learning
        from them would shrink every estimate and admit queries the cap then cuts off. A
        fresh query teaches, and so does one cut short by a budget (at least its lease)."""
        b = self.budget(1.0)
        prior = Charge(usd=Decimal("0.1"))
        before = b.estimator.estimate(prior)["usd"]
        for hits, status in ((3, "ok"), (1, "max_iterations")):
            lease = b.admit(prior)
            assert lease is not None
            lease.close_after(status, journal_hits=hits)
        assert b.estimator.observed == 0 and b.estimator.estimate(prior)["usd"] == before
        cut = b.admit(prior)
        assert cut is not None
        cut.close_after("budget_exceeded", journal_hits=2)
        fresh = b.admit(prior)
        assert fresh is not None
        fresh.close_after("ok", journal_hits=0)
        assert b.estimator.observed == 2

    def test_spend_of_earlier_runs_counts_against_the_cap(self) -> None:
        """A resumed batch sees its cap lowered by what the kept rows already spent."""
        b = self.budget(1.0, spent=Charge(usd=Decimal("0.75")))
        assert b.ledger.limits.max_usd == 0.25
        assert b.spent().usd == Decimal("0.75")

    def test_a_per_query_cap_bounds_the_estimate(self) -> None:
        """With a per-query dollar cap, no estimate exceeds it."""
        b = self.budget(1.0, cfg=config(max_usd=0.002))
        lease = b.admit(Charge(Usage(1, 1), Decimal("0.5")))
        assert lease is not None and lease.estimate["usd"] == Decimal("0.002")

    def test_only_dollars_and_total_tokens_are_batch_caps(self) -> None:
        """Other caps are per query; a batch given one is a configuration error."""
        with pytest.raises(ConfigError, match="max_calls"):
            BatchBudget(BudgetLimits(max_calls=3), CostEstimator(config(), PriceTable()))


class TestSummary:
    def test_exit_code_and_counts(self) -> None:
        """Rows by status, dollars and latency quantiles; the exit code says the worst."""
        rows = [
            row("a", usage=Usage(100, 0, 50, calls=2), cost_usd=0.5, wall_s=1.0),
            row("b", usage=Usage(100, 0, 0, calls=1), cost_usd=0.25, wall_s=3.0),
        ]
        s = BatchSummary.of_rows(rows, expected=2)
        assert s.by_status == {"ok": 2} and s.exit_code == 0 and s.cache_hit_ratio == 0.25
        assert s.p50_s == 1.0 and s.p95_s == 3.0 and s.cost_usd == 0.75
        assert BatchSummary.of_rows([*rows, row("c", "invalid")]).exit_code == 1
        assert BatchSummary.of_rows([*rows, row("c", "not_started")]).exit_code == 3
        assert BatchSummary.of_rows(rows, expected=3).exit_code == 130


class TestPythonAPI:
    @pytest.mark.e2e
    @pytest.mark.asyncio
    async def test_abatch_yields_one_row_per_item_and_stop_starts_nothing_more(self) -> None:
        """`RLM.abatch` over mappings yields a row per item as each finishes (an invalid
        one included); after `BatchControl.stop()` no further query starts and the
        iteration ends with the running ones' rows."""
        from conftest import open_sim, sim_config

        from rlm_async._rlm import RLM
        from rlm_async.batch import BatchControl
        from rlm_async.sim import Policies, PolicySpec, SimConfig
        from rlm_async.workloads import s_niah

        works = [s_niah("1k", seed=i) for i in range(3)]
        items: list[object] = [{"id": i, "query": w.query, "context": w.context} for i, w in enumerate(works)]
        items.append({"id": "bad", "query": ""})
        async with open_sim(
            SimConfig(policies=Policies(root=PolicySpec(name="rlm", options={"chunks": 2})))
        ) as sim:
            async with RLM(config=sim_config(sim)) as rlm:
                rows = [r async for r in rlm.abatch(items, concurrency=2)]  # type: ignore[arg-type]
                assert sorted(str(r.id) for r in rows) == ["0", "1", "2", "bad"]
                by_id = {r.id: r for r in rows}
                assert by_id["bad"].status == "invalid"
                assert all(works[i].score(by_id[i].answer) for i in range(3))
                assert by_id[0].result is not None and by_id[0].usage.calls == by_id[0].result.total.calls

                control = BatchControl()
                seen = []
                async for r in rlm.abatch(items[:3], concurrency=1, control=control):  # type: ignore[arg-type]
                    seen.append(r)
                    control.stop()
                # The query started when the first slot freed finishes; the third never starts.
                assert len(seen) == 2


class TestCancel:
    @pytest.mark.asyncio
    async def test_a_query_that_raises_on_its_way_out_of_a_cancel_gets_no_row(self) -> None:
        """A cancelled query may end in an exception rather than the cancellation (its worker
        killed under a cell reading from it, inside an exception group): it still gets no
        row, so that a rerun resumes it, while a query that failed before the cancel keeps
        its "error" row."""
        import anyio

        from rlm_async._governor import Governor
        from rlm_async._result import RLMResult
        from rlm_async.batch import BatchControl, stream_rows

        control = BatchControl()
        failed_first = anyio.Event()

        async def run_query(query: str, context: object, parent: BudgetLedger) -> RLMResult:
            if query == "fails":
                failed_first.set()
                raise RuntimeError("the model server went away")
            await failed_first.wait()
            control.cancel()
            raise RuntimeError("the worker's channel closed while the cell was reading")

        items = [
            {"id": "a", "query": "fails", "context": "x"},
            {"id": "b", "query": "cancelled", "context": "x"},
        ]
        async with stream_rows(
            run_query, items, config=config(), governor=Governor(), control=control
        ) as out:
            rows = [r async for r in out]
        assert [(r.id, r.status) for r in rows] == [("a", "error")]
        assert rows[0].error == "RuntimeError: the model server went away"


class TestProgress:
    @pytest.mark.e2e
    @pytest.mark.asyncio
    async def test_a_terminal_shows_the_live_line_and_a_pipe_gets_nothing(self, tmp_path: Path) -> None:
        """On a terminal the live line shows queries done and running, dollars against the
        cap, calls in flight and an ETA, and its counters end at every row done, nothing
        running and no call in flight; off a terminal nothing is drawn."""
        import io

        from conftest import open_sim, sim_config
        from rich.console import Console

        from rlm_async._rlm import RLM
        from rlm_async.batch import BatchProgress, run_file
        from rlm_async.batch._progress import render_batch
        from rlm_async.sim import Policies, PolicySpec, SimConfig
        from rlm_async.workloads import s_niah

        source = tmp_path / "in.jsonl"
        source.write_text(
            "".join(
                json.dumps({"id": i, "query": w.query, "context": w.context}) + "\n"
                for i, w in enumerate(s_niah("1k", seed=i) for i in range(4))
            ),
            encoding="utf-8",
        )
        screens = {"terminal": io.StringIO(), "pipe": io.StringIO()}
        async with open_sim(
            SimConfig(policies=Policies(root=PolicySpec(name="rlm", options={"chunks": 2})))
        ) as sim:
            for name, screen in screens.items():
                console = Console(file=screen, force_terminal=name == "terminal", width=200)
                with BatchProgress(total=0, console=console, refresh_per_second=50) as progress:
                    async with RLM(
                        config=sim_config(
                            sim, root_overrides={"prices": PRICE}, sub_overrides={"prices": PRICE}
                        )
                    ) as rlm:
                        summary = await run_file(
                            rlm,
                            source,
                            tmp_path / f"{name}.jsonl",
                            concurrency=2,
                            budget=BudgetLimits(max_usd=5.0),
                            progress=progress,
                        )
                    snap = progress.snapshot()
                    assert progress.enabled is (name == "terminal")
                    final = render_batch(snap).plain
                assert summary.by_status == {"ok": 4}
                assert (snap.done, snap.running, snap.calls_in_flight, snap.total) == (4, 0, 0, 4)
                assert snap.cap_usd == 5.0 and snap.spent_usd == pytest.approx(summary.cost_usd)
                assert final.startswith("queries 4/4 done, 0 failed, 0 running") and "of $5.00" in final
        drawn = screens["terminal"].getvalue()
        assert "queries 4/4 done" in drawn and "calls in flight" in drawn and "ETA" in drawn
        assert screens["pipe"].getvalue() == ""
