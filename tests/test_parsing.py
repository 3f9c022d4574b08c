"""Reading root-model replies: which code runs, and when a reply is a final answer."""

from __future__ import annotations

import pytest

from rlm_async._parsing import FinalMarker, find_code_blocks, find_final, truncate_output


class TestFindCodeBlocks:
    def test_repl_blocks_in_order(self) -> None:
        """Every ```repl block is returned, in the order it appears."""
        reply = "First:\n```repl\na = 1\n```\nthen\n```repl\nb = a + 1\nprint(b)\n```\n"
        assert find_code_blocks(reply) == ["a = 1", "b = a + 1\nprint(b)"]

    def test_python_and_bare_blocks_are_not_run(self) -> None:
        """```python and bare ``` blocks are illustration, not code to run."""
        reply = "```python\nimport os\n```\n```\nrm -rf /\n```\n```repl\nx = 2\n```"
        assert find_code_blocks(reply) == ["x = 2"]

    def test_one_line_block(self) -> None:
        """A block with no newline after the fence still runs."""
        assert find_code_blocks("look: ```repl print(len(context))```") == ["print(len(context))"]

    def test_unclosed_block_at_end(self) -> None:
        """A reply cut off inside a block runs the code it has."""
        assert find_code_blocks("```repl\nprint(1)\nprint(2)") == ["print(1)\nprint(2)"]

    def test_empty_block_is_dropped(self) -> None:
        """An empty block is not sent to the worker."""
        assert find_code_blocks("```repl\n\n```") == []

    def test_fence_case_insensitive(self) -> None:
        """The info word is matched without regard to case."""
        assert find_code_blocks("```REPL\nx=1\n```") == ["x=1"]


class TestFindFinal:
    def test_final_text(self) -> None:
        """FINAL(...) at the start of a line is the answer, parentheses inside kept."""
        assert find_final("Done.\nFINAL(42 (approx))") == FinalMarker("text", "42 (approx)")

    def test_final_var(self) -> None:
        """FINAL_VAR(name) names a REPL variable, quotes stripped."""
        assert find_final("FINAL_VAR('result')") == FinalMarker("var", "result")

    def test_final_mid_line_is_ignored(self) -> None:
        """A model mentioning FINAL( mid-sentence does not end the run."""
        assert find_final("I will call FINAL(x) later") is None

    def test_final_inside_code_is_ignored(self) -> None:
        """FINAL inside a code block is code, not an answer."""
        assert find_final("```repl\nFINAL(1)\n```") is None

    def test_multiline_final(self) -> None:
        """FINAL's text may span lines."""
        assert find_final("FINAL(line one\nline two)") == FinalMarker("text", "line one\nline two")

    def test_no_closing_paren(self) -> None:
        """Without a closing parenthesis the rest of the reply is the answer."""
        assert find_final("FINAL(cut off answer") == FinalMarker("text", "cut off answer")

    def test_final_after_code(self) -> None:
        """A FINAL line after a code block is found."""
        reply = "```repl\nx = 3\n```\nFINAL_VAR(x)"
        assert find_final(reply) == FinalMarker("var", "x")


class TestTruncateOutput:
    def test_short_output_unchanged(self) -> None:
        """Output within the limit is returned as is."""
        assert truncate_output("hello", 10) == "hello"

    @pytest.mark.parametrize("n", [11, 1000, 50_000])
    def test_long_output_cut_with_marker(self, n: int) -> None:
        """Output past the limit is cut and the marker says how many characters were cut."""
        out = truncate_output("x" * n, 10)
        assert out.startswith("x" * 10 + "\n")
        assert f"{n - 10} more characters" in out

    def test_deterministic(self) -> None:
        """The same output always cuts to the same text (prefix caching depends on it)."""
        text = "abc" * 10_000
        assert truncate_output(text, 20_000) == truncate_output(text, 20_000)
