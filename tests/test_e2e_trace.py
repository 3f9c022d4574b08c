"""The trace end to end: the engine against the simulator over real HTTP, with injected
500s and 429s. What the trace's summary and the HTML timeline say about retries must be
what the server saw: every request it refused with a 500 or a 429 was retried once, by the
same call (the same request body, sent again), and counted once."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import open_sim, sim_config

from rlm_async._events import CallRetry
from rlm_async._governor import Governor, GovernorConfig, RetryConfig
from rlm_async._rlm import RLM
from rlm_async._trace import TraceWriter, load_trace
from rlm_async.sim import Faults, Policies, PolicySpec, SimConfig
from rlm_async.testing import capture_events
from rlm_async.trace_view import render_html
from rlm_async.workloads import oolong_counting

pytestmark = pytest.mark.e2e

CHUNKS = 24


class TestRetriesInTheTrace:
    @pytest.mark.asyncio
    async def test_the_summary_and_the_timeline_count_the_retries_the_server_saw(
        self, tmp_path: Path
    ) -> None:
        """A fan-out of 24 sub-calls against a server that answers the root's first two
        requests with a 500 then a 429, and about 15% of the rest with either: the trace's
        `summarize().retries` equals the requests the server refused with a 500 or 429 that
        the same call sent again, and the HTML timeline's calls card shows that number."""
        w = oolong_counting("16k", seed=7)
        config = SimConfig(
            seed=11,
            faults=Faults(
                script=("error_500", "error_429"), error_500=0.08, error_429=0.07, retry_after_s=0.02
            ),
            policies=Policies(root=PolicySpec(name="rlm", options={"chunks": CHUNKS})),
        )
        # Quick retries; every failure is retried (5 attempts against a 15% fault rate).
        governor = Governor(GovernorConfig(retry=RetryConfig(base_s=0.01, cap_s=0.05)))
        writer = TraceWriter(tmp_path)
        async with open_sim(config) as sim:
            with writer, capture_events(CallRetry) as retries:
                async with RLM(config=sim_config(sim), governor=governor, event_sinks=[writer]) as rlm:
                    result = await rlm.acompletion(w.context, w.query)
            log = sim.log.by_arrival()
        assert result.status == "ok" and w.score(result.response), (result.response, w.truth)

        # The server's view: a refused request counts as retried when the same body came again.
        bodies = Counter(e.body_sha256 for e in log)
        refused = [e for e in log if e.status in (500, 429)]
        retried = [e for e in refused if bodies[e.body_sha256] > 1]
        assert {e.outcome for e in refused} == {"error_500", "error_429"}
        assert len(retried) == len(refused) >= 2  # the two scripted ones at least
        assert sum(c.attempts - 1 for c in result.calls) == len(retried)

        (path,) = writer.paths.values()
        summary = load_trace(path).summarize()
        assert summary.retries == len(retried)
        # Each retry is the call's: its call_id names a call of the trace, whose attempts agree.
        per_call = Counter(e.call_id for e in retries.of(CallRetry))
        assert sum(per_call.values()) == len(retried)
        by_id = {c.call_id: c for c in summary.calls}
        assert all(
            by_id[call_id].retries == n == by_id[call_id].attempts - 1 for call_id, n in per_call.items()
        )

        card = re.search(
            r'<div class="k">calls</div><div class="v">\d+</div><div class="n">([^<]*)</div>',
            render_html(path),
        )
        assert card is not None and card.group(1).endswith(f", {len(retried)} retries")
