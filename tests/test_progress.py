from __future__ import annotations

import io

import pytest
from _events_factory import T0, RunBuilder, query_finish, query_start, standard_run
from rich.console import Console

from rlm_async._events import CallFinish, CallStart, Event
from rlm_async._progress import LiveProgress, ProgressState, render_snapshot


def _terminal(width: int = 160) -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=width, height=60, color_system=None)


def _fan_out(children: int) -> list[Event]:
    """A root RLM with `children` child RLMs, the first half finished."""
    b = RunBuilder()
    b.query_start(0.0)
    b.node_start(0.0, "root", None, 0, "rlm", "big")
    for i in range(children):
        b.node_start(0.1 + i, f"k{i}", "root", 1, "rlm", "small")
        if i < children // 2:
            b.node_finish(0.5 + i, f"k{i}")
    return b.events()


@pytest.fixture(params=[True, False], ids=["engine-style", "explicit-style"])
def engine_style(request: pytest.FixtureRequest) -> bool:
    """Both ways of making an RLM's own calls (see _events_factory)."""
    return bool(request.param)


class TestProgressState:
    def test_counts_calls_tokens_and_dollars_per_rlm_node(self, engine_style: bool) -> None:
        """A finished run shows every call, the failed one, tokens, dollars and one row per RLM node."""
        run = standard_run(engine_style=engine_style)
        state = ProgressState()
        for event in run.events():
            state(event)
        snap = state.snapshot()
        t = snap.totals
        assert (snap.status, snap.calls, snap.in_flight, t.failed_calls, snap.retries) == ("ok", 113, 0, 1, 2)
        assert snap.totals.prompt_tokens == sum(c["prompt"] for c in run.calls)
        assert snap.totals.cached_tokens == sum(c["cached"] for c in run.calls)
        assert snap.totals.cost_usd == pytest.approx(sum(c["cost"] for c in run.calls))
        assert snap.budget_usd == 1.0 and snap.hidden_rows == 0
        root, k1 = snap.rows
        assert (root.node_id, root.own_done, root.sub_done, root.sub_failed, root.iteration) == (
            "root",
            3,
            102,
            1,
            3,
        )
        assert (k1.parent_id, k1.depth, k1.own_done, k1.sub_done, k1.status) == ("root", 1, 2, 5, "ok")
        assert root.cost_usd + k1.cost_usd == pytest.approx(snap.totals.cost_usd)

    def test_mid_run_shows_calls_in_flight_and_a_running_cell(self, engine_style: bool) -> None:
        """Part-way through a fan-out, in-flight counts equal calls started minus calls finished."""
        events = [e for e in standard_run(engine_style=engine_style).events() if e.time < T0 + 1.5]
        state = ProgressState()
        for event in events:
            state(event)
        started = sum(isinstance(e, CallStart) for e in events)
        finished = sum(isinstance(e, CallFinish) for e in events)
        snap = state.snapshot()
        assert snap.status == "running" and snap.in_flight == started - finished > 0
        (root,) = snap.rows
        assert root.cell_running and root.iteration == 1 and root.sub_in_flight == snap.in_flight

    def test_elapsed_time_follows_the_injected_clock_and_stops_at_finish(self) -> None:
        """Elapsed time runs on the display's clock until query.finish, then shows the engine's wall_s."""
        now = [100.0]
        state = ProgressState(clock=lambda: now[0])
        state(query_start(1.0))
        now[0] = 103.5
        assert state.snapshot().elapsed_s == 3.5
        state(query_finish(9.0, wall_s=8.0))
        now[0] = 500.0
        assert state.snapshot().elapsed_s == 8.0

    def test_rows_are_capped_keeping_the_root_and_running_nodes(self) -> None:
        """Past `max_rows`, the root and the running nodes are shown and the rest counted as hidden."""
        state = ProgressState()
        for event in _fan_out(30):
            state(event)
        snap = state.snapshot(max_rows=5)
        assert len(snap.rows) == 5 and snap.hidden_rows == 26
        assert snap.rows[0].node_id == "root"
        assert all(row.status == "running" for row in snap.rows)


class TestLiveProgress:
    def test_is_quiet_when_the_console_is_not_a_terminal(self) -> None:
        """Output piped to a file gets nothing drawn; events are still counted."""
        console = Console(file=io.StringIO())
        with LiveProgress(console=console) as progress:
            for event in standard_run().events():
                progress(event)
        assert not progress.enabled
        assert console.file.getvalue() == ""  # type: ignore[attr-defined]
        assert progress.state.snapshot().calls == 113

    def test_is_quiet_when_asked(self) -> None:
        """quiet=True draws nothing even on a terminal."""
        console = _terminal()
        with LiveProgress(console=console, quiet=True) as progress:
            progress(query_start(1.0))
        assert console.file.getvalue() == ""  # type: ignore[attr-defined]

    def test_draws_the_tree_tokens_and_budget_on_a_terminal(self) -> None:
        """On a terminal, the last frame shows both RLM nodes, sub-call counts and cost against the budget."""
        console = _terminal()
        with LiveProgress(console=console, refresh_per_second=1) as progress:
            for event in standard_run().events():
                progress(event)
        out = console.file.getvalue()  # type: ignore[attr-defined]
        assert "root" in out and "k1" in out and "q-test" in out
        assert "✓102" in out and "✗1" in out
        assert "of $1.0000" in out and "tokens in 61.5k" in out

    def test_the_sink_never_renders(self) -> None:
        """Rendering happens on the refresh timer, not per event: 20k events cause a handful of frames."""
        progress = LiveProgress(console=_terminal(), refresh_per_second=1)
        frames = [0]
        draw = progress.render

        def counting_render():  # type: ignore[no-untyped-def]
            frames[0] += 1
            return draw()

        progress.render = counting_render  # type: ignore[method-assign]
        events = standard_run(n_sub=5000).events()
        assert len(events) > 20_000
        with progress:
            for event in events:
                progress(event)
        assert frames[0] < 10
        assert progress.state.snapshot().calls == 5013

    def test_without_a_budget_says_so(self) -> None:
        """With budget_usd None, the money line says there is no cap."""
        state = ProgressState()
        for event in _fan_out(2):
            state(event)
        console = _terminal()
        console.print(render_snapshot(state.snapshot()))
        assert "(no budget cap)" in console.file.getvalue()  # type: ignore[attr-defined]
