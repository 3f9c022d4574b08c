"""The governor: the choke point every model call passes through.

Run-wide limits per endpoint+model (`_limits`, `_token_bucket`), exactly one retry layer
(`_retry`, tenacity), per-query and per-process budgets reserved before spending
(`_budget`), token estimates that bound what a call can use (`_estimate`), and the price
table (`_prices`, genai-prices). This package is the only place that imports tenacity and
genai-prices. aiolimiter is not used: its waiters are served smallest first (a large
acquire starves), it cannot refund, and it reads the asyncio loop's clock, so a FIFO bucket
of our own meters both requests and tokens.
"""

from ._budget import BudgetLedger, BudgetLimits, Charge, LedgerLog, Reservation, Room
from ._clock import Clock, ManualClock, Sleep, wait_until_idle
from ._core import CallPlan, CallTally, GovernedCompletion, Governor, GovernorConfig
from ._estimate import CharsPerTokenEstimator, TokenEstimator, TokenizerEstimator, Utf8BytesEstimator
from ._limits import EndpointLimits, LimitState, PauseGate, RequestTooLarge
from ._prices import ModelPrice, PriceTable
from ._retry import RetryConfig, backoff_s
from ._token_bucket import TokenBucket

__all__ = [
    "BudgetLedger",
    "BudgetLimits",
    "CallPlan",
    "CallTally",
    "Charge",
    "CharsPerTokenEstimator",
    "Clock",
    "EndpointLimits",
    "GovernedCompletion",
    "Governor",
    "GovernorConfig",
    "LedgerLog",
    "LimitState",
    "ManualClock",
    "ModelPrice",
    "PauseGate",
    "PriceTable",
    "RequestTooLarge",
    "Reservation",
    "RetryConfig",
    "Room",
    "Sleep",
    "TokenBucket",
    "TokenEstimator",
    "TokenizerEstimator",
    "Utf8BytesEstimator",
    "backoff_s",
    "wait_until_idle",
]
