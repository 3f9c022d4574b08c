"""Synthetic workloads: seeded, sized as asked, ground truth checked by an independent recount."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import combinations
from random import Random

import pytest

from rlm_async.workloads import (
    CATEGORIES,
    Shape,
    Workload,
    classify_question,
    count_records,
    make_workload,
    oolong_counting,
    oolong_pairs,
    parse_query,
    parse_record,
    parse_records,
    parse_size,
    s_niah,
)

Factory = Callable[..., Workload]

RECORD = re.compile(r"^Date: \w{3} \d{2}, \d{4} \|\| User: (\d+) \|\| Instance: (.+)$")


def text_of(context: object) -> str:
    if isinstance(context, dict):
        return "\n".join(context.values())
    if isinstance(context, list):
        return "\n".join(context)
    assert isinstance(context, str)
    return context


def recount(context: object) -> list[tuple[int, str]]:
    """(user, category) of every record, parsed here rather than with the module's own parser."""
    rows = []
    for line in text_of(context).split("\n"):
        m = RECORD.match(line)
        assert m, f"not a record: {line!r}"
        category = classify_question(m.group(2))
        assert category in CATEGORIES
        rows.append((int(m.group(1)), category))
    return rows


class TestSizes:
    def test_parse_size(self) -> None:
        """Sizes read as tokens: 8k is 8192, 1m is a million."""
        assert [parse_size(s) for s in ("8k", "128K", "1m", "10m", "5000", 77)] == [
            8192,
            131072,
            1_000_000,
            10_000_000,
            5000,
            77,
        ]
        with pytest.raises(ValueError):
            parse_size("lots")

    @pytest.mark.parametrize("factory", [s_niah, oolong_counting, oolong_pairs])
    @pytest.mark.parametrize("size", ["8k", "256k"])
    def test_context_is_within_a_few_percent_of_the_requested_tokens(
        self, factory: Factory, size: str
    ) -> None:
        """A workload of N tokens has about 4N characters (the simulator's tokenizer)."""
        w = factory(size, seed=1)
        assert abs(w.context_chars / (4 * w.tokens) - 1) < 0.03

    def test_ten_million_tokens_of_niah_builds(self) -> None:
        """S-NIAH at 10M tokens builds a 40M-character context with the needle in it once."""
        w = s_niah("10m", seed=4)
        assert isinstance(w.context, str)
        assert abs(len(w.context) - 40_000_000) < 40_000
        assert w.context.count("special magic number") == 1


class TestDeterminism:
    @pytest.mark.parametrize("factory", [s_niah, oolong_counting, oolong_pairs])
    def test_same_seed_same_workload_other_seed_other_workload(self, factory: Factory) -> None:
        """Generation is a pure function of (size, seed, options)."""
        a, b, c = factory("16k", seed=5), factory("16k", seed=5), factory("16k", seed=6)
        assert a.context == b.context and a.query == b.query and a.truth == b.truth
        assert a.context != c.context


class TestNiah:
    def test_one_needle_at_the_requested_depth_and_scoring(self) -> None:
        """The needle line appears once, near the requested depth; the answer is scored by its number."""
        w = s_niah("64k", seed=2, depth=0.25)
        assert isinstance(w.context, str)
        needle = f"One of the special magic numbers for {w.key} is: {w.truth}."
        assert w.context.count(needle) == 1 and f"\n{needle}\n" in w.context
        assert abs(w.context.index(needle) / len(w.context) - 0.25) < 0.05
        assert w.key in w.query
        assert w.score(f"The number is {w.truth}.") and w.score(str(w.truth))
        assert not w.score("1234") and not w.score(None)

    @pytest.mark.parametrize("shape", ["list", "dict"])
    def test_list_and_dict_shapes_hold_the_same_kind_of_data(self, shape: Shape) -> None:
        """Shaped contexts are documents whose text joins to a haystack with exactly one needle."""
        w = s_niah("64k", seed=3, shape=shape)
        assert isinstance(w.context, list if shape == "list" else dict) and len(w.context) > 1
        assert text_of(w.context).count("special magic number") == 1


class TestCounting:
    @pytest.mark.parametrize("shape", ["str", "list", "dict"])
    def test_truth_matches_an_independent_recount(self, shape: Shape) -> None:
        """The ground truth is the number of records whose question belongs to the asked category."""
        w = oolong_counting("64k", seed=7, shape=shape)
        rows = recount(w.context)
        assert len(rows) == w.n_records
        assert Counter(c for _, c in rows)[w.label] == w.truth > 0
        assert f"'{w.label}'" in w.query

    def test_every_category_is_present_and_questions_have_one_category(self) -> None:
        """Records cover all six categories, and the oracle gives each question exactly one."""
        w = oolong_counting("128k", seed=1)
        assert {c for _, c in recount(w.context)} == set(CATEGORIES)

    def test_scoring_reads_the_first_integer(self) -> None:
        """The answer is right when its first integer is the count (thousands separators allowed)."""
        w = oolong_counting("256k", seed=1, label="human")
        assert w.truth > 1000
        assert w.score(f"{w.truth:,} records") and w.score(str(w.truth))
        assert not w.score(str(w.truth + 1)) and not w.score("none")


class TestPairs:
    @pytest.mark.parametrize("shape", ["str", "list"])
    def test_truth_is_every_pair_of_qualifying_users(self, shape: Shape) -> None:
        """The truth is all pairs (lower id first) of users with a record in either category."""
        w = oolong_pairs("64k", seed=3, shape=shape)
        users = sorted({u for u, c in recount(w.context) if c in w.labels})
        assert set(w.truth) == set(combinations(users, 2)) and len(users) >= 2
        assert tuple(users) == w.qualifying_users

    def test_scoring_needs_exactly_the_right_set(self) -> None:
        """Order and spacing do not matter; a missing or extra pair fails; f1 measures partial answers."""
        w = oolong_pairs("32k", seed=4)
        pairs = sorted(w.truth)
        text = ", ".join(f"({b},{a})" for a, b in reversed(pairs))
        assert w.score(text) and w.f1(text) == 1.0
        partial = ", ".join(f"({a}, {b})" for a, b in pairs[1:])
        assert not w.score(partial) and 0 < w.f1(partial) < 1
        assert not w.score(text + ", (1, 2)")


class TestQueries:
    def test_each_generator_query_is_recognised(self) -> None:
        """parse_query recovers the task from each generator's query text."""
        n, c, p = s_niah("8k", seed=1), oolong_counting("8k", seed=1), oolong_pairs("8k", seed=1)
        qn, qc, qp = parse_query(n.query), parse_query(c.query), parse_query(p.query)
        assert qn is not None and qc is not None and qp is not None
        assert qn.kind == "niah" and qn.key == n.key
        assert qc.kind == "count" and qc.label == c.label
        assert qp.kind == "pairs" and qp.labels == p.labels
        assert parse_query("What is the capital of France?") is None

    def test_registry_builds_by_name(self) -> None:
        """make_workload builds each workload by registry name."""
        assert make_workload("s-niah", "8k", seed=1).name == "s-niah-8k"
        assert make_workload("oolong", "8k").name == "oolong-8k"
        assert make_workload("oolong-pairs", 5000).name == "oolong-pairs-5000"
        with pytest.raises(ValueError, match="unknown workload"):
            make_workload("nope", "8k")


def records_line_by_line(text: str) -> list[tuple[int, str | None]]:
    """What `parse_records` must equal: `parse_record` of each line, non-records left out."""
    return [r for line in text.splitlines() if (r := parse_record(line)) is not None]


def edited_records(*, seed: int, n: int) -> Iterator[str]:
    """`n` seeded runs of 1-5 real record lines, each with up to three random insertions
    of the pieces a record is made of (separators, labels, digits, line breaks) or
    deletions: texts a fast scan could read otherwise than the line-by-line reader."""
    rng = Random(seed)
    lines = text_of(oolong_counting("8k", seed=1).context).split("\n")[:40]
    pieces = [" || ", "||", "|", " ", "User: ", "Instance: ", "7", "+", "\n", "\r", "\u2029", "x"]
    for _ in range(n):
        text = "\n".join(lines[rng.randrange(len(lines)) :][: rng.randint(1, 5)])
        for _ in range(rng.randint(0, 3)):
            at = rng.randrange(len(text) + 1)
            if rng.random() < 0.7:
                text = text[:at] + rng.choice(pieces) + text[at:]
            else:
                text = text[:at] + text[at + rng.randint(1, 4) :]
        yield text


class TestParseRecords:
    def test_a_whole_context_reads_as_its_lines_do(self) -> None:
        """The records of a generated context, read in one scan, equal those read line by line."""
        text = text_of(oolong_counting("64k", seed=4).context)
        found = parse_records(text)
        assert len(found) > 500
        assert found == records_line_by_line(text)

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "no records here\nat all",
            "Date: x || User: 12 || Instance: What is a {0}?",
            "Date: x || User: 12 || Instance: What is the population of Paris?  \nnext",
            "Date: x || User: +12 || Instance: q",  # int() takes it; the scan's digits do not
            "Date: x || User:  12 || Instance: q",
            "Date: x || User: 1_2 || Instance: q",
            "Date: x || User: \u0661\u0662 || Instance: q",  # Arabic-Indic digits: int() reads 12
            "Date: x || User: 12 || Instance: q || extra",  # a third separator: not a record
            "Date: x || || User: 12 || Instance: q",  # overlapping separators
            "a || b\nDate: x || User: 12 || Instance: q",  # a separator on a line that is no record
            "Date: x || User: 12 || Instance: q\r\nDate: y || User: 13 || Instance: r",
            "Date: x || User: 12 || Instance: q\x1cDate: y || User: 13 || Instance: r",
            "Date: x || User: 12 || Instance: q\u2028Date: y || User: 13 || Instance: r",
            "Date: x || User: 12 || Instance:q",
            "|| User: 12 || Instance: q\n || User: 13 || Instance: r\n",
        ],
    )
    def test_texts_a_scan_could_misread_read_as_their_lines_do(self, text: str) -> None:
        """Odd line breaks, stray or overlapping separators, and user ids that only int() reads
        give what the line-by-line reading gives."""
        real = "Date: Jan 01, 2023 || User: 7 || Instance: " + next(iter(_questions()))
        for sample in (text, text + "\n" + real, real + "\n" + text):
            assert parse_records(sample) == records_line_by_line(sample), sample

    def test_random_edits_of_records_read_as_their_lines_do(self) -> None:
        """Seeded random edits of real record lines (separators, digits, spaces, line breaks
        inserted or deleted) never make the scan differ from the line-by-line reading."""
        for text in edited_records(seed=12, n=600):
            assert parse_records(text) == records_line_by_line(text), text


class TestCountRecords:
    """`count_records(text, label)` must equal counting `parse_records(text)`'s categories,
    which the simulator's sub model did before it counted in one scan."""

    @staticmethod
    def counted(text: str) -> dict[str, int]:
        return {label: count_records(text, label) for label in (*CATEGORIES, "no-such-label")}

    @staticmethod
    def by_lines(text: str) -> dict[str, int]:
        records = records_line_by_line(text)
        return {label: sum(1 for _, c in records if c == label) for label in (*CATEGORIES, "no-such-label")}

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_generated_contexts_and_their_chunks_count_as_their_lines_do(self, seed: int) -> None:
        """Whole generated contexts (counting and pairs), and chunks cut anywhere in them."""
        texts = [
            text_of(oolong_counting("64k", seed=seed).context),
            text_of(oolong_pairs("32k", seed=seed).context),
            text_of(oolong_counting("16k", seed=seed, shape="list").context),
        ]
        rng = Random(seed)
        for text in texts[:]:
            for _ in range(20):
                start = rng.randrange(len(text))
                texts.append(text[start : start + rng.randint(1, 20_000)])
        for text in texts:
            counted = self.counted(text)
            assert counted == self.by_lines(text)
        assert sum(self.counted(texts[0]).values()) > 500

    def test_texts_a_scan_could_misread_count_as_their_lines_do(self) -> None:
        """The odd texts that `parse_records` is checked on, alone and around a real record,
        plus ids too long for `int()` and a stray "|" inside a question."""
        real = "Date: Jan 01, 2023 || User: 7 || Instance: " + next(iter(_questions()))
        odd = [
            "",
            "Date: x || User: 12 || Instance: q || extra",
            "Date: x || || User: 12 || Instance: q",
            "a || b\nDate: x || User: 12 || Instance: q",
            "Date: x || User: 12 || Instance: q\r\nDate: y || User: 13 || Instance: r",
            "Date: x || User: 12 || Instance: q\u2028Date: y || User: 13 || Instance: r",
            "|| User: 12 || Instance: q\n || User: 13 || Instance: r\n",
            "Date: x || User: \u0661\u0662 || Instance: q",
            real.replace("User: 7", "User: " + "7" * 5000),  # int() refuses over 4,300 digits by default
            real.replace("User: 7", "User: " + "7" * 641),  # the scan takes 640 at most
            real + " | ",
            "   " + real + "  \t",
        ]
        for text in odd:
            for sample in (text, text + "\n" + real, real + "\n" + text):
                assert self.counted(sample) == self.by_lines(sample), sample

    def test_an_id_int_refuses_is_no_record_for_either(self) -> None:
        """A 5,000-digit user id (over `int()`'s default limit) makes its line no record, in
        `parse_records` too (the scan used to hand it to `int()`, which raised)."""
        line = "Date: Jan 01, 2023 || User: " + "7" * 5000 + " || Instance: " + next(iter(_questions()))
        assert parse_records(line) == records_line_by_line(line) == []
        assert count_records(line, classify_question(line.rsplit("Instance: ", 1)[1]) or "") == 0

    def test_random_edits_of_records_count_as_their_lines_do(self) -> None:
        """Seeded random edits of real record lines, as for `parse_records`."""
        for text in edited_records(seed=13, n=400):
            assert self.counted(text) == self.by_lines(text), text


def _questions() -> dict[str, None]:
    text = text_of(oolong_counting("8k", seed=2).context)
    return {line.rsplit("Instance: ", 1)[1]: None for line in text.split("\n")}
