"""The emulated ``/v1`` endpoints (reference §1, §3). Auth rules per endpoint:

- ``X-API-KEY`` only: ``/token``, list, get, credits (a Bearer session token is refused with 401);
- Bearer session token only: ``/start`` (the API key is refused with 401);
- either: ``/stop`` and ``/keep-alive`` (with the API key, ``session_id`` is required: 400 without it).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse

from .envelope import ApiError, error_response, ok
from .schemas import KeepAliveRequest, StopRequest, TokenRequest
from .sessions import EmulatedSession
from .state import Emulator

router = APIRouter(prefix="/v1")


def _bearer(request: Request) -> str | None:
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    return (credential.strip() or None) if scheme.lower() == "bearer" else None


def require_api_key(request: Request, emulator: Emulator) -> None:
    key = request.headers.get("X-API-KEY")
    if key is None:
        hint = " (a session token is not accepted here)" if _bearer(request) else ""
        raise ApiError(401, f"Missing X-API-KEY header{hint}")
    if key != emulator.config.api_key:
        raise ApiError(401, "Invalid API key")


def require_session_token(request: Request, emulator: Emulator) -> EmulatedSession:
    token = _bearer(request)
    if token is None:
        hint = " (the API key is not accepted here)" if "X-API-KEY" in request.headers else ""
        raise ApiError(401, f"Missing 'Authorization: Bearer <session_token>' header{hint}")
    session = emulator.registry.by_token(token)
    if session is None:
        raise ApiError(401, "Invalid session token")
    return session


def session_from_key_or_token(
    request: Request, emulator: Emulator, session_id: uuid.UUID | None
) -> EmulatedSession:
    """Resolve the target of ``/stop`` and ``/keep-alive``: Bearer token, or API key plus ``session_id``."""
    if _bearer(request) is not None:
        session = require_session_token(request, emulator)
        if session_id is not None and session_id != session.id:
            raise ApiError(403, "The session token does not belong to the given session_id")
        return session
    require_api_key(request, emulator)
    if session_id is None:
        raise ApiError(400, "session_id is required when authenticating with X-API-KEY")
    found = emulator.registry.get(session_id)
    if found is None:
        raise ApiError(404, "Session not found")
    return found


ApiKey = Depends(require_api_key)


@router.post("/sessions/token", dependencies=[ApiKey])
async def create_session_token(body: Annotated[TokenRequest, Body()], emulator: Emulator) -> JSONResponse:
    session = emulator.registry.create(
        mode=body.mode,
        avatar_id=body.avatar_id,
        is_sandbox=body.is_sandbox,
        livekit=getattr(body, "livekit_config", None),
        max_session_duration=body.max_session_duration,
    )
    return ok({"session_id": str(session.id), "session_token": session.token})


@router.post("/sessions/start")
async def start_session(
    request: Request, emulator: Emulator, session: Annotated[EmulatedSession, Depends(require_session_token)]
) -> JSONResponse:
    await emulator.registry.start(session)
    livekit = session.livekit
    data: dict[str, object] = {
        "session_id": str(session.id),
        "livekit_url": livekit.livekit_url if livekit else None,
        "livekit_client_token": livekit.livekit_client_token if livekit else None,
        "livekit_agent_token": None,
        "max_session_duration": session.max_session_duration,
    }
    if session.mode == "LITE":
        ws_base = str(request.base_url).replace("http", "ws", 1).rstrip("/")
        data["ws_url"] = f"{ws_base}/v1/ws/{session.id}?token={session.token}"
    return ok(data, status=201)


@router.post("/sessions/stop")
async def stop_session(
    request: Request, emulator: Emulator, body: Annotated[StopRequest | None, Body()] = None
) -> JSONResponse:
    body = body or StopRequest()
    session = session_from_key_or_token(request, emulator, body.session_id)
    emulator.registry.end(session, body.reason)
    return ok(None)


@router.post("/sessions/keep-alive")
async def keep_alive(
    request: Request, emulator: Emulator, body: Annotated[KeepAliveRequest | None, Body()] = None
) -> JSONResponse:
    session = session_from_key_or_token(request, emulator, (body or KeepAliveRequest()).session_id)
    emulator.registry.keep_alive(session)
    return ok(None)


@router.get("/sessions", dependencies=[ApiKey])
async def list_sessions(
    request: Request,
    emulator: Emulator,
    type: Annotated[Literal["active", "historic"], Query()],
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JSONResponse:
    wanted = "active" if type == "active" else "ended"
    matching = [s for s in emulator.registry.all() if s.state == wanted]
    start = (page - 1) * page_size
    more = start + page_size < len(matching)
    return ok(
        {
            "count": len(matching),
            "next": str(request.url.include_query_params(page=page + 1)) if more else None,
            "previous": str(request.url.include_query_params(page=page - 1)) if page > 1 else None,
            "results": [s.entry() for s in matching[start : start + page_size]],
        }
    )


@router.get("/sessions/{session_id}", dependencies=[ApiKey])
async def get_session(session_id: uuid.UUID, emulator: Emulator) -> JSONResponse:
    session = emulator.registry.get(session_id)
    if session is None:
        return error_response(404, "Session not found")
    return ok(session.entry())


@router.get("/users/credits", dependencies=[ApiKey])
async def credits(emulator: Emulator) -> JSONResponse:
    return ok({"credits_left": emulator.registry.credits_left()})
