"""``/_control``: unauthenticated loopback endpoints for tests and demos (see the package docstring)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from .avatar import SilenceMode
from .envelope import ApiError, ok
from .faults import FaultRule, HangRule, LatencyRule
from .schemas import SessionEndReason
from .sessions import EmulatedSession
from .state import Emulator, EmulatorState

router = APIRouter(prefix="/_control", tags=["control"])


class ResetRequest(BaseModel):
    end_sessions: bool = False
    reason: SessionEndReason = SessionEndReason.SERVER_ERROR


class SilenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: SilenceMode


class EndRequest(BaseModel):
    reason: SessionEndReason = SessionEndReason.SERVER_ERROR


def _session(emulator: EmulatorState, session_id: uuid.UUID) -> EmulatedSession:
    session = emulator.registry.get(session_id)
    if session is None:
        raise ApiError(404, f"Session {session_id} not found")
    return session


@router.post("/faults")
async def add_fault(rule: FaultRule, emulator: Emulator) -> JSONResponse:
    emulator.faults.add_fault(rule)
    return ok(rule.model_dump())


@router.post("/latency")
async def set_latency(rule: LatencyRule, emulator: Emulator) -> JSONResponse:
    emulator.faults.set_latency(rule)
    return ok(rule.model_dump())


@router.post("/hang")
async def add_hang(rule: HangRule, emulator: Emulator) -> JSONResponse:
    emulator.faults.add_hang(rule)
    return ok(rule.model_dump())


@router.post("/reset")
async def reset(emulator: Emulator, body: Annotated[ResetRequest | None, Body()] = None) -> JSONResponse:
    body = body or ResetRequest()
    emulator.faults.reset()
    emulator.limiter.reset()
    ended = emulator.registry.end_all(body.reason) if body.end_sessions else 0
    return ok({"ended_sessions": ended})


@router.get("/sessions")
async def sessions(emulator: Emulator) -> JSONResponse:
    return ok(
        {
            "credits_left": emulator.registry.credits_left(),
            "hung_calls": emulator.faults.hung_calls,
            "sessions": [s.control_view() for s in emulator.registry.all()],
        }
    )


@router.post("/sessions/{session_id}/crash")
async def crash_avatar(session_id: uuid.UUID, emulator: Emulator) -> JSONResponse:
    session = _session(emulator, session_id)
    emulator.registry.crash_avatar(session)
    return ok(session.control_view())


@router.post("/sessions/{session_id}/freeze")
async def freeze_avatar(session_id: uuid.UUID, emulator: Emulator) -> JSONResponse:
    """The avatar stays in the room with its video published, but no frame comes any more."""
    session = _session(emulator, session_id)
    if session.avatar is not None:
        session.avatar.freeze()
    return ok(session.control_view())


@router.post("/sessions/{session_id}/silence")
async def silence_avatar(session_id: uuid.UUID, body: SilenceRequest, emulator: Emulator) -> JSONResponse:
    """The avatar stays in the room with its video, but its sound stops: `quiet` (it sends silence, as a listening
    avatar does), `mute` (no audio packet reaches the room) or `unpublish` (no audio track)."""
    session = _session(emulator, session_id)
    if session.avatar is not None:
        await session.avatar.silence(body.mode)
    return ok(session.control_view())


@router.post("/sessions/{session_id}/end")
async def end_session(
    session_id: uuid.UUID, emulator: Emulator, body: Annotated[EndRequest | None, Body()] = None
) -> JSONResponse:
    session = _session(emulator, session_id)
    emulator.registry.end(session, (body or EndRequest()).reason)
    return ok(session.control_view())
