"""The routes' dependencies: the engine, settings and metrics from app state, the API-key check and readiness.

All async: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per dependency per request.
The guarded routes solve one dependency, `guard`, which reads both key headers itself: FastAPI spends tens of
microseconds solving each dependency, and the task routes had nine (the engine, the settings twice, both key
headers, the checks), a fifth of the service's own time per request. The OpenAPI document declares both key
schemes on every guarded route all the same (service/openapi.py, SECURITY).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.engine import Engine
from service.errors import ApiError
from service.metrics import Metrics
from service.settings import Settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key (when keys are configured).")
BEARER = HTTPBearer(auto_error=False, description="An API key as a bearer token (when keys are configured).")


async def guard(request: Request) -> None:
    """Every guarded route's one dependency: the API key (when keys are configured), then readiness."""
    require_api_key(request.app.state.settings, await API_KEY_HEADER(request), await BEARER(request))
    require_ready(request)


def require_api_key(settings: Settings, api_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> None:
    """With DIDE_API_KEYS set, a request needs one of them (X-API-Key or Authorization: Bearer)."""
    if not settings.api_keys:
        return
    given = api_key if api_key is not None else bearer.credentials if bearer is not None else None
    if given is None:
        raise ApiError(401, "unauthorized", "this service needs an API key: send X-API-Key or Authorization: Bearer")
    given_b = given.encode("utf-8", "surrogateescape")
    ok = False
    for key in settings.api_keys:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(given_b, key.get_secret_value().encode("utf-8"))
    if not ok:
        raise ApiError(401, "unauthorized", "the API key is not valid")


def require_ready(request: Request) -> None:
    if not request.app.state.engine.ready:
        raise ApiError(
            503,
            "not_ready",
            "the service is loading or warming its models; retry shortly",
            {"Retry-After": str(request.app.state.settings.retry_after_s)},
        )
