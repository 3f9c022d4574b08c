"""The response journal: a SQLite file of completed model calls, so a call made once is
never paid for twice — across a crash, a re-run, or identical calls in flight together.

    journal = await Journal.open("run.journal")
    completion, from_journal = await journal.call(request, send)
    ...
    await journal.aclose()

What it is:

* **Keyed by what was asked.** `key()` hashes every field of `ModelRequest` that can
  change the answer (model, messages, temperature, max_tokens, and any field added later),
  but not `prompt_cache_key`, which only routes the request, and not the endpoint's URL:
  where a request travelled (a port picked at random, a proxy, `localhost` or `127.0.0.1`)
  is not part of what was asked, so a re-run against a restarted server still finds its
  calls. A journal file therefore belongs to one deployment of each model name: two
  servers that serve different weights under the same model name must not share a file.
  One line is left out of the key: the root prompt's `[budget left: …]` note
  (`keys.budget_note`), whose figures change from run to run when queries share a budget,
  so a resumed query's later root turns still find what the first run paid for.
* **A re-run replays the run.** A greedy call (`temperature == 0`) is one answer, however
  often it is asked. A sampled call (`temperature` unset or above 0) is one draw: the n-th
  identical sampled call made through an open journal is keyed as the n-th occurrence, so
  five identical sampled sub-calls stay five different answers, and a re-run (or a resume
  after a crash) gets the same five back instead of paying for them again. That is the
  default (`reuse_nondeterministic=True`): a journal is asked for to never pay twice, and
  some models (OpenAI's reasoning models) accept no temperature but their default. With
  `reuse_nondeterministic=False` only greedy calls are looked up; sampled ones are sent
  afresh every time, and recorded, so a later run can still replay them. The first row
  written for a key wins; later ones are ignored, so a replay is stable.
* **Single-flight.** Identical greedy calls in flight together are sent once; the others
  wait for that one. If it fails or is cancelled, a waiting call takes over and sends, so
  nothing hangs and nothing is lost. (Within one process: two processes sharing a file may
  both send the same call; the first row written wins.)
* **Durable per call.** `put()` returns only after its row is committed with the WAL
  fsynced (`synchronous=FULL`), so a `kill -9` — or a power cut — loses only calls still
  in flight. Rows that arrive together are committed together, in one transaction and one
  fsync, by whichever writer gets there first ("group commit"), so 1,000 calls finishing
  within a second cost a handful of fsyncs, not 1,000. Reads are grouped the same way.
  Blocking SQLite work runs in worker threads, never on the event loop.
* **Shareable.** Several queries in one process share one `Journal`; several processes can
  open the same file (WAL mode: readers never wait; writers wait up to `busy_timeout_s`).
  The file must be on a local filesystem: WAL needs shared memory, which network
  filesystems do not provide reliably.
* **Never silently foreign.** The file carries `PRAGMA application_id` ("RLMJ") and a
  schema version. A text file, a truncated or corrupt file, a SQLite database of another
  application, or a journal of another schema version raises `JournalError` naming the
  path and the fix; a foreign file is never modified.

What it is not: a cache with expiry or size limits (delete the file to start afresh), or
a record of failed calls (only completions are stored; errors are never replayed). The
rate-limit headers of a stored completion are not kept: they described the server at the
time and would mislead the governor on replay.
"""

from ._files import APPLICATION_ID, SCHEMA_VERSION
from .journal import Journal
from .keys import occurrence_key, request_key

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "Journal", "occurrence_key", "request_key"]
