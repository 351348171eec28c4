"""``activities.liveavatar_client`` against the emulator (one test per failure kind) and against odd bodies."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from activities.liveavatar_client import (
    LiveAvatarAuthError,
    LiveAvatarClient,
    LiveAvatarConcurrencyLimit,
    LiveAvatarConflict,
    LiveAvatarError,
    LiveAvatarInsufficientCredits,
    LiveAvatarNotFound,
    LiveAvatarRateLimited,
    LiveAvatarServerError,
    LiveAvatarUnavailable,
    LiveAvatarValidationError,
    SessionEndReason,
    SessionEntry,
    SessionToken,
    StopOutcome,
)
from config.settings import DEFAULT_AVATAR_ID
from tests.support.emulator import TEST_API_KEY, Emulator, EmulatorFactory
from tests.support.livekit import LiveKit


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[LiveAvatarClient]:
    async with LiveAvatarClient(emulator.base_url, TEST_API_KEY, timeout=5.0) as la:
        yield la


async def create_token(
    la: LiveAvatarClient, livekit: LiveKit, room: str, *, identity: str = "avatar", **token: Any
) -> SessionToken:
    return await la.create_session_token(
        DEFAULT_AVATAR_ID,
        livekit_url=livekit.url,
        livekit_room=room,
        livekit_client_token=livekit.token(room, identity, kind="agent", **token),
        max_session_duration=120,
    )


async def test_session_lifecycle_through_the_client(client: LiveAvatarClient, livekit: LiveKit, room: str) -> None:
    token = await create_token(client, livekit, room, identity="client-avatar")
    started = await client.start_session(token.session_token)
    assert started.session_id == token.session_id and started.max_session_duration == 120 and started.ws_url
    assert "client-avatar" in await livekit.identities(room)

    entry = await client.get_session(token.session_id)
    assert not entry.is_ended and entry.mode == "LITE" and entry.credits_consumed == 1.0
    assert [e.id for e in (await client.list_sessions("active", page_size=100)).results] == [token.session_id]
    await client.keep_alive(token.session_id)
    assert (await client.credits()).credits_left == 999.0

    with pytest.raises(LiveAvatarConflict, match="already started"):
        await client.start_session(token.session_token)

    await client.stop_session(token.session_id)
    ended = await client.get_session(token.session_id)
    assert ended.is_ended and ended.end_reason is SessionEndReason.USER_CLOSED and ended.end_at is not None
    historic = await client.list_sessions("historic")
    assert historic.count == 1 and historic.results[0].is_ended


async def test_auth_error(emulator: Emulator) -> None:
    async with LiveAvatarClient(emulator.base_url, "wrong-key") as la:
        with pytest.raises(LiveAvatarAuthError) as raised:
            await la.credits()
    assert raised.value.status == 401 and "Invalid API key" in str(raised.value)


async def test_validation_errors_422_and_400(client: LiveAvatarClient, emulator: Emulator) -> None:
    with pytest.raises(LiveAvatarValidationError) as raised:
        await client.create_session_token(
            "not-a-uuid", livekit_url="ws://x", livekit_room="r", livekit_client_token="t", max_session_duration=60
        )
    assert raised.value.status == 422 and "avatar_id" in raised.value.message
    await emulator.control("faults", {"endpoint": "keep-alive", "status": 400, "message": "bad request"})
    with pytest.raises(LiveAvatarValidationError) as raised:
        await client.keep_alive(str(uuid.uuid4()))
    assert raised.value.status == 400


async def test_not_found(client: LiveAvatarClient) -> None:
    with pytest.raises(LiveAvatarNotFound, match="Session not found"):
        await client.get_session(str(uuid.uuid4()))
    with pytest.raises(LiveAvatarNotFound):
        await client.stop_session(str(uuid.uuid4()))


async def test_rate_limited_carries_retry_after(client: LiveAvatarClient, emulator: Emulator) -> None:
    await emulator.control("faults", {"endpoint": "list", "status": 429, "retry_after": 3})
    with pytest.raises(LiveAvatarRateLimited) as raised:
        await client.list_sessions("active")
    assert raised.value.status == 429 and raised.value.retry_after == 3.0


async def test_server_error_when_the_avatar_token_lacks_can_publish_data(
    client: LiveAvatarClient, livekit: LiveKit, room: str
) -> None:
    token = await create_token(client, livekit, room, can_publish_data=False)
    with pytest.raises(LiveAvatarServerError, match="canPublishData") as raised:
        await client.start_session(token.session_token)
    assert raised.value.status == 500


async def test_concurrency_limit(emulator_factory: EmulatorFactory, livekit: LiveKit, room: str) -> None:
    emulator = await emulator_factory(max_concurrent_sessions=1)
    async with LiveAvatarClient(emulator.base_url, TEST_API_KEY) as la:
        first = await create_token(la, livekit, room, identity="first")
        second = await create_token(la, livekit, room, identity="second")
        await la.start_session(first.session_token)
        with pytest.raises(LiveAvatarConcurrencyLimit) as raised:
            await la.start_session(second.session_token)
    assert raised.value.status == 400


async def test_insufficient_credits(emulator_factory: EmulatorFactory, livekit: LiveKit, room: str) -> None:
    emulator = await emulator_factory(credits=0)
    async with LiveAvatarClient(emulator.base_url, TEST_API_KEY) as la:
        token = await create_token(la, livekit, room)
        with pytest.raises(LiveAvatarInsufficientCredits):
            await la.start_session(token.session_token)


async def test_unavailable_on_refused_connection_and_timeout(emulator: Emulator) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    async with LiveAvatarClient(f"http://127.0.0.1:{closed_port}", TEST_API_KEY) as la:
        with pytest.raises(LiveAvatarUnavailable) as raised:
            await la.credits()
    assert raised.value.status is None

    await emulator.control("hang", {"endpoint": "credits"})
    async with LiveAvatarClient(emulator.base_url, TEST_API_KEY, timeout=0.3) as la:
        with pytest.raises(LiveAvatarUnavailable, match="timed out"):
            await la.credits()


# -- stop_session_confirmed (§10.4) ----------------------------------------------------------------------------------


async def test_stop_confirmed_outcomes(client: LiveAvatarClient, emulator: Emulator) -> None:
    session = await emulator.started_session()
    assert await client.stop_session_confirmed(session.id) is StopOutcome.STOPPED
    assert await client.stop_session_confirmed(session.id) is StopOutcome.ALREADY_ENDED
    assert await client.stop_session_confirmed(str(uuid.uuid4())) is StopOutcome.UNKNOWN_SESSION
    assert (await client.get_session(session.id)).end_reason is SessionEndReason.USER_CLOSED


async def test_stop_confirmed_raises_when_the_session_still_runs(client: LiveAvatarClient, emulator: Emulator) -> None:
    session = await emulator.started_session()
    await emulator.control("faults", {"endpoint": "stop", "status": 404})
    with pytest.raises(LiveAvatarNotFound):
        await client.stop_session_confirmed(session.id)
    assert not (await client.get_session(session.id)).is_ended


@pytest.mark.parametrize(
    "status, error", [(429, LiveAvatarRateLimited), (401, LiveAvatarAuthError), (503, LiveAvatarServerError)]
)
async def test_stop_confirmed_does_not_swallow_retryable_or_auth_errors(
    client: LiveAvatarClient, emulator: Emulator, status: int, error: type[LiveAvatarError]
) -> None:
    session = await emulator.started_session()
    await emulator.control("faults", {"endpoint": "stop", "status": status})
    await emulator.control("faults", {"endpoint": "get", "status": 500})  # would fail the test if GET were used
    with pytest.raises(error):
        await client.stop_session_confirmed(session.id)


# -- parsing ---------------------------------------------------------------------------------------------------------


def test_end_reason_is_parsed_leniently() -> None:
    entry = SessionEntry.model_validate({"id": "x", "end_at": "2026-01-01T00:00:00Z", "end_reason": "BRAND_NEW"})
    assert entry.end_reason is SessionEndReason.UNKNOWN and entry.is_ended
    assert SessionEntry.model_validate({"id": "x", "end_reason": "idle_timeout"}).end_reason is (
        SessionEndReason.IDLE_TIMEOUT
    )
    assert not SessionEntry.model_validate({"id": "x"}).is_ended


@pytest.mark.parametrize(
    "status, body, error, message",
    [
        (409, {"data": {"message": "in data", "code": 4009}}, LiveAvatarConflict, "in data"),
        (400, {"data": [{"message": "first of list"}]}, LiveAvatarValidationError, "first of list"),
        (500, {"error": "plain error"}, LiveAvatarServerError, "plain error"),
        (403, {"error": {"message": "nested error"}}, LiveAvatarAuthError, "nested error"),
        (400, {"code": 400004, "message": "Session does not exist"}, LiveAvatarValidationError, "does not exist"),
        (429, "slow down", LiveAvatarRateLimited, "slow down"),
        (502, "", LiveAvatarServerError, "Bad Gateway"),
        (400, {"message": "concurrent limit reached"}, LiveAvatarConcurrencyLimit, "concurrent"),
        (418, {"message": "teapot"}, LiveAvatarError, "teapot"),
    ],
)
async def test_error_bodies_are_parsed_defensively(
    status: int, body: object, error: type[LiveAvatarError], message: str
) -> None:
    def answer(_: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers={"Retry-After": "2"})
        return httpx.Response(status, json=body)

    async with LiveAvatarClient("http://liveavatar.invalid", "k", transport=httpx.MockTransport(answer)) as la:
        with pytest.raises(error) as raised:
            await la.credits()
    assert type(raised.value) is error and message in raised.value.message
    assert "GET /v1/users/credits" in str(raised.value)


async def test_success_is_decided_on_http_status_not_code() -> None:
    def answer(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"code": 100, "data": {"credits_left": "12.5"}, "message": "ok"})

    async with LiveAvatarClient("http://liveavatar.invalid", "k", transport=httpx.MockTransport(answer)) as la:
        assert (await la.credits()).credits_left == 12.5


async def test_requests_use_the_documented_auth_and_body() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        data = {"session_id": "s", "session_token": "tok"}
        status = 201 if request.url.path.endswith("/start") else 200
        return httpx.Response(status, json={"code": 1000, "data": data, "message": "ok"})

    async with LiveAvatarClient("http://liveavatar.invalid", "key", transport=httpx.MockTransport(answer)) as la:
        await la.create_session_token(
            "a", livekit_url="ws://u", livekit_room="r", livekit_client_token="t", max_session_duration=60
        )
        await la.start_session("tok")
        await la.stop_session("s")
    token, start, stop = seen
    assert token.headers["X-API-KEY"] == "key" and "Authorization" not in token.headers
    assert b'"mode":"LITE"' in token.content and b'"livekit_room":"r"' in token.content
    assert start.headers["Authorization"] == "Bearer tok" and "X-API-KEY" not in start.headers
    assert stop.headers["X-API-KEY"] == "key" and b'"reason":"USER_CLOSED"' in stop.content
