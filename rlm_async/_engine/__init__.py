"""The RLM loop as an async task tree, split by job so each question has one module:

- `engine`   what queries share: configuration, transports, the governor, the journal;
- `query`    one query: its deadline, how it ended, the result it returns;
- `turns`    one RLM node's turn loop: root call, run the reply's cells, feedback, final call;
- `fanout`   the sub-calls a cell asks for: planning, warm-up gating, child RLMs;
- `calls`    the choke point every model call passes: journal -> governor -> transport -> record
             (a sub-call's budget is reserved in the governor, called from `calls`);
- `state`    the bookkeeping of one query that all of the above write to;
- `outcome`  named outcomes instead of tuples.
"""

from .engine import Engine

__all__ = ["Engine"]
