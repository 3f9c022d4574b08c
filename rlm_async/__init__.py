"""rlm_async: an async engine for Recursive Language Models.

    from rlm_async import RLM
    rlm = RLM(backend="openai", backend_kwargs={"model_name": "gpt-5-mini"})
    result = rlm.completion(huge_text, root_prompt="How many invoices are overdue?")
    print(result.response, result.status, result.cost_usd)

Drop-in for the official `rlms` package's `RLM` (same constructor, `completion`,
`acompletion`, result fields), with sub-calls run as an async task tree, run-wide rate
limits, budgets enforced before spending, prefix caching, a response journal, and every
REPL in a sandboxed worker process.
"""

from ._cache import CacheSettings
from ._config import HedgeConfig, ModelConfig, RLMConfig
from ._events import Event, EventSink
from ._governor import BudgetLimits, EndpointLimits, Governor, GovernorConfig, ModelPrice, RetryConfig
from ._result import RLMResult, SubCallFailure, SubCallResult, UsageSummary, UsageTotals
from ._rlm import RLM
from ._session import Session
from ._tools import Tool
from ._types import CallRecord, Completion, Message, ModelRequest, Usage
from ._version import __version__
from .exceptions import (
    AuthenticationFailed,
    BadRequest,
    BudgetExceeded,
    ConfigError,
    ConnectionFailed,
    ContextLengthExceeded,
    ContextTypeError,
    FatalError,
    IsolationUnavailable,
    JournalError,
    MissingAPIKey,
    ModelNotFound,
    RateLimited,
    RetryableError,
    RLMError,
    SandboxError,
    ServerError,
    TransportError,
)
from .logger import RLMLogger
from .sandbox import SandboxConfig
from .transport import OpenAISDKTransport, OpenAITransport, Transport

__all__ = [
    "RLM",
    "AuthenticationFailed",
    "BadRequest",
    "BudgetExceeded",
    "BudgetLimits",
    "CacheSettings",
    "CallRecord",
    "Completion",
    "ConfigError",
    "ConnectionFailed",
    "ContextLengthExceeded",
    "ContextTypeError",
    "EndpointLimits",
    "Event",
    "EventSink",
    "FatalError",
    "Governor",
    "GovernorConfig",
    "HedgeConfig",
    "IsolationUnavailable",
    "JournalError",
    "Message",
    "MissingAPIKey",
    "ModelConfig",
    "ModelNotFound",
    "ModelPrice",
    "ModelRequest",
    "OpenAISDKTransport",
    "OpenAITransport",
    "RLMConfig",
    "RLMError",
    "RLMLogger",
    "RLMResult",
    "RateLimited",
    "RetryConfig",
    "RetryableError",
    "SandboxConfig",
    "SandboxError",
    "ServerError",
    "Session",
    "SubCallFailure",
    "SubCallResult",
    "Tool",
    "Transport",
    "TransportError",
    "Usage",
    "UsageSummary",
    "UsageTotals",
    "__version__",
]
