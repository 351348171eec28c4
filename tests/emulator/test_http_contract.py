"""The emulator's HTTP contract (reference/liveavatar-api.md §1–3, §9): auth, envelope, status codes, bodies.

Sessions here have no ``livekit_config`` (no avatar joins anything) unless the test is about the avatar.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from config.settings import DEFAULT_AVATAR_ID
from tests.support.emulator import TEST_API_KEY, Emulator, EmulatorFactory
from tests.support.polling import eventually

LIVEKIT_CONFIG = {"livekit_url": "ws://127.0.0.1:7880", "livekit_room": "r", "livekit_client_token": "t"}


def assert_error(response: Any, status: int, message_part: str = "") -> None:
    """An error in the envelope: ``{code, data: null, message}`` with a readable message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["data"] is None and isinstance(body["code"], int), body
    assert message_part.lower() in body["message"].lower(), body


def assert_validation_error(response: Any, *loc: object) -> None:
    """FastAPI's 422 shape, with one error at ``loc``."""
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail and all({"loc", "msg", "type", "input", "ctx"} <= set(error) for error in detail), detail
    assert [*loc] in [error["loc"] for error in detail], detail


# -- /v1/sessions/token ----------------------------------------------------------------------------------------------


async def test_token_returns_a_fresh_session_in_the_envelope(emulator: Emulator) -> None:
    body = {"mode": "LITE", "avatar_id": DEFAULT_AVATAR_ID}
    first = await emulator.http.post("/v1/sessions/token", headers=emulator.key, json=body)
    second = await emulator.http.post("/v1/sessions/token", headers=emulator.key, json=body)
    assert first.status_code == 200
    assert first.json()["code"] == 1000 and first.json()["message"]
    one, two = first.json()["data"], second.json()["data"]
    assert uuid.UUID(one["session_id"]) != uuid.UUID(two["session_id"])
    assert one["session_token"] and one["session_token"] != two["session_token"]
    assert first.headers["X-RateLimit-Reset"] == "1"


async def test_full_mode_with_persona_is_accepted(emulator: Emulator) -> None:
    body = {"avatar_id": DEFAULT_AVATAR_ID, "avatar_persona": {"language": "en"}}
    response = await emulator.http.post("/v1/sessions/token", headers=emulator.key, json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "missing x-api-key"),
        ({"X-API-KEY": "wrong"}, "invalid api key"),
        ({"Authorization": "Bearer some-session-token"}, "session token is not accepted"),
    ],
    ids=["no-auth", "wrong-key", "bearer-instead-of-key"],
)
async def test_token_needs_the_api_key(emulator: Emulator, headers: dict[str, str], message: str) -> None:
    response = await emulator.http.post(
        "/v1/sessions/token", headers=headers, json={"mode": "LITE", "avatar_id": DEFAULT_AVATAR_ID}
    )
    assert_error(response, 401, message)


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"mode": "LITE"}, ("body", "LITE", "avatar_id")),
        ({"mode": "LITE", "avatar_id": "not-a-uuid"}, ("body", "LITE", "avatar_id")),
        ({"mode": "LITE", "avatar_id": DEFAULT_AVATAR_ID, "is_sandbox": "maybe"}, ("body", "LITE", "is_sandbox")),
        (
            {"mode": "LITE", "avatar_id": DEFAULT_AVATAR_ID, "max_session_duration": 0},
            ("body", "LITE", "max_session_duration"),
        ),
        *[
            (
                {
                    "mode": "LITE",
                    "avatar_id": DEFAULT_AVATAR_ID,
                    "livekit_config": {k: v for k, v in LIVEKIT_CONFIG.items() if k != missing},
                },
                ("body", "LITE", "livekit_config", missing),
            )
            for missing in LIVEKIT_CONFIG
        ],
        ({"avatar_id": DEFAULT_AVATAR_ID}, ("body", "FULL", "avatar_persona")),  # FULL is the default mode
        ({"mode": "CUSTOM", "avatar_id": DEFAULT_AVATAR_ID}, ("body",)),
    ],
    ids=[
        "missing-avatar-id",
        "avatar-id-not-uuid",
        "bad-type",
        "zero-duration",
        "livekit-config-without-url",
        "livekit-config-without-room",
        "livekit-config-without-token",
        "full-without-persona",
        "unknown-mode",
    ],
)
async def test_token_body_validation_is_fastapi_shaped(
    emulator: Emulator, body: dict[str, Any], loc: tuple[object, ...]
) -> None:
    response = await emulator.http.post("/v1/sessions/token", headers=emulator.key, json=body)
    assert_validation_error(response, *loc)


async def test_token_auth_is_checked_before_the_body(emulator: Emulator) -> None:
    response = await emulator.http.post("/v1/sessions/token", json={"mode": "nonsense"})
    assert_error(response, 401)


async def test_max_session_duration_is_clamped_to_the_plan_cap(emulator_factory: EmulatorFactory) -> None:
    emulator = await emulator_factory(max_session_duration_s=120)
    capped = await emulator.started_session(max_session_duration=100_000)
    default = await emulator.started_session()
    sandbox = await emulator.started_session(is_sandbox=True)
    views = [await emulator.control_view(s.id) for s in (capped, default, sandbox)]
    assert [v["max_session_duration"] for v in views] == [120, 120, 60]


# -- /v1/sessions/start ----------------------------------------------------------------------------------------------


async def test_start_answers_201_with_the_session_details(emulator: Emulator) -> None:
    session = await emulator.create_session(max_session_duration=90)
    response = await emulator.start(session)
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    assert data["session_id"] == session.id
    assert data["max_session_duration"] == 90
    assert data["ws_url"].startswith("ws://") and session.id in data["ws_url"]
    assert {"livekit_url", "livekit_client_token"} <= set(data)


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "missing"),
        ({"X-API-KEY": TEST_API_KEY}, "api key is not accepted"),
        ({"Authorization": "Bearer not-a-session-token"}, "invalid session token"),
    ],
    ids=["no-auth", "api-key-instead-of-bearer", "unknown-token"],
)
async def test_start_needs_the_session_token(emulator: Emulator, headers: dict[str, str], message: str) -> None:
    session = await emulator.create_session()
    response = await emulator.http.post("/v1/sessions/start", headers=headers, json={"session_id": session.id})
    assert_error(response, 401, message)
    assert (await emulator.control_view(session.id))["state"] == "created"


async def test_start_twice_is_a_conflict(emulator: Emulator) -> None:
    session = await emulator.started_session()
    assert_error(await emulator.start(session), 409, "already started")


async def test_start_of_an_ended_session_is_not_found(emulator: Emulator) -> None:
    session = await emulator.create_session()
    await emulator.http.post("/v1/sessions/stop", headers=session.bearer, json={})
    assert_error(await emulator.start(session), 404, "session not found")


async def test_start_without_a_minute_of_credit_is_refused(emulator_factory: EmulatorFactory) -> None:
    emulator = await emulator_factory(credits=0.5)
    paid = await emulator.create_session()
    assert_error(await emulator.start(paid), 402, "insufficient credits")
    sandbox = await emulator.create_session(is_sandbox=True)
    assert (await emulator.start(sandbox)).status_code == 201  # sandbox sessions need no credits


async def test_start_beyond_the_concurrency_limit_is_refused(emulator_factory: EmulatorFactory) -> None:
    emulator = await emulator_factory(max_concurrent_sessions=1)
    first = await emulator.started_session()
    second = await emulator.create_session()
    assert_error(await emulator.start(second), 400, "concurrent session limit")
    await emulator.http.post("/v1/sessions/stop", headers=first.bearer, json={})
    assert (await emulator.start(second)).status_code == 201


# -- /v1/sessions/stop -----------------------------------------------------------------------------------------------


async def test_stop_with_api_key_records_the_default_reason(emulator: Emulator) -> None:
    session = await emulator.started_session()
    response = await emulator.http.post("/v1/sessions/stop", headers=emulator.key, json={"session_id": session.id})
    assert response.status_code == 200 and response.json()["code"] == 1000
    entry = await emulator.entry(session.id)
    assert entry["end_reason"] == "UNKNOWN" and entry["end_at"]


async def test_stop_with_bearer_needs_no_session_id(emulator: Emulator) -> None:
    session = await emulator.started_session()
    response = await emulator.http.post("/v1/sessions/stop", headers=session.bearer, json={"reason": "USER_CLOSED"})
    assert response.status_code == 200
    assert (await emulator.entry(session.id))["end_reason"] == "USER_CLOSED"


async def test_stop_with_api_key_needs_a_session_id(emulator: Emulator) -> None:
    session = await emulator.started_session()
    response = await emulator.http.post("/v1/sessions/stop", headers=emulator.key, json={"reason": "USER_CLOSED"})
    assert_error(response, 400, "session_id is required")
    assert "end_at" not in await emulator.entry(session.id)


async def test_stop_with_another_sessions_token_is_forbidden(emulator: Emulator) -> None:
    mine, other = await emulator.started_session(), await emulator.started_session()
    response = await emulator.http.post("/v1/sessions/stop", headers=mine.bearer, json={"session_id": other.id})
    assert_error(response, 403, "does not belong")


@pytest.mark.parametrize(
    "headers", [{}, {"X-API-KEY": "wrong"}, {"Authorization": "Bearer unknown"}], ids=["none", "wrong-key", "bad-token"]
)
async def test_stop_needs_auth(emulator: Emulator, headers: dict[str, str]) -> None:
    session = await emulator.started_session()
    response = await emulator.http.post("/v1/sessions/stop", headers=headers, json={"session_id": session.id})
    assert_error(response, 401)
    assert "end_at" not in await emulator.entry(session.id)


async def test_stop_of_unknown_or_stopped_session_is_not_found(emulator: Emulator) -> None:
    unknown = await emulator.http.post("/v1/sessions/stop", headers=emulator.key, json={"session_id": str(uuid.uuid4())})
    assert_error(unknown, 404, "session not found")
    session = await emulator.started_session()
    body = {"session_id": session.id, "reason": "USER_CLOSED"}
    assert (await emulator.http.post("/v1/sessions/stop", headers=emulator.key, json=body)).status_code == 200
    again = await emulator.http.post("/v1/sessions/stop", headers=emulator.key, json=body)
    assert again.json() == {"code": 404, "data": None, "message": "Session not found"}
    assert again.status_code == 404
    assert (await emulator.entry(session.id))["end_reason"] == "USER_CLOSED"  # the first stop's reason stays


@pytest.mark.parametrize(
    "body, loc",
    [({"session_id": "nope"}, ("body", "session_id")), ({"reason": "BORED"}, ("body", "reason"))],
    ids=["malformed-id", "unknown-reason"],
)
async def test_stop_body_validation(emulator: Emulator, body: dict[str, Any], loc: tuple[str, ...]) -> None:
    assert_validation_error(await emulator.http.post("/v1/sessions/stop", headers=emulator.key, json=body), *loc)


# -- /v1/sessions/keep-alive -----------------------------------------------------------------------------------------


async def test_keep_alive_statuses(emulator: Emulator) -> None:
    session = await emulator.started_session()
    assert (await emulator.http.post("/v1/sessions/keep-alive", headers=session.bearer, json={})).status_code == 200
    body = {"session_id": session.id}
    assert (await emulator.http.post("/v1/sessions/keep-alive", headers=emulator.key, json=body)).status_code == 200
    assert_error(await emulator.http.post("/v1/sessions/keep-alive", headers=emulator.key, json={}), 400)
    assert_error(await emulator.http.post("/v1/sessions/keep-alive", json=body), 401)
    unknown = {"session_id": str(uuid.uuid4())}
    assert_error(await emulator.http.post("/v1/sessions/keep-alive", headers=emulator.key, json=unknown), 404)
    await emulator.http.post("/v1/sessions/stop", headers=session.bearer, json={})
    ended = await emulator.http.post("/v1/sessions/keep-alive", headers=emulator.key, json=body)
    assert_error(ended, 404, "session not found")


# -- GET /v1/sessions, GET/DELETE /v1/sessions/{id}, credits ---------------------------------------------------------


async def test_list_separates_active_and_historic_and_pages(emulator: Emulator) -> None:
    active = [await emulator.started_session() for _ in range(3)]
    ended = await emulator.started_session()
    await emulator.http.post("/v1/sessions/stop", headers=ended.bearer, json={"reason": "USER_CLOSED"})
    unstarted = await emulator.create_session()

    page1 = (await emulator.http.get("/v1/sessions?type=active&page_size=2", headers=emulator.key)).json()["data"]
    assert page1["count"] == 3 and len(page1["results"]) == 2 and page1["previous"] is None
    page2 = (await emulator.http.get(page1["next"], headers=emulator.key)).json()["data"]
    assert page2["next"] is None and page2["previous"] and len(page2["results"]) == 1
    listed = {e["id"] for e in page1["results"] + page2["results"]}
    assert listed == {s.id for s in active}
    for entry in page1["results"]:
        assert "end_at" not in entry and entry["mode"] == "LITE" and entry["credits_consumed"] == 1.0

    historic = (await emulator.http.get("/v1/sessions?type=historic", headers=emulator.key)).json()["data"]
    assert [e["id"] for e in historic["results"]] == [ended.id]
    assert historic["results"][0]["end_reason"] == "USER_CLOSED" and historic["results"][0]["end_at"]
    assert unstarted.id not in listed


@pytest.mark.parametrize(
    "query, loc",
    [
        ("", ("query", "type")),
        ("?type=everything", ("query", "type")),
        ("?type=active&page=0", ("query", "page")),
        ("?type=active&page_size=0", ("query", "page_size")),
        ("?type=active&page_size=101", ("query", "page_size")),
    ],
    ids=["type-missing", "type-invalid", "page-0", "page-size-0", "page-size-101"],
)
async def test_list_query_validation(emulator: Emulator, query: str, loc: tuple[str, ...]) -> None:
    assert_validation_error(await emulator.http.get(f"/v1/sessions{query}", headers=emulator.key), *loc)


async def test_read_endpoints_need_the_api_key(emulator: Emulator) -> None:
    session = await emulator.started_session()
    for path in ("/v1/sessions?type=active", f"/v1/sessions/{session.id}", "/v1/users/credits"):
        assert_error(await emulator.http.get(path), 401)
        assert_error(await emulator.http.get(path, headers=session.bearer), 401, "session token is not accepted")


async def test_get_session(emulator: Emulator) -> None:
    session = await emulator.started_session()
    entry = await emulator.entry(session.id)
    assert entry["id"] == session.id and entry["source"] == "API" and entry["is_sandbox"] is False
    assert "end_at" not in entry and "end_reason" not in entry
    assert_error(await emulator.http.get(f"/v1/sessions/{uuid.uuid4()}", headers=emulator.key), 404, "not found")
    assert_validation_error(
        await emulator.http.get("/v1/sessions/not-a-uuid", headers=emulator.key), "path", "session_id"
    )


async def test_delete_session_is_not_the_stop_api(emulator: Emulator) -> None:
    session = await emulator.started_session()
    response = await emulator.http.delete(f"/v1/sessions/{session.id}", headers=emulator.key)
    assert_error(response, 405)
    assert "end_at" not in await emulator.entry(session.id)


async def test_credits_are_escrowed_on_start_and_billed_per_period(emulator_factory: EmulatorFactory) -> None:
    emulator = await emulator_factory(credits=10, billing_period_s=0.5)

    async def credits_left() -> float:
        response = await emulator.http.get("/v1/users/credits", headers=emulator.key)
        assert response.status_code == 200
        return float(response.json()["data"]["credits_left"])

    assert await credits_left() == 10
    session = await emulator.started_session()
    assert await credits_left() == 9  # one LITE period escrowed at start
    async def second_period_billed() -> bool:
        return await credits_left() < 9

    await eventually(second_period_billed, timeout=5, what="a second billed period")
    await emulator.http.post("/v1/sessions/stop", headers=session.bearer, json={})
    billed = (await emulator.entry(session.id))["credits_consumed"]
    assert billed >= 2 and await credits_left() == 10 - billed


# -- rate limit ------------------------------------------------------------------------------------------------------


async def _at_window_start() -> None:
    """Align with the start of a 1-second window so a burst of calls lands in one window."""
    await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)  # a wall-clock boundary, not a condition to poll


async def test_rate_limit_is_per_caller_and_endpoint_in_fixed_windows(emulator_factory: EmulatorFactory) -> None:
    emulator = await emulator_factory(rate_limit_per_s=2)
    one, two = await emulator.create_session(), await emulator.create_session()
    await _at_window_start()
    statuses = [(await emulator.http.get("/v1/users/credits", headers=emulator.key)).status_code for _ in range(3)]
    limited = await emulator.http.get("/v1/users/credits", headers=emulator.key)
    # Other endpoint, same key: own budget. Path parameters share one counter.
    other_endpoint = [
        (await emulator.http.get(f"/v1/sessions/{session_id}", headers=emulator.key)).status_code
        for session_id in (one.id, two.id, uuid.uuid4())
    ]
    # Session-scoped calls count per session token.
    per_token = [
        (await emulator.http.post("/v1/sessions/keep-alive", headers=s.bearer, json={})).status_code
        for s in (one, one, two, two)
    ]
    assert statuses == [200, 200, 429]
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    assert limited.headers["X-RateLimit-Reset"] == "1" and "rate limit" in limited.json()["message"].lower()
    assert other_endpoint == [200, 200, 429]
    assert per_token == [200, 200, 200, 200]

    async def next_window_allows() -> bool:
        return (await emulator.http.get("/v1/users/credits", headers=emulator.key)).status_code == 200

    await eventually(next_window_allows, timeout=3, what="the next rate-limit window")
