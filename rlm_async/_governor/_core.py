"""`Governor.call`: the one entry point every model call of every query passes through.

    governor = Governor(GovernorConfig(process_budget=BudgetLimits(max_usd=20.0)))
    ledger = governor.ledger(BudgetLimits(max_usd=1.00))       # one per query tree
    governed = await governor.call(request, transport, ledger=ledger)
    governed.completion.text, governed.attempts, governed.cost_usd

    tally = CallTally()                                         # to read after a failure too
    await governor.call(request, transport, ledger=ledger, tally=tally)   # raises ...
    tally.attempts                                              # ... attempts it sent

Each attempt, in order: reserve a budget upper bound (or raise `BudgetExceeded`, nothing
sent) -> wait for the endpoint+model's limits -> send -> settle the ledger with reported
usage and refund the rest, refund unused rate tokens, learn from headers and errors. Failed
attempts that were sent count as calls (the server saw them) with no tokens (none were
reported); attempts never sent are refunded in full. Retryable failures go round again
through tenacity; everything else propagates at once.

Budget first, then limits: a call that cannot be afforded fails at once instead of after
queueing for a rate limit, at the price of holding its reservation while queued.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
import tenacity

from .._events import CallRetry, UsageEstimated, emit
from .._types import Completion, ModelRequest, Usage
from ..exceptions import ConfigError, RetryableError
from ..transport import Encoded, Transport
from ._budget import BudgetLedger, BudgetLimits, Charge
from ._clock import Clock, Sleep
from ._estimate import CharsPerTokenEstimator, TokenEstimator, Utf8BytesEstimator
from ._limits import EndpointLimits, LimitRegistry, LimitState, Permit
from ._prices import ModelPrice, PriceTable
from ._retry import RetryConfig, make_retrying

__all__ = ["CallPlan", "CallTally", "GovernedCompletion", "Governor", "GovernorConfig"]

_log = structlog.get_logger("rlm_async.governor")
# Ids for the calls of a governor used without the engine (which passes its own).
_standalone_call_ids = itertools.count(1)
_ONE_CALL = Charge(Usage(calls=1))
"""A call the server saw that reported nothing (frozen: one instance serves every call)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GovernorConfig:
    """Process-wide settings of the governor. Hashable, so it can key a shared instance."""

    retry: RetryConfig = field(default_factory=RetryConfig)
    """The one retry layer."""
    default_limits: EndpointLimits = field(default_factory=EndpointLimits)
    """Limits for an endpoint+model that no caller configured."""
    process_budget: BudgetLimits | None = None
    """Caps over every query in the process (the parent of each query's ledger); `None`
    caps nothing but still counts process totals."""
    default_max_tokens: int = 8192
    """Sent as `max_tokens` when a request has none, so output has a bound that budgets and
    TPM meters can reserve."""
    chars_per_token: float | None = None
    """Budget estimator: `None` reserves UTF-8 bytes + template allowances, an upper bound
    for any BPE tokenizer; a number reserves `ceil(chars / chars_per_token)`, an upper bound
    only for a server whose tokenizer never packs more characters into a token (such as the
    simulator)."""
    rate_chars_per_token: float = 4.0
    """Tokens-per-minute meters count prompts as characters / this: a fair guess, not a
    bound (the server's own limiter is the authority; refunds correct it)."""
    require_prices: bool = False
    """An unpriced model is a `ConfigError` instead of $0 with a warning."""

    def __post_init__(self) -> None:
        if self.default_max_tokens < 1:
            raise ConfigError(f"GovernorConfig.default_max_tokens is {self.default_max_tokens}; use >= 1")
        if self.chars_per_token is not None and not self.chars_per_token > 0:
            raise ConfigError(f"GovernorConfig.chars_per_token is {self.chars_per_token}; use > 0 or None")
        if not self.rate_chars_per_token > 0:
            raise ConfigError(f"GovernorConfig.rate_chars_per_token is {self.rate_chars_per_token}; use > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class GovernedCompletion:
    """A completion and what it took to get it."""

    completion: Completion
    attempts: int
    """Attempts sent, the successful one included."""
    usage: Usage
    """Reported usage (failed attempts report none)."""
    cost_usd: float
    """What this call cost, all attempts."""
    reserved_input_tokens: int
    """Prompt tokens reserved per attempt (the estimator's bound)."""
    reserved_output_tokens: int
    """Output tokens reserved per attempt (`max_tokens`)."""
    reserved_usd: float
    """Dollars reserved per attempt."""
    waited_s: float
    """Time spent queued for limits, all attempts."""
    backoff_s: float
    """Time slept between attempts."""


@dataclass(frozen=True, slots=True)
class CallPlan:
    """What a call will reserve and meter, worked out from the request alone (`Governor.plan`).

    It holds no reservation and no permit: admission (the budget's `reserve`, the limits'
    `acquire`) happens at send time against the ledger's and the limits' state then. So a
    plan can be made early (a fan-out's followers, while the warm-up call is in flight)
    without refusing anything a later state would allow, and dropping one unsent leaks
    nothing."""

    request: ModelRequest
    """The request as sent: `max_tokens` filled in when it had none."""
    reserve: Charge
    """Reserved per attempt: the prompt's bound, the whole `max_tokens`, one call, their dollars."""
    rate_tokens: int
    """Taken from a tokens-per-minute meter per attempt: the prompt's fair guess + `max_tokens`."""
    cancelled: Charge
    """Settled for an attempt cancelled after it was sent (`bill_cancelled_prompt`)."""


@dataclass(slots=True)
class CallTally:
    """What one `Governor.call` has taken so far, updated as it goes, so that the caller can
    read it whether the call returned, raised or was cancelled (pass one as `tally=`)."""

    spent: Charge = field(default_factory=Charge)
    """Settled attempts: `spent.usage.calls` attempts sent (the server saw them), the
    tokens they reported and their exact dollars."""
    waited_s: float = 0.0
    """Time spent queued for limits, all attempts."""
    backoff_s: float = 0.0
    """Time slept between attempts."""

    @property
    def attempts(self) -> int:
        """Attempts sent so far; 0 when none was (a budget refusal, a cancelled wait)."""
        return self.spent.usage.calls


def _before_sleep(
    tally: CallTally, call_id: str, model: str, endpoint: str
) -> Callable[[tenacity.RetryCallState], None]:
    """What tenacity calls before each backoff: counts the wait and emits `call.retry`. Made
    only once a first attempt failed (most calls never retry; a wide fan-out holds
    thousands of calls at once)."""

    def before_sleep(retry_state: tenacity.RetryCallState) -> None:
        wait = retry_state.upcoming_sleep
        tally.backoff_s += wait
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        emit(
            CallRetry,
            call_id=call_id,
            attempt=retry_state.attempt_number,
            error=f"{type(error).__name__}: {error}",
            wait_s=wait,
            model=model,
            endpoint=endpoint,
        )

    return before_sleep


class Governor:
    """Run-wide limits, the one retry layer, and budgets enforced before spending.

    One instance per process and event loop is the intent: limits only work when every
    query shares them. Time is injected (`clock`, `sleep`), as is randomness (`rng`)."""

    def __init__(
        self,
        config: GovernorConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
        rng: random.Random | None = None,
        prices: PriceTable | None = None,
        estimator: TokenEstimator | None = None,
        rate_estimator: TokenEstimator | None = None,
    ) -> None:
        self.config = config = config or GovernorConfig()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.prices = prices or PriceTable(require_prices=config.require_prices)
        self.estimator: TokenEstimator = estimator or (
            Utf8BytesEstimator()
            if config.chars_per_token is None
            else CharsPerTokenEstimator(chars_per_token=config.chars_per_token)
        )
        self.rate_estimator: TokenEstimator = rate_estimator or CharsPerTokenEstimator(
            chars_per_token=config.rate_chars_per_token
        )
        self.process_ledger = BudgetLedger(config.process_budget, name="process", clock=clock)
        """Parent of every query ledger made by `ledger()`; counts process totals."""
        self._registry = LimitRegistry(
            config.default_limits, clock=clock, sleep=sleep, retry_after_cap_s=config.retry.retry_after_cap_s
        )

    def ledger(
        self, limits: BudgetLimits | None = None, *, parent: BudgetLedger | None = None
    ) -> BudgetLedger:
        """A new query ledger under `parent` (a tenant's ledger, say, itself under the process
        ledger), by default directly under the process ledger."""
        return BudgetLedger(limits, parent=parent or self.process_ledger, clock=self._clock)

    async def call(
        self,
        request: ModelRequest,
        transport: Transport,
        *,
        ledger: BudgetLedger | None = None,
        price: ModelPrice | None = None,
        limits: EndpointLimits | None = None,
        tally: CallTally | None = None,
        call_id: str | None = None,
        bill_cancelled_prompt: bool = False,
        prompt_tokens: int | None = None,
        plan: CallPlan | None = None,
        encoded: Encoded | None = None,
    ) -> GovernedCompletion:
        """Send `request` through limits, retries and the budget.

        `ledger` defaults to the process ledger; `price` overrides the price table for this
        model; `limits` configures this endpoint+model (the first time, or when changed);
        `call_id` names the call in its `call.retry` events (the engine's id; a governor used
        on its own numbers its calls "g1", "g2", ...).

        Raises `BudgetExceeded` before sending when a reservation does not fit, `FatalError`
        at once, the last `RetryableError` when attempts run out; `tally`, when given, says
        what was sent and spent up to then. `prompt_tokens`: the server's own count of the
        prompt (its tokenize endpoint), when the caller has one; it replaces the estimator's
        bound in the reservation and the rate meters. A dollar cap over an unpriced model is the
        caller's to refuse up front (the engine does, per query): here such a model costs
        $0, or is a `ConfigError` with `GovernorConfig(require_prices=True)`.

        `bill_cancelled_prompt`: an attempt cancelled after it was sent is settled as its
        prompt-token bound (no output) instead of as nothing: what a provider that bills the
        input of an abandoned request charges. Hedging sets it for every copy it races, so
        a cancelled loser stays inside the budget it reserved.

        `plan`: this request's `Governor.plan`, made earlier (then `price`, `prompt_tokens`
        and `bill_cancelled_prompt` were given to it, and `request` is not read again).
        `encoded`: its body made ahead by `transport.encode`, sent by the first attempt."""
        if plan is None:
            plan = self.plan(
                request, price=price, prompt_tokens=prompt_tokens, bill_cancelled_prompt=bill_cancelled_prompt
            )
        request, reserve = plan.request, plan.reserve
        model = request.model
        ledger = ledger if ledger is not None else self.process_ledger
        state = self._registry.get(transport.endpoint, model, limits)
        tally = tally if tally is not None else CallTally()
        retry_id = call_id if call_id is not None else f"g{next(_standalone_call_ids)}"
        args = (
            request,
            transport,
            state,
            ledger,
            reserve,
            plan.rate_tokens,
            price,
            tally,
            plan.cancelled,
            encoded,
        )
        try:
            # The first attempt outside tenacity: building and driving its machinery costs
            # more CPU than the rest of the governor, and most calls succeed at once.
            completion: Completion = await self._attempt(*args)
        except RetryableError as exc:
            if self.config.retry.max_attempts <= 1:
                raise
            before_sleep = _before_sleep(tally, retry_id, model, transport.endpoint)
            completion = await self._retry(exc, args, before_sleep)
        spent = tally.spent.usage
        return GovernedCompletion(
            completion=completion,
            attempts=tally.attempts,
            usage=Usage(spent.prompt_tokens, spent.completion_tokens, spent.cached_tokens),
            cost_usd=float(tally.spent.usd),
            reserved_input_tokens=reserve.usage.prompt_tokens,
            reserved_output_tokens=reserve.usage.completion_tokens,
            reserved_usd=float(reserve.usd),
            waited_s=tally.waited_s,
            backoff_s=tally.backoff_s,
        )

    def plan(
        self,
        request: ModelRequest,
        *,
        price: ModelPrice | None = None,
        prompt_tokens: int | None = None,
        bill_cancelled_prompt: bool = False,
        prompt_bound: int | None = None,
        rate_prompt: int | None = None,
    ) -> CallPlan:
        """What `call` will reserve and meter for `request` (see `CallPlan`); no state is read
        or changed but the price table's. `prompt_bound` and `rate_prompt`: the estimator's
        and the rate estimator's counts of this prompt, when the caller has them already."""
        if request.max_tokens is None:
            request = dataclasses.replace(request, max_tokens=self.config.default_max_tokens)
        output_bound = request.max_tokens
        assert output_bound is not None
        model = request.model
        if prompt_tokens is not None:
            prompt_bound = rate_prompt = prompt_tokens
        if prompt_bound is None:
            prompt_bound = self.estimator.prompt_tokens(request)
        if rate_prompt is None:
            rate_prompt = self.rate_estimator.prompt_tokens(request)
        reserve = Charge(
            Usage(prompt_bound, output_bound, calls=1),
            self.prices.reserve_cost(model, prompt_bound, output_bound, override=price),
        )
        cancelled = (
            Charge(
                Usage(prompt_bound, calls=1),
                self.prices.reserve_cost(model, prompt_bound, 0, override=price),
            )
            if bill_cancelled_prompt
            else _ONE_CALL
        )
        return CallPlan(request, reserve, rate_prompt + output_bound, cancelled)

    async def _retry(
        self,
        first: RetryableError,
        args: tuple[Any, ...],
        before_sleep: Callable[[tenacity.RetryCallState], None],
    ) -> Completion:
        """Attempts 2.. through tenacity: its attempt 1 replays the first failure (nothing is
        sent again), so waits, `call.retry` events and attempt numbers are as if tenacity
        had made every attempt."""
        replayed = False

        async def attempt(*a: Any) -> Completion:
            nonlocal replayed
            if not replayed:
                replayed = True
                raise first
            return await self._attempt(*a)

        retrying = make_retrying(
            self.config.retry, sleep=self._sleep, rng=self._rng, before_sleep=before_sleep
        )
        result: Completion = await retrying(attempt, *args)
        return result

    async def _attempt(
        self,
        request: ModelRequest,
        transport: Transport,
        state: LimitState,
        ledger: BudgetLedger,
        reserve: Charge,
        rate_tokens: int,
        price: ModelPrice | None,
        tally: CallTally,
        cancelled_charge: Charge,
        encoded: Encoded | None,
    ) -> Completion:
        reservation = ledger.reserve(reserve, model=request.model)
        permit: Permit | None = None
        try:
            permit = await state.acquire(rate_tokens, output_tokens=request.max_tokens or 0)
            tally.waited_s += permit.waited_s
            permit.sent = True
            # A body made ahead goes once; a retry (its `take` then empty) encodes anew.
            completion = await (
                transport.complete(request)
                if encoded is None
                else transport.complete_encoded(request, encoded)
            )
        except BaseException as exc:
            # Synchronous cleanup only, so it completes even under cancellation.
            sent = permit is not None and permit.sent
            if permit is not None:
                state.release(permit, error=exc)
            if sent:
                # The server saw it; no usage reported. Cancelled, it may still bill input.
                cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
                failed = cancelled_charge if cancelled else _ONE_CALL
                ledger.settle(reservation, failed)
                tally.spent += failed
            else:
                ledger.release(reservation)
            raise
        if not completion.usage_reported:
            completion = self._estimated(completion, reserve, transport.endpoint)
        try:
            cost = (
                self.prices.cost(request.model, completion.usage, override=price)
                if completion.usage_reported
                else reserve.usd
            )
        finally:
            state.release(permit, completion=completion)
        paid = Charge.of_usage(completion.usage, usd=cost)
        ledger.settle(reservation, paid)
        tally.spent += paid
        return completion

    @staticmethod
    def _estimated(completion: Completion, reserve: Charge, endpoint: str) -> Completion:
        """A server that reports no usage is charged the call's reservation, the upper bound
        the call could have used; never zero, which would let a budget be crossed silently."""
        usage = reserve.usage
        _log.warning(
            "the server reported no usage; the call is charged its reservation (an upper bound)",
            endpoint=endpoint,
            model=completion.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )
        emit(
            UsageEstimated,
            endpoint=endpoint,
            model=completion.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            usd=float(reserve.usd),
        )
        return dataclasses.replace(completion, usage=Usage(usage.prompt_tokens, usage.completion_tokens))
