# Over 500 lines: three generators that share one record format and one query parser.
"""Seeded synthetic long-context workloads, each with its ground truth and a scorer.

    from rlm_async.workloads import s_niah, oolong_counting, oolong_pairs

    w = s_niah(1_000_000, seed=3)        # about 1M tokens (4 MB of text)
    w.context, w.query, w.truth          # what to run, and the right answer
    w.score("The number is 4821937.")    # -> bool

Three tasks whose cost grows differently with the context (the RLM paper's axis):

- **S-NIAH** (`s_niah`): one needle line ("One of the special magic numbers for amber-falcon
  is: 4821937.") in filler prose. Constant work: one chunk holds the answer.
- **OOLONG-like counting** (`oolong_counting`): one record per line ("Date: ... || User: ...
  || Instance: <a question>"); each question belongs to one of six TREC-coarse categories
  that is *not written down* — it follows from the question's wording. "How many records
  belong to category X?" needs every chunk: linear.
- **OOLONG-Pairs-like** (`oolong_pairs`): the same records; "list every pair of users who
  both have a record in category X or Y": the answer is quadratic in the qualifying users.

Sizes are in the simulator's tokens (4 characters each, see `rlm_async.sim`), from 8K to
10M (40 MB); generation joins seeded, pre-built pieces, so even 10M tokens takes seconds.
Every context can also be shaped as a list of documents or a dict of named documents.

The categories are decided by templates this module owns: `classify_question` is the
oracle that the simulator's scripted sub-model uses to "read" a record. Not a benchmark of
real model quality: the data are synthetic and the oracle is exact.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from itertools import combinations
from random import Random
from typing import Any, Literal

__all__ = [
    "CATEGORIES",
    "SIZES",
    "WORKLOADS",
    "CountingWorkload",
    "NiahWorkload",
    "PairsWorkload",
    "QueryTask",
    "Workload",
    "classify_question",
    "count_records",
    "find_needle",
    "make_workload",
    "oolong_counting",
    "oolong_pairs",
    "parse_query",
    "parse_record",
    "parse_records",
    "parse_size",
    "s_niah",
]

CHARS_PER_TOKEN = 4  # the simulator's tokenizer; kept here so this module imports nothing of ours

Shape = Literal["str", "list", "dict"]
Context = str | list[str] | dict[str, str]

SIZES: dict[str, int] = {
    "8k": 8_192,
    "16k": 16_384,
    "32k": 32_768,
    "64k": 65_536,
    "128k": 131_072,
    "256k": 262_144,
    "512k": 524_288,
    "1m": 1_000_000,
    "2m": 2_000_000,
    "5m": 5_000_000,
    "10m": 10_000_000,
}
"""The usual ladder of context sizes, in tokens."""


def parse_size(text: str | int) -> int:
    """ "128k" -> 131072, "10m" -> 10_000_000, "5000" -> 5000 (tokens)."""
    if isinstance(text, int):
        return text
    t = text.strip().lower().replace("_", "")
    if t in SIZES:
        return SIZES[t]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", t)
    if m is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 8k, 128k, 1m, 10m or a number of tokens)")
    scale = {"": 1, "k": 1024, "m": 1_000_000}[m.group(2)]
    return int(float(m.group(1)) * scale)


# ================================================================ base


@dataclass(frozen=True, kw_only=True)
class Workload(ABC):
    """One generated task instance."""

    name: str
    """e.g. "s-niah-128k"."""
    context: Context = field(repr=False)
    query: str
    truth: Any
    """The right answer (type depends on the task)."""
    tokens: int
    """The requested size, in simulator tokens; the context is within a few percent of it."""
    seed: int

    @property
    def context_chars(self) -> int:
        c = self.context
        if isinstance(c, str):
            return len(c)
        values = c.values() if isinstance(c, dict) else c
        return sum(len(v) for v in values)

    @abstractmethod
    def score(self, answer: str | None) -> bool:
        """Whether `answer` (a final answer's text) is right."""


def _shape(docs: list[str], shape: Shape) -> Context:
    if shape == "str":
        return "\n".join(docs)
    if shape == "list":
        return docs
    if shape == "dict":
        return {f"doc_{i:05d}": d for i, d in enumerate(docs)}
    raise ValueError(f"shape must be 'str', 'list' or 'dict', got {shape!r}")


# ================================================================ S-NIAH

_ADJ = (
    "amber quiet northern silver hollow bright patient crooked gentle distant narrow ancient "
    "restless golden pale bitter hidden steady woven frozen tidal scarlet humble lucid"
).split()
_NOUN = (
    "falcon harbour lantern orchard meadow river engine archive valley compass garden tower "
    "bridge ledger forest signal canyon market island monastery quarry beacon furnace glacier"
).split()
_VERB = (
    "follows guards crosses remembers outlasts shelters measures circles mirrors awaits "
    "divides gathers carries echoes"
).split()
_PREP = "near beyond beneath across behind above around within toward".split()

_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_NIAH_QUERY = (
    "What is the special magic number for {key} mentioned in the provided text? Answer with the number only."
)
_NIAH_QUERY_RE = re.compile(r"What is the special magic number for (\S+) mentioned in the provided text\?")

_BLOCK_CHARS = 8_192
_DISTINCT_BLOCKS = 64


def _filler_block(rng: Random) -> str:
    """About `_BLOCK_CHARS` of prose: lines (paragraphs) of 4-8 sentences."""
    lines: list[str] = []
    size = 0
    while size < _BLOCK_CHARS:
        sentences = []
        for _ in range(rng.randint(4, 8)):
            a1, a2 = rng.choice(_ADJ), rng.choice(_ADJ)
            n1, n2, n3 = rng.choice(_NOUN), rng.choice(_NOUN), rng.choice(_NOUN)
            sentences.append(f"The {a1} {n1} {rng.choice(_VERB)} the {a2} {n2} {rng.choice(_PREP)} the {n3}.")
        line = " ".join(sentences)
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def _filler_docs(rng: Random, chars: int) -> list[str]:
    """Documents (filler blocks drawn from a seeded set) totalling about `chars` when joined
    with newlines; the last one is cut at a line boundary."""
    blocks = [_filler_block(rng) for _ in range(_DISTINCT_BLOCKS)]
    mean = sum(len(b) + 1 for b in blocks) / len(blocks)
    order = rng.choices(range(len(blocks)), k=max(1, int(chars / mean) + 2))
    docs: list[str] = []
    total = 0
    for i in order:
        block = blocks[i]
        room = chars - total
        if room <= 0:
            break
        if len(block) >= room:
            cut = block.rfind("\n", 0, room)
            block = block[: cut if cut > 0 else room]
        docs.append(block)
        total += len(block) + 1
    return docs


@dataclass(frozen=True, kw_only=True)
class NiahWorkload(Workload):
    key: str
    depth: float
    """Where the needle sits, as a fraction of the context."""

    def score(self, answer: str | None) -> bool:
        return answer is not None and str(self.truth) in re.findall(r"\d+", answer.replace(",", ""))


def s_niah(
    tokens: int | str = 8_192, *, seed: int = 0, depth: float | None = None, shape: Shape = "str"
) -> NiahWorkload:
    """Single needle in a haystack: find one 7-digit number keyed by a two-word key."""
    n_tokens = parse_size(tokens)
    rng = Random(f"s-niah/{seed}")
    key = f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"
    value = rng.randrange(1_000_000, 10_000_000)
    needle = _NEEDLE.format(key=key, value=value)
    where = rng.random() if depth is None else depth
    if not 0.0 <= where <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    docs = _filler_docs(rng, max(1, n_tokens * CHARS_PER_TOKEN - len(needle) - 1))
    j = min(len(docs) - 1, int(where * len(docs)))
    doc = docs[j]
    # Inside the document, at a line boundary, so the needle is a line of its own.
    offset = int((where * len(docs) - j) * len(doc)) if len(docs) > 1 else int(where * len(doc))
    cut = doc.rfind("\n", 0, offset)
    if cut < 0:
        docs[j] = needle + "\n" + doc
    else:
        docs[j] = doc[: cut + 1] + needle + "\n" + doc[cut + 1 :]
    return NiahWorkload(
        name=f"s-niah-{_size_name(n_tokens)}",
        context=_shape(docs, shape),
        query=_NIAH_QUERY.format(key=key),
        truth=value,
        tokens=n_tokens,
        seed=seed,
        key=key,
        depth=where,
    )


# ================================================================ OOLONG-like records

CATEGORIES: tuple[str, ...] = ("abbreviation", "entity", "description", "human", "location", "numeric")
"""TREC's coarse question classes, which OOLONG's trec_coarse split labels records with."""

_WEIGHTS = (0.04, 0.22, 0.22, 0.2, 0.15, 0.17)

_SLOTS: dict[str, tuple[str, ...]] = {
    "ABBR": ("NASA", "UNESCO", "RSVP", "DNA", "GDP", "HTML", "NATO", "OPEC", "LASER", "SCUBA", "CPU", "FIFA"),
    "ORG": ("the Red Cross", "the World Bank", "the national library", "the city council", "the opera house"),
    "FIELD": ("medicine", "aviation", "chemistry", "finance", "sailing", "computing"),
    "ANIMAL": ("dog", "horse", "parrot", "goat", "falcon", "camel", "pony", "cat"),
    "ANIMALS": ("geese", "whales", "butterflies", "salmon", "swallows", "caribou"),
    "PURPOSE": ("herding", "guarding a farm", "long rides", "company", "racing"),
    "INSTRUMENT": ("guitar", "cello", "drum", "flute", "harp", "trumpet"),
    "THING": ("sword", "ship", "castle", "dragon", "ring", "horse"),
    "STORY": ("old legend", "fairy tale", "saga", "ballad", "epic poem"),
    "COUNTRY": ("Peru", "Norway", "Kenya", "Japan", "Chile", "Greece", "Canada", "Egypt"),
    "CONCEPT": ("tariff", "glacier", "sonnet", "vaccine", "mortgage", "eclipse", "monsoon", "allele"),
    "DEVICE": ("telescope", "barometer", "steam engine", "printing press", "compass", "microscope"),
    "SEASON": ("autumn", "spring", "winter"),
    "ROLE": ("president", "governor", "astronaut", "chancellor", "mayor"),
    "ADJ": tuple(_ADJ),
    "NOUN": tuple(_NOUN),
    "LANDMARK": (
        "Golden Gate Bridge",
        "Alhambra",
        "Colosseum",
        "Angkor Wat",
        "Table Mountain",
        "Eiffel Tower",
    ),
    "EVENT": ("next Olympic Games", "world fair", "film festival", "chess olympiad", "book fair"),
    "CITY": ("Lima", "Oslo", "Nairobi", "Kyoto", "Santiago", "Athens", "Toronto", "Cairo", "Lyon", "Porto"),
    "PLACE": ("train station", "post office", "hospital", "museum", "harbour"),
    "THINGS": ("bones", "keys", "cards", "teeth", "strings", "players"),
    "CONTAINER": ("human hand", "piano", "deck", "team", "violin"),
    "YEAR": ("1990", "2001", "2010", "2020"),
}

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "abbreviation": (
        "What does {ABBR} stand for?",
        "What is the full form of {ABBR}?",
        "What does the abbreviation {ABBR} mean in {FIELD}?",
        "What is the short name used for {ORG}?",
    ),
    "entity": (
        "What kind of {ANIMAL} is best for {PURPOSE}?",
        "Which {INSTRUMENT} did the band use on their {ADJ} album?",
        "What is the name of the {THING} in the {STORY}?",
        "Which colour appears on the flag of {COUNTRY}?",
        "What breed of {ANIMAL} was kept at the {ADJ} {NOUN}?",
    ),
    "description": (
        "What is a {CONCEPT}?",
        "How does a {DEVICE} work?",
        "Why do {ANIMALS} migrate in {SEASON}?",
        "What is the difference between a {CONCEPT} and a {DEVICE}?",
        "What causes a {CONCEPT} to form?",
    ),
    "human": (
        "Who invented the {DEVICE}?",
        "Who wrote the novel about the {ADJ} {NOUN}?",
        "Who was the first {ROLE} of {COUNTRY}?",
        "Which {ROLE} opened the {ADJ} {NOUN}?",
        "Who painted the {ADJ} {NOUN} that hangs in {CITY}?",
    ),
    "location": (
        "Where is the {LANDMARK} located?",
        "Which city will host the {EVENT}?",
        "In which country is {CITY}?",
        "Where is the nearest {PLACE} to the {ADJ} {NOUN}?",
        "What river flows through {CITY}?",
    ),
    "numeric": (
        "How many {THINGS} are in a {CONTAINER}?",
        "When was the {DEVICE} invented?",
        "How far is {CITY} from {COUNTRY}?",
        "What is the population of {CITY}?",
        "How much did a {DEVICE} cost in {YEAR}?",
    ),
}

_POOL_PER_CATEGORY = 300
_SLOT_RE = re.compile(r"\{([A-Z]+)\}")
_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
_DATES = tuple(f"{m} {d:02d}, {y}" for y in (2022, 2023, 2024) for m in _MONTHS for d in range(1, 29))


@cache
def _question_pools() -> tuple[tuple[tuple[str, ...], ...], dict[str, str]]:
    """Per category, a fixed pool of distinct questions; and question -> category.
    Seeded independently of any workload, so the oracle is the same for all of them."""
    rng = Random("oolong-question-pool")
    pools: list[tuple[str, ...]] = []
    labels: dict[str, str] = {}
    for category in CATEGORIES:
        seen: dict[str, None] = {}
        templates = _TEMPLATES[category]
        attempts = 0
        while len(seen) < _POOL_PER_CATEGORY and attempts < 50 * _POOL_PER_CATEGORY:
            attempts += 1
            template = rng.choice(templates)
            q = _SLOT_RE.sub(lambda m: rng.choice(_SLOTS[m.group(1)]), template)
            seen[q] = None
        for q in seen:
            if labels.setdefault(q, category) != category:
                raise AssertionError(f"question {q!r} generated for two categories")
        distinct = tuple(seen)
        # Equal-sized pools (repeating where a category has fewer distinct questions) let
        # one bulk draw of indices serve every category.
        pools.append((distinct * -(-_POOL_PER_CATEGORY // len(distinct)))[:_POOL_PER_CATEGORY])
    return tuple(pools), labels


def classify_question(question: str) -> str | None:
    """The category of a question from this module's pool, or `None` if it is not one.
    This is the oracle behind the simulator's sub-model: the "semantics" of a record."""
    return _question_pools()[1].get(question.strip())


def parse_record(line: str) -> tuple[int, str | None] | None:
    """(user id, category) of one record line, or `None` if the line is not a record."""
    parts = line.split(" || ")
    if len(parts) != 3 or not parts[1].startswith("User: ") or not parts[2].startswith("Instance: "):
        return None
    try:
        user = int(parts[1][6:])
    except ValueError:
        return None
    return user, classify_question(parts[2][10:])


# A record's user and question, found by one C-level scan of a whole text instead of a
# Python loop over its lines (the simulator's sub-model reads every chunk of a fan-out this
# way: the loop was most of its CPU per request). `$` is not needed: `[^\n]*` stops at the
# line's end. At most 640 digits: `int()` may refuse more (640 is the lowest limit
# `sys.set_int_max_str_digits` accepts), and a longer id leaves its line's separators
# unmatched, so `_plain_scan` falls back to the line loop, which asks `int()`.
_RECORD_TAIL = re.compile(r" \|\| User: (\d{1,640}) \|\| Instance: ([^\n]*)")
_RECORD_QUESTION = re.compile(r" \|\| User: \d{1,640} \|\| Instance: ([^\n]*)")
# What `str.splitlines` breaks lines at, besides "\n".
_OTHER_LINE_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def parse_records(text: str) -> list[tuple[int, str | None]]:
    """`parse_record` of each line of `text`, the lines that are not records left out:
    exactly `[r for line in text.splitlines() if (r := parse_record(line)) is not None]`.

    One regex scan finds the records when the text is plain (its lines end in "\n" only,
    and every "|" in it belongs to the two separators of a line the scan matched); otherwise
    it falls back to that line-by-line loop, so the result is the same for any text."""
    found = _plain_scan(_RECORD_TAIL, text)
    if found is None:
        return [r for line in text.splitlines() if (r := parse_record(line)) is not None]
    if not found:
        return []
    users, questions = zip(*found, strict=True)
    # map() over C functions: no Python frame per record.
    return list(zip(map(int, users), map(_question_pools()[1].get, map(str.strip, questions)), strict=True))


def count_records(text: str, label: str) -> int:
    """How many lines of `text` are records of category `label`: exactly
    `sum(1 for _, category in parse_records(text) if category == label)`, with no Python
    step per record (the simulator's sub-model answers a COUNT sub-call with it)."""
    questions: list[str] | None = _plain_scan(_RECORD_QUESTION, text)
    if questions is None:
        return sum(1 for _, category in parse_records(text) if category == label)
    return sum(map(_questions_of(label).__contains__, map(str.strip, questions)))


@cache
def _questions_of(label: str) -> frozenset[str]:
    """The pool's questions of one category: `q in _questions_of(c)` is `classify_question(q) == c`
    for a stripped `q`."""
    return frozenset(q for q, category in _question_pools()[1].items() if category == label)


def _plain_scan(pattern: re.Pattern[str], text: str) -> Any:
    """`pattern.findall(text)` (the record-tail pattern, with or without its user group), if
    that scan is exact for this text; else `None`."""
    if any(c in text for c in _OTHER_LINE_BREAKS):
        return None  # lines `splitlines` cuts where a regex does not
    found = pattern.findall(text)
    # Each match holds two separators " || ", four "|" in all, and a line holds at most one
    # match (the question runs to the line's end). If the text has no other "|", no line has
    # a third separator or a separator outside a match, and no two separators overlap
    # (" || || "), so each matched line splits into exactly the three fields that
    # `parse_record` checks, and no unmatched line splits at all. (Counting "|" rather than
    # " || ": one character is counted about twice as fast; a stray "|" only costs the
    # fallback.)
    if text.count("|") != 4 * len(found):
        return None
    return found


_RECORD_PREAMBLE = (
    "The context is a list of records, one per line, each a question that a user asked a help desk, "
    "written as 'Date: ... || User: <id> || Instance: <question>'. Every question belongs to exactly one "
    f"of these categories: {', '.join(CATEGORIES)}. The category is not written in the record; it "
    "follows from what the question asks."
)
_COUNT_QUERY = (
    _RECORD_PREAMBLE + " How many records belong to the category '{label}'? Answer with a single integer."
)
_COUNT_QUERY_RE = re.compile(r"How many records belong to the category '(\w+)'\?")
_PAIRS_QUERY = (
    _RECORD_PREAMBLE + " List every pair of user IDs, lower ID first and no pair twice, such that both users "
    "have at least one record in the category '{a}' or '{b}'. Write the pairs as (a, b) separated by "
    "commas; if there are none, answer NONE."
)
_PAIRS_QUERY_RE = re.compile(
    r"such that both users have at least one record in the category '(\w+)' or '(\w+)'\."
)


def _mean_record_chars() -> float:
    pools, _ = _question_pools()
    q_mean = sum(len(q) for pool in pools for q in pool) / sum(len(p) for p in pools)
    return len("Date: Jan 01, 2023 || User: 12345 || Instance: ") + q_mean + 1


def _records(rng: Random, n: int, users: list[int], label_idx: list[int], user_idx: list[int]) -> list[str]:
    pools, _ = _question_pools()
    q_idx = rng.choices(range(_POOL_PER_CATEGORY), k=n)
    d_idx = rng.choices(range(len(_DATES)), k=n)
    dates = _DATES
    return [
        f"Date: {dates[d]} || User: {users[u]} || Instance: {pools[c][q]}"
        for d, u, c, q in zip(d_idx, user_idx, label_idx, q_idx, strict=True)
    ]


def _record_docs(lines: list[str], per_doc: int) -> list[str]:
    return ["\n".join(lines[i : i + per_doc]) for i in range(0, len(lines), per_doc)]


@dataclass(frozen=True, kw_only=True)
class CountingWorkload(Workload):
    label: str
    n_records: int

    def score(self, answer: str | None) -> bool:
        if answer is None:
            return False
        numbers = re.findall(r"-?\d+", answer.replace(",", ""))
        return bool(numbers) and int(numbers[0]) == self.truth


def oolong_counting(
    tokens: int | str = 32_768,
    *,
    seed: int = 0,
    label: str | None = None,
    shape: Shape = "str",
    records_per_doc: int = 200,
) -> CountingWorkload:
    """Count the records of one category; every chunk matters (linear work)."""
    n_tokens = parse_size(tokens)
    rng = Random(f"oolong/{seed}")
    target = label if label is not None else rng.choice(CATEGORIES[1:])
    if target not in CATEGORIES:
        raise ValueError(f"label must be one of {CATEGORIES}, got {target!r}")
    n = max(1, int(n_tokens * CHARS_PER_TOKEN / _mean_record_chars()))
    users = rng.sample(range(10_000, 100_000), max(10, min(5_000, n // 10)))
    label_idx = rng.choices(range(len(CATEGORIES)), weights=_WEIGHTS, k=n)
    user_idx = rng.choices(range(len(users)), k=n)
    lines = _records(rng, n, users, label_idx, user_idx)
    truth = Counter(label_idx)[CATEGORIES.index(target)]
    docs = lines if shape == "str" else _record_docs(lines, records_per_doc)
    return CountingWorkload(
        name=f"oolong-{_size_name(n_tokens)}",
        context=_shape(docs, shape),
        query=_COUNT_QUERY.format(label=target),
        truth=truth,
        tokens=n_tokens,
        seed=seed,
        label=target,
        n_records=n,
    )


_PAIR_LABEL_CHOICES = (
    ("abbreviation", "location"),
    ("abbreviation", "numeric"),
    ("location", "numeric"),
    ("human", "abbreviation"),
)


@dataclass(frozen=True, kw_only=True)
class PairsWorkload(Workload):
    labels: tuple[str, str]
    qualifying_users: tuple[int, ...]

    def found_pairs(self, answer: str | None) -> set[tuple[int, int]]:
        if answer is None:
            return set()
        found = re.findall(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)", answer)
        return {(min(int(a), int(b)), max(int(a), int(b))) for a, b in found}

    def f1(self, answer: str | None) -> float:
        found, truth = self.found_pairs(answer), set(self.truth)
        if not found and not truth:
            return 1.0
        hit = len(found & truth)
        if hit == 0:
            return 0.0
        precision, recall = hit / len(found), hit / len(truth)
        return 2 * precision * recall / (precision + recall)

    def score(self, answer: str | None) -> bool:
        """Exactly the right set of pairs (order and spacing do not matter)."""
        if answer is None:
            return False
        if not self.truth:
            return not self.found_pairs(answer) and "NONE" in answer.upper()
        return self.found_pairs(answer) == set(self.truth)


def oolong_pairs(
    tokens: int | str = 32_768,
    *,
    seed: int = 0,
    labels: tuple[str, str] | None = None,
    n_users: int | None = None,
    qualifying_fraction: float = 0.1,
    shape: Shape = "str",
    records_per_doc: int = 200,
) -> PairsWorkload:
    """Pairs of users who both have a record in either of two categories (quadratic answer).

    Records of those two categories are written only by a seeded `qualifying_fraction` of
    the users, so the answer stays a manageable size as the context grows (by default at most
    40 users, 780 pairs)."""
    n_tokens = parse_size(tokens)
    rng = Random(f"oolong-pairs/{seed}")
    a, b = labels if labels is not None else rng.choice(_PAIR_LABEL_CHOICES)
    if a not in CATEGORIES or b not in CATEGORIES or a == b:
        raise ValueError(f"labels must be two different categories of {CATEGORIES}, got {(a, b)}")
    n = max(2, int(n_tokens * CHARS_PER_TOKEN / _mean_record_chars()))
    count = n_users if n_users is not None else max(20, min(400, n // 5))
    users = rng.sample(range(10_000, 100_000), count)
    chosen = rng.sample(range(count), max(2, round(qualifying_fraction * count)))
    label_idx = rng.choices(range(len(CATEGORIES)), weights=_WEIGHTS, k=n)
    any_user = rng.choices(range(count), k=n)
    q_user = rng.choices(chosen, k=n)
    ia, ib = CATEGORIES.index(a), CATEGORIES.index(b)
    target = {ia, ib}
    # Target-category records come from qualifying users only; others from anyone.
    user_idx = [qu if c in target else au for c, qu, au in zip(label_idx, q_user, any_user, strict=True)]
    lines = _records(rng, n, users, label_idx, user_idx)
    qualifying = sorted({users[u] for c, u in zip(label_idx, user_idx, strict=True) if c in target})
    truth = frozenset(combinations(qualifying, 2))
    docs = lines if shape == "str" else _record_docs(lines, records_per_doc)
    return PairsWorkload(
        name=f"oolong-pairs-{_size_name(n_tokens)}",
        context=_shape(docs, shape),
        query=_PAIRS_QUERY.format(a=a, b=b),
        truth=truth,
        tokens=n_tokens,
        seed=seed,
        labels=(a, b),
        qualifying_users=tuple(qualifying),
    )


# ================================================================ recognising queries


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryTask:
    """What a query asks, as the simulator's scripted root model understands it."""

    kind: Literal["niah", "count", "pairs"]
    key: str | None = None
    label: str | None = None
    labels: tuple[str, ...] = ()


def parse_query(text: str) -> QueryTask | None:
    """Recognise a query written by one of this module's generators; `None` otherwise."""
    m = _NIAH_QUERY_RE.search(text)
    if m:
        return QueryTask(kind="niah", key=m.group(1))
    m = _PAIRS_QUERY_RE.search(text)
    if m:
        return QueryTask(kind="pairs", labels=(m.group(1), m.group(2)))
    m = _COUNT_QUERY_RE.search(text)
    if m:
        return QueryTask(kind="count", label=m.group(1))
    return None


def find_needle(text: str, key: str) -> int | None:
    """The magic number for `key` in `text`, if its needle line is there."""
    m = re.search(r"special magic numbers? for " + re.escape(key) + r" is:? (\d+)", text)
    return int(m.group(1)) if m else None


# ================================================================ registry

WORKLOADS = {"s-niah": s_niah, "oolong": oolong_counting, "oolong-pairs": oolong_pairs}


def make_workload(name: str, tokens: int | str, *, seed: int = 0, **options: Any) -> Workload:
    """Build a workload by registry name: "s-niah", "oolong" or "oolong-pairs"."""
    try:
        factory = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}") from None
    result: Workload = factory(tokens, seed=seed, **options)  # type: ignore[operator]
    return result


def _size_name(tokens: int) -> str:
    for name, size in SIZES.items():
        if size == tokens:
            return name
    return str(tokens)
