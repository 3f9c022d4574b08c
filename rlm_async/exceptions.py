"""The error tree, classified by what the caller should do.

    RLMError
    ├── ConfigError                  misuse: raised at construction, names the fix
    │   ├── ContextTypeError         a context of an unsupported type
    │   └── MissingAPIKey            the key's environment variable is unset
    ├── TransportError               the wire failed
    │   ├── RetryableError           worth another attempt (408/409/429/5xx, timeouts, drops)
    │   │   ├── RateLimited          429; carries retry_after
    │   │   ├── ServerError          5xx, malformed body
    │   │   └── ConnectionFailed     refused, reset, dropped, timed out
    │   └── FatalError               retrying cannot help (400/401/403/404)
    │       ├── AuthenticationFailed 401/403
    │       ├── ModelNotFound        404 or unknown model
    │       ├── ContextLengthExceeded
    │       └── BadRequest           any other 4xx
    ├── BudgetExceeded               a per-query or per-process cap would be crossed
    ├── SandboxError                 the REPL worker could not be run as configured
    │   └── IsolationUnavailable     no isolation tier can run here: model code is refused
    └── JournalError                 the response journal is corrupt or foreign

An error in code the model wrote is never raised: it becomes an observation the model sees.
Nothing above the transport catches an `openai.*` or `httpx.*` exception: the transport
translates them into this tree once, at the boundary.
"""

from __future__ import annotations


class RLMError(Exception):
    """Base of every error rlm_async raises on purpose."""


class ConfigError(RLMError, ValueError):
    """The configuration or input is wrong; the message names the fix."""


class ContextTypeError(ConfigError, TypeError):
    """The context is not a `str`, a `list` of `str`, or a `dict`; or the query
    (`root_prompt`) is not a `str`."""


class MissingAPIKey(ConfigError):
    """The environment variable that should hold the API key is unset or empty."""


class TransportError(RLMError):
    """A model call failed on the wire."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class RetryableError(TransportError):
    """Another attempt may succeed."""

    def __init__(
        self, message: str, *, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after
        """Seconds the server asked us to wait, from `retry-after-ms` / `retry-after`."""


class RateLimited(RetryableError):
    """HTTP 429."""


class ServerError(RetryableError):
    """HTTP 5xx (and 408/409), or a response body that is not the JSON it should be."""


class ConnectionFailed(RetryableError):
    """The connection was refused, reset, dropped mid-response, or timed out."""


class FatalError(TransportError):
    """Retrying the same request cannot succeed."""


class AuthenticationFailed(FatalError):
    """HTTP 401/403: the key is wrong or lacks access."""


class ModelNotFound(FatalError):
    """HTTP 404: the endpoint does not serve this model."""


class ContextLengthExceeded(FatalError):
    """The prompt is longer than the model's context window."""


class BadRequest(FatalError):
    """Any other HTTP 4xx."""


class BudgetExceeded(RLMError):
    """A call was not sent because its reservation would cross a cap.

    Carries which limit, the cap, and what was already committed, so the message says
    exactly which number was hit.
    """

    def __init__(self, limit: str, cap: float, committed: float, requested: float) -> None:
        self.limit = limit
        self.cap = cap
        self.committed = committed
        self.requested = requested
        super().__init__(
            f"budget exceeded: {limit} cap is {cap:g}, {committed:g} already spent or reserved, "
            f"this call needs up to {requested:g} more"
        )

    def __reduce__(self) -> tuple[type[BudgetExceeded], tuple[str, float, float, float]]:
        return (type(self), (self.limit, self.cap, self.committed, self.requested))


class SandboxError(RLMError):
    """The REPL worker could not be started or run as configured."""


class IsolationUnavailable(SandboxError):
    """No isolation tier that `SandboxConfig.isolation` allows can run here; no model code
    runs. The message names what each tier lacks and the fix (`rlm-async doctor`)."""


class JournalError(RLMError):
    """The response journal file is corrupt, foreign, or from an incompatible version."""
