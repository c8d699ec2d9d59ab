"""One error body for every 4xx/5xx: ``{"error": {"status", "message", "component"?}}``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from glmv_gateway import metrics
from glmv_gateway.conversation.errors import TurnRejected


class ApiError(Exception):
    def __init__(self, status: int, message: str, component: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.component = status, message, component


def rejected(exc: TurnRejected) -> ApiError:
    """A refused turn as an HTTP error (the kind's status; see conversation.errors.STATUS)."""
    return ApiError(exc.status, exc.message, exc.component)


def error_body(status: int, message: str, component: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"status": status, "message": message}
    if component:
        body["component"] = component
    return {"error": body}


def redis_unavailable(exc: BaseException) -> str:
    return f"the session store (Redis) is unavailable: {type(exc).__name__}: {exc}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.HTTP_ERRORS.labels(str(exc.status)).inc()
        return JSONResponse(error_body(exc.status, exc.message, exc.component), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        metrics.HTTP_ERRORS.labels(str(exc.status_code)).inc()
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RedisError)
    async def _redis_error(request: Request, exc: RedisError) -> JSONResponse:
        # Sessions, locks, keys and jobs live in Redis: without it nothing can be served safely.
        metrics.HTTP_ERRORS.labels("503").inc()
        metrics.ERRORS.labels("redis", type(exc).__name__).inc()
        return JSONResponse(
            error_body(503, redis_unavailable(exc), "redis"), status_code=503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        # Input nested so deeply that parsing or validating it exhausted the stack: the client's fault.
        metrics.HTTP_ERRORS.labels("400").inc()
        return JSONResponse(error_body(400, "the request is nested too deeply"), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.HTTP_ERRORS.labels("422").inc()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
            for err in exc.errors()
        )
        return JSONResponse(error_body(422, f"invalid request: {problems}"), status_code=422)
