"""The scripted root models the session tests share: `test_sessions.py` runs them under
rlm_async, `test_official_sessions.py` under the official package as well. Each is a list
of replies the simulator's `script` policy gives in turn (the last one repeated)."""

from __future__ import annotations

from typing import Any

from rlm_async.sim import Policies, PolicySpec, SimConfig

__all__ = ["VARIABLES", "scripted", "steps"]

VARIABLES = """```repl
try:
    calls += 1
except NameError:
    calls = 1
names = sorted(n for n in dir() if n.startswith(("context", "history")))
answer["content"] = f"call {calls}: {names}"
answer["ready"] = True
```"""
"""Every call: count the calls this REPL has seen and list its context/history variables."""


def steps(words: str, times: int, *, until: int) -> str:
    """A reply that counts its turns in `step` and prints `words` `times` over each turn, so
    the conversation grows past a small window; on turn `until` it answers with the count
    and how many turns and summaries the REPL's `history` holds."""
    return f"""```repl
try:
    step += 1
except NameError:
    step = 1
print(f"step {{step}}: " + "{words}" * {times})
if step >= {until}:
    answer["content"] = f"{{step}} steps; history: {{len(history)}} entries, {{sum(isinstance(h, dict) for h in history)}} summaries"
    answer["ready"] = True
```"""


def scripted(*replies: str, **options: Any) -> SimConfig:
    """The simulator with root and sub models both giving `replies` in turn; `options` go
    to the `script` policy (`by_query`, `on_last_user`, ...)."""
    spec = PolicySpec(name="script", options={"replies": list(replies), **options})
    return SimConfig(policies=Policies(root=spec, other=spec))
