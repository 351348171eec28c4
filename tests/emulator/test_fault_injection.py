"""The ``/_control`` fault injection: injected statuses, latency, hangs, avatar crashes, forced ends, reset."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support.emulator import Emulator
from tests.support.livekit import LiveKit, observer
from tests.support.polling import eventually


async def test_injected_status_answers_the_next_n_calls_without_effect(emulator: Emulator) -> None:
    session = await emulator.create_session()
    await emulator.control("faults", {"endpoint": "start", "status": 503, "count": 2})
    for _ in range(2):
        response = await emulator.start(session)
        assert response.status_code == 503
        assert response.json() == {"code": 503, "data": None, "message": "Injected fault: HTTP 503 on start"}
        assert "Retry-After" not in response.headers and response.headers["X-RateLimit-Reset"]
        assert (await emulator.control_view(session.id))["state"] == "created"
    assert (await emulator.start(session)).status_code == 201


async def test_injected_429_carries_retry_after(emulator: Emulator) -> None:
    await emulator.control("faults", {"endpoint": "credits", "status": 429, "retry_after": 7})
    await emulator.control("faults", {"endpoint": "token", "status": 429})
    credits = await emulator.http.get("/v1/users/credits", headers=emulator.key)
    assert credits.status_code == 429 and credits.headers["Retry-After"] == "7"
    token = await emulator.http.post("/v1/sessions/token", headers=emulator.key, json={})
    assert token.status_code == 429 and token.headers["Retry-After"] == "1"


async def test_wildcard_fault_hits_any_endpoint_once(emulator: Emulator) -> None:
    await emulator.control("faults", {"endpoint": "*", "status": 500, "message": "boom"})
    first = await emulator.http.get("/v1/users/credits", headers=emulator.key)
    second = await emulator.http.get("/v1/users/credits", headers=emulator.key)
    assert (first.status_code, first.json()["message"], second.status_code) == (500, "boom", 200)


async def test_latency_before_and_after_the_handler(emulator: Emulator) -> None:
    await emulator.control("latency", {"endpoint": "credits", "seconds": 0.4})
    began = time.monotonic()
    assert (await emulator.http.get("/v1/users/credits", headers=emulator.key)).status_code == 200
    assert time.monotonic() - began >= 0.4

    # "after": the stop takes effect although the caller gave up waiting for the answer.
    session = await emulator.started_session()
    await emulator.control("latency", {"endpoint": "stop", "seconds": 5, "phase": "after"})
    with pytest.raises(httpx.TimeoutException):  # the delayed stop must not answer before the client gives up
        await emulator.http.post("/v1/sessions/stop", headers=session.bearer, json={}, timeout=0.5)
    assert (await emulator.wait_ended(session.id, timeout=2))["end_reason"] == "UNKNOWN"


async def test_hang_never_answers_until_reset(emulator: Emulator) -> None:
    session = await emulator.create_session()
    await emulator.control("hang", {"endpoint": "start", "count": 1})
    hung = asyncio.create_task(emulator.start(session))

    async def call_is_hanging() -> bool:
        return (await emulator.http.get("/_control/sessions")).json()["data"]["hung_calls"] == 1

    await eventually(call_is_hanging, timeout=5, what="the start call to hang")
    assert not hung.done()
    await emulator.control("reset")
    response = await asyncio.wait_for(hung, timeout=5)
    assert response.status_code == 503 and "released" in response.json()["message"]
    assert (await emulator.control_view(session.id))["state"] == "created"
    assert (await emulator.start(session)).status_code == 201  # the hang was used up


async def test_reset_clears_faults_and_can_end_every_session(emulator: Emulator) -> None:
    sessions = [await emulator.started_session() for _ in range(2)]
    await emulator.control("faults", {"endpoint": "*", "status": 503, "count": 100})
    reset = await emulator.control("reset", {"end_sessions": True, "reason": "SERVER_ERROR"})
    assert reset.json()["data"]["ended_sessions"] == 2
    for session in sessions:
        assert (await emulator.entry(session.id))["end_reason"] == "SERVER_ERROR"


async def test_forced_end_uses_the_given_reason(emulator: Emulator) -> None:
    session = await emulator.started_session()
    await emulator.control(f"sessions/{session.id}/end", {"reason": "AVATAR_DELETED"})
    assert (await emulator.entry(session.id))["end_reason"] == "AVATAR_DELETED"


async def test_crash_makes_the_avatar_leave_but_the_session_stays_active(
    emulator: Emulator, livekit: LiveKit, room: str
) -> None:
    async with observer(livekit, room) as viewer:
        session = await emulator.started_session(room)
        identity = session.avatar_identity
        await eventually(
            lambda: identity in {p.identity for p in viewer.remote_participants.values()},
            timeout=10, what="the avatar to appear",
        )
        view = (await emulator.control(f"sessions/{session.id}/crash")).json()["data"]
        assert view["livekit_room"] == room and view["avatar_identity"] == identity
        await eventually(
            lambda: identity not in {p.identity for p in viewer.remote_participants.values()},
            timeout=10, what="the crashed avatar to leave the room",
        )
    assert "end_at" not in await emulator.entry(session.id)
    listed = await emulator.http.get("/v1/sessions?type=active", headers=emulator.key)
    assert [e["id"] for e in listed.json()["data"]["results"]] == [session.id]
    assert (await emulator.control_view(session.id))["avatar_present"] is False
    # Stopping still works and ends it normally.
    assert (await emulator.http.post("/v1/sessions/stop", headers=session.bearer, json={})).status_code == 200


async def test_control_of_unknown_session_is_404(emulator: Emulator) -> None:
    response = await emulator.http.post("/_control/sessions/00000000-0000-0000-0000-000000000000/crash")
    assert response.status_code == 404 and "not found" in response.json()["message"]
