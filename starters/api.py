"""The sessions HTTP API: what a backend in any language uses to drive sessions (`/docs` shows it).

    POST /v1/sessions/{id}/join     {"spec": {...}, "identity": "cand-1"}  -> JoinGrant (starts the session if needed)
    POST /v1/sessions/{id}/end      {"reason": "..."} (optional)           -> SessionOutcome
    POST /v1/sessions/{id}/extend   {"by": "PT10M"} or {"by": 600}         -> SessionState
    POST /v1/sessions/{id}/consent  {"identity": "cand-1", "granted": true} -> SessionState (recording gated on it)
    GET  /v1/sessions/{id}/state                                           -> SessionState
    GET  /v1/sessions?status=&kind=&limit=                                 -> sessions, newest first

Every call goes through `SessionClient`, so the API and the Python client give the same answer for the same
case: `ERRORS` is the one table from the client's error types to HTTP statuses. Every error is JSON
`{"type": ..., "message": ...}` with a stable type.

What is checked before a byte of the body is read (`EdgeGuard`, an ASGI middleware around the whole app): the
declared body size (413, for the webhook too), the API key (401) and the content type (415). The body is then
read through a counter that stops at the limit, so a chunked upload cannot grow the process either.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from datetime import datetime
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Body, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.service import RPCError, RPCStatusCode

from config.settings import ApiKeyHash, Settings
from starters.client import (
    ExtendBeyondCap,
    InvalidInput,
    NotRecorded,
    RoomFull,
    SessionCancelled,
    SessionClient,
    SessionEnded,
    SessionError,
    SessionNotFound,
    SpecChanged,
    Unavailable,
    UnknownParticipant,
    check_session_id,
    summarize,
)
from starters.report import MAX_LIST_LIMIT, find_sessions, session_filter
from workers.temporal import TemporalUnavailable
from workflows.models import (
    ConsentRequest,
    EndRequest,
    ExtendRequest,
    Identity,
    JoinGrant,
    SessionKind,
    SessionOutcome,
    SessionSpec,
    SessionState,
    SessionStatus,
)

log = structlog.get_logger("sessionflow.api")

API_PREFIX = "/v1"
# Everything else needs a key, so no spelling of a path ("//v1/...", "/v1/../v1/...") can slip past the check.
PUBLIC_PATHS = frozenset({"/healthz", "/livekit/webhook", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# The codec server (starters/codec_server.py) checks its own tokens, CORS and (larger) body limit, before reading.
DELEGATED_PREFIX = "/codec/"

# The one table: a client error type -> the HTTP status the API answers with. Its `type` is the class name, the
# same a Python caller catches. Most specific first (SessionCancelled is a SessionEnded).
ERRORS: tuple[tuple[type[Exception], int], ...] = (
    (InvalidInput, 422),
    (UnknownParticipant, 422),
    (SessionNotFound, 404),
    (SpecChanged, 409),
    (SessionCancelled, 409),
    (SessionEnded, 409),
    (RoomFull, 409),
    (ExtendBeyondCap, 409),
    (NotRecorded, 409),  # consent for a session that records nothing
    (Unavailable, 503),
    (TemporalUnavailable, 503),  # Temporal out of reach past SESSIONFLOW_TEMPORAL_RETRY_DEADLINE: safe to retry
    (SessionError, 503),
)


def status_for(error: Exception) -> tuple[int, str]:
    """The HTTP status and error type for a client error (see `ERRORS`)."""
    for kind, status in ERRORS:
        if isinstance(error, kind):
            return status, type(error).__name__
    raise AssertionError(f"no status for {type(error).__name__}")


def error(status: int, kind: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"type": kind, "message": message}, status_code=status, headers=headers)


# ---- the edge: size, key and content type, before the body is read -------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body passes the limit; FastAPI and Starlette pass HTTP exceptions through
    their body parsing, so it reaches the error handler as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def authorized(keys: tuple[ApiKeyHash, ...], authorization: str | None) -> ApiKeyHash | None:
    """The configured key whose digest matches the bearer token, compared in constant time over every key."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    digest = key_digest(token.strip())
    found = None
    for key in keys:  # no early exit: the time taken does not say which key (or whether any) matched
        if hmac.compare_digest(digest, key.sha256):
            found = key
    return found


class EdgeGuard:
    """ASGI middleware around the whole app (API, webhook, docs): nothing behind it sees a request that is too
    large, unauthenticated (any path but `PUBLIC_PATHS`) or, for a POST with a body to the API, not JSON; and no
    body is read before those checks."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.limit = settings.max_body_bytes
        self.keys = settings.api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(DELEGATED_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, self._capped(receive), send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> JSONResponse | None:
        declared = headers.get("content-length")
        if declared is not None and not declared.isdigit():
            return error(400, "BadRequest", "Content-Length is not a number")
        if declared is not None and int(declared) > self.limit:
            return error(413, "PayloadTooLarge", f"the request body is larger than {self.limit} bytes")
        if scope["path"] in PUBLIC_PATHS:
            return None  # health, docs, and the webhook (which LiveKit signs instead)
        key = authorized(self.keys, headers.get("authorization"))
        if key is None:
            return error(
                401, "Unauthorized", "a valid API key is required: `Authorization: Bearer <key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scope.setdefault("state", {})["api_key"] = key.name
        has_body = declared not in (None, "0") or "chunked" in headers.get("transfer-encoding", "")
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["method"] != "GET" and has_body and media_type != "application/json":
            return error(415, "UnsupportedMediaType", "the body must be JSON: `Content-Type: application/json`")
        return None

    def _capped(self, receive: Receive) -> Receive:
        """`receive`, refusing the body once more than the limit has arrived (chunked bodies declare no size)."""
        received = 0

        async def capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        return capped


# ---- the routes ----------------------------------------------------------------------------------------------


class JoinBody(BaseModel):
    """Start the session in `spec` if it is not running yet, and admit `identity` (on its roster)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    spec: SessionSpec
    identity: Identity


class SessionSummary(BaseModel):
    session_id: str
    kind: str | None
    status: str | None
    started_at: datetime | None


class ErrorBody(BaseModel):
    type: str
    message: str


# `:path`, so an id with a slash (even encoded, which the server decodes before routing) reaches the handler
# and gets the client's answer (InvalidInput), not a routing 404.
SessionIdPath = Annotated[str, Path(description="the session id (3-64 of a-z, 0-9, '-', '_')", max_length=200)]
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (401, "no or wrong API key"),
        (404, "no such session"),
        (409, "the session has ended, or runs with another spec, or refuses the change"),
        (413, "body too large"),
        (415, "body not JSON"),
        (422, "invalid input"),
        (503, "Temporal unavailable: safe to retry"),
    )
}

# Documents the key in OpenAPI (`/docs` has an Authorize button); `EdgeGuard` enforces it before the body is read.
bearer = HTTPBearer(auto_error=False, description="an API key made by `sessionflow api-key`")
router = APIRouter(prefix=API_PREFIX, dependencies=[Security(bearer)], responses=_ERROR_RESPONSES, tags=["sessions"])


def _sessions(request: Request) -> SessionClient:
    """A client over the app's one Temporal connection (cheap: it holds no state of its own)."""
    return SessionClient(request.app.state.temporal, request.app.state.settings)


@router.post("/sessions/{session_id:path}/join", response_model=JoinGrant)
async def join(session_id: SessionIdPath, body: JoinBody, request: Request) -> JoinGrant:
    """Start the session if needed and admit a participant; idempotent (update-with-start)."""
    check_session_id(session_id)
    if body.spec.session_id != session_id:
        raise InvalidInput(f"the spec's session_id {body.spec.session_id!r} is not the session in the path {session_id!r}")
    return await _sessions(request).join(body.spec, body.identity)


@router.post("/sessions/{session_id:path}/end", response_model=SessionOutcome)
async def end(session_id: SessionIdPath, request: Request, body: Annotated[EndRequest | None, Body()] = None) -> SessionOutcome:
    """End the session once its room and avatar are released; on a closed session, the outcome it recorded."""
    return await _sessions(request).end(session_id, (body or EndRequest()).reason)


@router.post("/sessions/{session_id:path}/extend", response_model=SessionState)
async def extend(session_id: SessionIdPath, body: ExtendRequest, request: Request) -> SessionState:
    """Push the session's end out by `by` (within its `max_duration_cap`)."""
    return await _sessions(request).extend(session_id, body.by)


@router.post("/sessions/{session_id:path}/consent", response_model=SessionState)
async def consent(session_id: SessionIdPath, body: ConsentRequest, request: Request) -> SessionState:
    """A participant grants or withdraws consent to record the session; the recording follows at once (it runs
    only while everyone the spec's `recording` names consents)."""
    return await _sessions(request).consent(session_id, body.identity, body.granted)


@router.get("/sessions/{session_id:path}/state", response_model=SessionState)
async def state(session_id: SessionIdPath, request: Request) -> SessionState:
    """What the session is doing now (the workflow's `state` query)."""
    return await _sessions(request).state(session_id)


@router.get("/sessions", response_model=list[SessionSummary])
async def list_sessions(
    request: Request,
    status: Annotated[SessionStatus | None, Query()] = None,
    kind: Annotated[SessionKind | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 20,
) -> list[SessionSummary]:
    """Sessions by status and kind, newest first (Temporal visibility; the same filter as `sessionflow list`)."""
    which = session_filter(status.value if status else None, kind.value if kind else None, limit)
    try:
        rows = await find_sessions(_sessions(request).client, which)
    except RPCError as e:
        if e.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.RESOURCE_EXHAUSTED):
            raise TemporalUnavailable(f"Temporal did not answer the listing ({e.message}); it is safe to retry") from e
        raise
    return [SessionSummary(session_id=r.session_id, kind=r.kind, status=r.status, started_at=r.started_at) for r in rows]


# ---- errors as JSON ------------------------------------------------------------------------------------------

_HTTP_TYPES = {
    400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge",
    415: "UnsupportedMediaType", 422: "InvalidInput", 503: "Unavailable",
}


async def _session_error(_: Request, e: Exception) -> JSONResponse:
    status, kind = status_for(e)
    return error(status, kind, str(e))


async def _validation_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    problems = [f"{'.'.join(str(x) for x in p['loc'])}: {p['msg']}" for p in e.errors()]
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    return error(422, "InvalidInput", "; ".join(problems[:5]) + more)


async def _http_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, StarletteHTTPException)
    if e.status_code == 400 and e.detail == "There was an error parsing the body":
        # FastAPI's answer to a body it could not decode (not UTF-8): the caller's input, like any invalid JSON.
        return error(422, "InvalidInput", "the body is not valid JSON (UTF-8 text)")
    return error(e.status_code, _HTTP_TYPES.get(e.status_code, "HTTPError"), str(e.detail), headers=e.headers)


async def _pydantic_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, ValidationError)
    return error(422, "InvalidInput", summarize(e))


async def _temporal_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RPCError)
    log.warning("temporal call failed", status=e.status.name if e.status else None, error=e.message)
    return error(503, "TemporalUnavailable", "Temporal did not answer; it is safe to retry")


def install(app: FastAPI, settings: Settings) -> None:
    """Add the sessions API to `app`: its routes, its JSON errors, and the edge guard around everything."""
    app.state.settings = settings
    app.include_router(router)
    app.add_exception_handler(SessionError, _session_error)
    app.add_exception_handler(TemporalUnavailable, _session_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ValidationError, _pydantic_error)
    app.add_exception_handler(RPCError, _temporal_error)
    app.add_middleware(EdgeGuard, settings=settings)
    if not settings.api_keys:
        log.warning("no API keys configured (SESSIONFLOW_API_KEYS): every /v1 request is refused")


def new_api_key() -> tuple[str, str]:
    """A fresh API key and the SHA-256 hex digest to configure (`SESSIONFLOW_API_KEYS`)."""
    key = f"sfk_{secrets.token_urlsafe(32)}"
    return key, hashlib.sha256(key.encode()).hexdigest()
