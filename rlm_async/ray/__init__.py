"""Batches on a Ray cluster: the local batch's input and output, run by async Ray actors
under one rate limit and one budget for the whole cluster.

    import ray
    from rlm_async.ray import run_file_ray
    ray.init(address="auto")
    summary, figures = await run_file_ray(config, Path("in.jsonl"), Path("out.jsonl"), actors=8)

or `rlm-async batch in.jsonl --out out.jsonl --ray [ADDRESS]`. The optional extra
(`pip install "rlm-async[ray]"`); importing this package without Ray installed works, and
`run_file_ray` then says how to install it. The pieces: paced rate leases (`_pacing`,
`_coordinator.Coordinator`, the actors' `_pool`), the batch budget's leases
(`_budget_book`, `BudgetKeeper`), the journal that survives a node (`_journal_store`), the
query actor (`_actor`), the driver (`_driver`), and the token of a one-machine Ray
(`_local`). See docs/scale.md. Sits on top of
`rlm_async.batch`; nothing below imports it.
"""

from ._budget_book import BudgetBook
from ._coordinator import BudgetKeeper, Coordinator
from ._driver import RayFigures, run_file_ray
from ._local import local_token
from ._pacing import PacedGrants, Pacing

__all__ = [
    "BudgetBook",
    "BudgetKeeper",
    "Coordinator",
    "PacedGrants",
    "Pacing",
    "RayFigures",
    "local_token",
    "run_file_ray",
]
