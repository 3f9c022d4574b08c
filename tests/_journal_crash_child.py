"""A child process for the journal's durability tests (not a test module itself).

    python tests/_journal_crash_child.py PATH TAG COUNT CONCURRENCY

Writes COUNT completions to the journal at PATH, CONCURRENCY `put`s at a time, keyed
"TAG-<i>", and prints "committed TAG-<i>" (flushed) only after each `put` has returned.
The parent may `kill -9` it at any moment: every key printed must then be in the file.
"""

from __future__ import annotations

import sys

import anyio

from rlm_async._journal import Journal
from rlm_async._types import Completion, Usage


def completion_for(key: str) -> Completion:
    """What the child writes under `key`, so the parent can check content, not just presence."""
    return Completion(text=f"answer for {key} " + "x" * 300, usage=Usage(1000, 80, 0), model="child-model")


async def main(path: str, tag: str, count: int, concurrency: int) -> None:
    journal = await Journal.open(path)
    indices = iter(range(count))

    async def writer() -> None:
        # Workers pull the next index, so COUNT can be huge without a task per row.
        for i in indices:
            key = f"{tag}-{i}"
            await journal.put(key, completion_for(key))
            sys.stdout.write(f"committed {key}\n")
            sys.stdout.flush()

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(writer)
    await journal.aclose()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
