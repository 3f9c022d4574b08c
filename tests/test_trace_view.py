from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from _events_factory import CRITICAL_CALLS, standard_run

from rlm_async._events import CallFinish, Event
from rlm_async._trace import write_trace
from rlm_async.trace_view import main_view, render_html


def _data(page: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))  # type: ignore[no-any-return]


def _with_text(text: str) -> list[Event]:
    events = standard_run().events()
    return [
        dataclasses.replace(e, text=text) if isinstance(e, CallFinish) and e.call_id == "r3" else e
        for e in events
    ]


class TestRenderHtml:
    def test_the_page_is_self_contained(self) -> None:
        """Nothing is loaded from elsewhere: no src/href attributes, no <link>, a CSP forbidding fetches."""
        page = render_html(standard_run().events())
        assert not re.search(r"<(script|img|iframe)[^>]*\ssrc=|<link\b|\shref=", page)
        assert re.search(r"https?://(?!www\.w3\.org/2000/svg)", page) is None
        assert "default-src 'none'" in page

    def test_embeds_every_call_and_marks_the_critical_path(self) -> None:
        """The data block holds one row per call; the rows on the critical path are flagged."""
        data = _data(render_html(standard_run().events()))
        assert len(data["calls"]) == 113 and len(data["cells"]) == 3
        assert data["models"] == ["big", "small"] and data["peak_in_flight"] == 100
        assert tuple(row[6] for row in data["calls"] if row[14]) == CRITICAL_CALLS

    def test_shows_the_summary_without_javascript(self) -> None:
        """Wall time, critical path, cache ratio and cost by depth are plain HTML."""
        page = render_html(standard_run().events())
        assert "6.43 s" in page and "6.30 s" in page
        assert "<h2>by depth</h2>" in page and "<h2>by model</h2>" in page
        assert "<td>0</td><td>3</td><td>0</td><td>7,600</td><td>4,600</td><td>61%</td>" in page
        assert "of $1.0000 budget" in page

    def test_text_cannot_break_out_of_the_data_block(self) -> None:
        """Output text holding "</script>" stays inside the JSON block, escaped."""
        page = render_html(_with_text("</script><script>alert(1)</script>"))
        assert page.count("</script>") == 2  # the data block and the viewer
        assert "<\\/script>" not in page and "\\u003c/script\\u003e" in page
        texts = [row[15] for row in _data(page)["calls"] if row[15]]
        assert texts == ["</script><script>alert(1)</script>"]

    def test_long_text_is_cut(self) -> None:
        """Text longer than max_text_chars is cut, with an ellipsis; max_text_chars=0 drops it."""
        page = render_html(_with_text("x" * 5000), max_text_chars=100)
        (text,) = [row[15] for row in _data(page)["calls"] if row[15]]
        assert text == "x" * 100 + "…"
        page = render_html(_with_text("x" * 5000), max_text_chars=0)
        assert not any(row[15] for row in _data(page)["calls"])

    def test_a_path_renders_like_its_events(self, tmp_path: Path) -> None:
        """Rendering a trace file gives the same page as rendering the events it holds."""
        events = standard_run().events()
        path = write_trace(events, tmp_path / "t.jsonl")
        assert render_html(path) == render_html(events)

    def test_main_view_writes_beside_the_trace_by_default(self, tmp_path: Path) -> None:
        """main_view(trace) writes trace.html next to it; an explicit out path is honoured."""
        path = write_trace(standard_run().events(), tmp_path / "t.jsonl")
        assert main_view(path) == tmp_path / "t.html"
        assert (
            main_view(path, tmp_path / "run.html").read_text(encoding="utf-8").startswith("<!doctype html>")
        )


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None, reason="needs Debian's `chromium` package (apt-get install chromium)"
)
class TestInBrowser:
    def test_chromium_draws_every_bar(self, tmp_path: Path) -> None:
        """Headless chromium runs the inline script: one bar per call (2013 of them), 7 on the path."""
        page = tmp_path / "run.html"
        page.write_text(render_html(standard_run(n_sub=2000).events()), encoding="utf-8")
        browser = _chromium()
        assert browser is not None
        result = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--window-size=1400,1000",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        dom = result.stdout
        gantt = re.search(r'<div id="gantt"[^>]*>', dom)
        assert gantt is not None, dom[:2000]
        assert 'data-rendered="1"' in gantt.group(0)
        assert 'data-bar-count="2013"' in gantt.group(0)
        assert 'data-critical-count="7"' in gantt.group(0)
        assert len(re.findall(r'<rect class="bar[ "]', dom)) == 2013
        assert len(re.findall(r'<rect class="bar crit', dom)) == 7
