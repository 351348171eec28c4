"""``create_app``: the emulator's FastAPI application (routes, envelope, rate limit, faults, timers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import api, control
from .config import EmulatorConfig
from .envelope import ApiError, error_response
from .faults import ENDPOINT_NAMES
from .state import EmulatorState

log = logging.getLogger("sandbox.emulator")


def create_app(config: EmulatorConfig | None = None) -> FastAPI:
    """Build an emulator app; its session timers run while the app's lifespan is active."""
    state = EmulatorState(config or EmulatorConfig())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ticker = asyncio.create_task(_run_timers(state), name="emulator-timers")
        try:
            yield
        finally:
            ticker.cancel()
            state.faults.reset()  # release hung calls
            await state.registry.close()

    app = FastAPI(title="LiveAvatar emulator", version="0.1.0", lifespan=lifespan)
    app.state.emulator = state
    app.include_router(api.router)
    app.include_router(control.router)
    # Starlette types a handler as taking any Exception; each of ours takes the class it is registered for.
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]  # handler narrower than Exception
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]  # as above
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]  # as above
    app.middleware("http")(_limit_and_inject_faults)
    return app


async def _run_timers(state: EmulatorState) -> None:
    while True:
        await asyncio.sleep(state.config.tick_s)
        try:
            state.registry.tick()
        except Exception:  # a bug in one tick must not stop every timer
            log.exception("emulator timer tick failed")


def _route_template(path: str) -> str:
    """``/v1/<collection>/<id>[/...]`` with the id replaced, so path parameters share one rate-limit counter."""
    parts = path.rstrip("/").split("/")
    if len(parts) >= 4 and "/".join(parts[:4]) not in ENDPOINT_NAMES:
        parts[3] = "{session_id}" if parts[2] == "sessions" else "{id}"
    return "/".join(parts)


def _caller(request: Request) -> str:
    """Rate-limit caller: the API key, else the Bearer session token, else the client address."""
    if key := request.headers.get("X-API-KEY"):
        return f"key:{key}"
    if auth := request.headers.get("Authorization"):
        return f"auth:{auth}"
    return f"ip:{request.client.host if request.client else 'unknown'}"


async def _limit_and_inject_faults(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    if not request.url.path.startswith("/v1/"):
        return await call_next(request)
    state: EmulatorState = request.app.state.emulator
    template = _route_template(request.url.path)
    endpoint = ENDPOINT_NAMES.get(template, template)
    allowed, reset_s = state.limiter.hit((_caller(request), f"{request.method} {template}"))
    response: Response
    if not allowed:
        response = error_response(
            429,
            f"Rate limit exceeded: {state.limiter.limit} calls per second for {request.method} {template}",
            {"Retry-After": str(reset_s)},
        )
    elif await state.faults.hang_if_armed(endpoint):
        response = error_response(503, f"Injected hang on {endpoint} released by /_control/reset")
    else:
        await state.faults.delay(endpoint, "before")
        fault = state.faults.take_fault(endpoint)
        if fault is not None:
            retry_after = fault.retry_after if fault.retry_after is not None else (1 if fault.status == 429 else None)
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
            message = fault.message or f"Injected fault: HTTP {fault.status} on {endpoint}"
            response = error_response(fault.status, message, headers)
        else:
            response = await call_next(request)
            await state.faults.delay(endpoint, "after")
    response.headers["X-RateLimit-Reset"] = str(reset_s)
    return response


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.headers or None)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 shape, with ``ctx`` always present as in the reference (§2)."""
    errors: list[dict[str, Any]] = [{**error, "ctx": error.get("ctx", {})} for error in exc.errors()]
    for error in errors:
        error.pop("url", None)
    return JSONResponse({"detail": jsonable_encoder(errors, custom_encoder={Exception: str})}, status_code=422)
