"""RLM as a service: an OpenAI-compatible endpoint with jobs, streamed progress, auth and
admission control, on top of the engine (which never imports this package).

    rlm-async serve [--config configs/X.toml] [--host 127.0.0.1] [--port 8000]

or from Python:

    config = load_serve_config("configs/sim.toml")
    async with Service(config) as service:
        app = create_app(service, KeyRing.load())    # a Starlette app; serve it with uvicorn

See `docs/serve.md` for the endpoints, auth, limits and examples. Needs the `serve` extra
(starlette, sse-starlette); OpenTelemetry spans need the `otel` extra.
"""

from ._admission import TenantLimits
from ._app import create_app
from ._auth import KeyRing, Tenant
from ._config import RequestLimits, ServeConfig, load_serve_config
from ._server import run_server
from ._service import Service

__all__ = [
    "KeyRing",
    "RequestLimits",
    "ServeConfig",
    "Service",
    "Tenant",
    "TenantLimits",
    "create_app",
    "load_serve_config",
    "run_server",
]
