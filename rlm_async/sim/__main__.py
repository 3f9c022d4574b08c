"""`python -m rlm_async.sim`: the simulated model server (see `rlm_async.sim`)."""

from .server import main

raise SystemExit(main())
