"""One error shape for every failure, and the one place that maps exceptions to it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from qdrant_client.http.exceptions import ApiException as QdrantApiError
from qdrant_client.http.exceptions import ResponseHandlingException as QdrantTransportError
from redis.exceptions import ClusterError as RedisClusterError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.encoder import EncoderNotReady
from service.routing import AdapterNotFound, AdapterUnservable
from service.schemas import ErrorBody, ErrorResponse
from service.scoring import EngineError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, code: int, type_: str, message: str, field: str | None = None,
                 dependency: str | None = None, details: list[dict] | None = None) -> None:
        super().__init__(message)
        self.body = ErrorBody(type=type_, message=message, code=code, field=field, dependency=dependency,
                              details=details)


class DependencyError(ApiError):
    def __init__(self, dependency: str, message: str, timeout: bool = False) -> None:
        super().__init__(504 if timeout else 503, "dependency_timeout" if timeout else "dependency_unavailable",
                         message, dependency=dependency)


def respond(error: ApiError) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=error.body).model_dump(exclude_none=True), status_code=error.body.code)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def as_api_error(exc: Exception) -> ApiError | None:
    """Dependency failures and known domain errors; None for anything unexpected."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, RedisClusterError, RedisClusterException)):
        return DependencyError("redis", f"redis unavailable: {exc.__class__.__name__}",
                               timeout=isinstance(exc, RedisTimeoutError))
    if isinstance(exc, (QdrantApiError, QdrantTransportError)):
        return DependencyError("qdrant", f"qdrant unavailable: {exc.__class__.__name__}")
    if isinstance(exc, EngineError):
        return DependencyError("vllm", str(exc), timeout=exc.timeout)
    if isinstance(exc, EncoderNotReady):
        return ApiError(409, "catalog_not_ingested", str(exc))
    if isinstance(exc, AdapterUnservable):
        return ApiError(409, "adapter_unservable", str(exc), field="options.adapter")
    if isinstance(exc, AdapterNotFound):
        return ApiError(404, "adapter_not_found", str(exc), field="options.adapter")
    return None


def register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        details = [{"field": _field(tuple(e["loc"])), "message": e["msg"]} for e in errors]
        first = details[0] if details else {"field": "body", "message": "invalid request"}
        return respond(ApiError(422, "invalid_request", f"{first['field']}: {first['message']}",
                                field=first["field"], details=details))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return respond(ApiError(exc.status_code, "http_error", str(exc.detail)))

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        error = as_api_error(exc) or ApiError(500, "internal_error", "internal error")
        if error.body.dependency:
            request.app.state.metrics.dependency_errors.labels(error.body.dependency).inc()
        if error.body.code >= 500:
            log.warning("%s on %s: %s", error.body.type, request.url.path, error.body.message)
        return respond(error)

    # Registered per class so they are answered inside the app, not by the server-error layer.
    for known in (ApiError, RedisConnectionError, RedisTimeoutError, EngineError, AdapterNotFound, AdapterUnservable,
                  EncoderNotReady, QdrantApiError, QdrantTransportError):
        app.add_exception_handler(known, _known)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return respond(ApiError(500, "internal_error", "internal error"))
