"""Every external failure is classified: final errors stop retries at once, the rest are retried by Temporal.

Against the real LiveKit server and the emulator's fault injection, through the activities themselves.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import httpx
import pytest
from livekit import api
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.avatar import AvatarActivities
from activities.liveavatar_client import LiveAvatarClient
from activities.livekit import LiveKitActivities
from config.settings import DEFAULT_AVATAR_ID, Settings
from tests.support.livekit import room_names
from workflows.models import (
    AvatarRef,
    AvatarSpec,
    CreateAvatarInput,
    CreateRoomInput,
    SessionKind,
    StartAvatarInput,
)

pytestmark = pytest.mark.stack

A = TypeVar("A")
R = TypeVar("R")


def room_input(room: str) -> CreateRoomInput:
    return CreateRoomInput(
        room=room, workflow_id=room, session_kind=SessionKind.COACHING, max_participants=4,
        empty_timeout_s=60, departure_timeout_s=60,
    )


async def run(fn: Callable[[A], Awaitable[R]], arg: A) -> R:
    return await ActivityEnvironment().run(fn, arg)


async def raises_app_error(fn: Callable[[A], Awaitable[object]], arg: A, *, type_: str, retryable: bool) -> ApplicationError:
    with pytest.raises(ApplicationError) as info:
        await run(fn, arg)
    err = info.value
    assert err.type == type_, err
    assert err.non_retryable is (not retryable), err
    return err


# ---- LiveKit ---------------------------------------------------------------------------------------------------


async def test_livekit_wrong_credentials_are_final(stack: Settings, livekit: api.LiveKitAPI) -> None:
    bad = LiveKitActivities(stack.model_copy(update={"livekit_api_secret": SecretStr("not-the-secret-" * 3)}))
    room = f"session-err-{uuid.uuid4().hex[:8]}"
    err = await raises_app_error(bad.create_room, room_input(room), type_="LiveKitAuthError", retryable=False)
    assert "LIVEKIT_API_SECRET" in err.message
    assert await room_names(livekit, room) == []


async def test_livekit_unreachable_is_retried(stack: Settings) -> None:
    down = LiveKitActivities(stack.model_copy(update={"livekit_url": "ws://127.0.0.1:9"}))
    await raises_app_error(down.create_room, room_input("session-err-x"), type_="LiveKitUnavailable", retryable=True)


async def test_livekit_calls_are_bounded_by_our_own_timeout(stack: Settings) -> None:
    slow = LiveKitActivities(stack.model_copy(update={"livekit_call_timeout_s": 0.000001}))
    await raises_app_error(slow.create_room, room_input("session-err-y"), type_="LiveKitUnavailable", retryable=True)


async def test_livekit_invalid_request_is_final(stack: Settings) -> None:
    lk = LiveKitActivities(stack)
    err = await raises_app_error(
        lk.create_room, room_input("session-" + "x" * 300), type_="LiveKit_invalid_argument", retryable=False
    )
    assert "400" in err.message


async def test_deleting_a_room_that_is_gone_is_success_and_creating_twice_is_idempotent(
    stack: Settings, livekit: api.LiveKitAPI
) -> None:
    lk = LiveKitActivities(stack)
    room = f"session-err-{uuid.uuid4().hex[:8]}"
    await run(lk.create_room, room_input(room))
    await run(lk.create_room, room_input(room))  # the live room is returned, no error
    assert await room_names(livekit, room) == [room]
    await run(lk.delete_room, room)
    await run(lk.delete_room, room)  # not_found counts as deleted
    assert await room_names(livekit, room) == []


async def test_cleanup_never_gives_up_even_on_errors_final_elsewhere(stack: Settings) -> None:
    bad = LiveKitActivities(stack.model_copy(update={"livekit_api_secret": SecretStr("not-the-secret-" * 3)}))
    await raises_app_error(bad.delete_room, "session-err-z", type_="LiveKitAuthError", retryable=True)


# ---- LiveAvatar ------------------------------------------------------------------------------------------------


@pytest.fixture
async def faults(stack: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The emulator's control API; every fault is cleared after the test."""
    async with httpx.AsyncClient(base_url=f"{stack.liveavatar_api_url}/_control") as control:
        yield control
        (await control.post("/reset", json={})).raise_for_status()  # a fault left armed would break the next test


def avatar_input(stack: Settings) -> CreateAvatarInput:
    room = f"session-err-{uuid.uuid4().hex[:8]}"
    return CreateAvatarInput(
        session_id=room.removeprefix("session-"), room=room, identity=f"avatar-{room}-1",
        avatar=AvatarSpec(avatar_id=DEFAULT_AVATAR_ID), max_session_duration_s=300,
    )


@pytest.mark.parametrize(
    ("status", "message", "type_", "retryable"),
    [
        (401, "Invalid API key", "LiveAvatarAuthError", False),
        (422, "bad field", "LiveAvatarInvalid", False),
        (402, "Insufficient credits", "LiveAvatarNoCredits", False),
        (503, "Service unavailable", "LiveAvatarServerError", True),
        (400, "Concurrent session limit reached", "LiveAvatarConcurrencyLimit", True),
    ],
)
async def test_liveavatar_token_errors_are_classified(
    stack: Settings, faults: httpx.AsyncClient, status: int, message: str, type_: str, retryable: bool
) -> None:
    await faults.post("/faults", json={"endpoint": "token", "status": status, "count": 1, "message": message})
    await raises_app_error(AvatarActivities(stack).create_avatar_session, avatar_input(stack), type_=type_, retryable=retryable)


async def test_liveavatar_rate_limit_is_retried_after_retry_after(stack: Settings, faults: httpx.AsyncClient) -> None:
    await faults.post("/faults", json={"endpoint": "token", "status": 429, "count": 1, "retry_after": 3})
    err = await raises_app_error(
        AvatarActivities(stack).create_avatar_session, avatar_input(stack), type_="LiveAvatarRateLimited", retryable=True
    )
    assert err.next_retry_delay == timedelta(seconds=3)


async def test_a_500_on_start_is_final_but_a_503_is_retried(
    stack: Settings, faults: httpx.AsyncClient, livekit: api.LiveKitAPI
) -> None:
    avatars = AvatarActivities(stack)
    inp = avatar_input(stack)
    created = await run(avatars.create_avatar_session, inp)
    start = StartAvatarInput(avatar_session_id=created.avatar_session_id, session_token=created.session_token)
    await faults.post("/faults", json={"endpoint": "start", "status": 500, "count": 1})
    await raises_app_error(avatars.start_avatar_session, start, type_="LiveAvatarServerError", retryable=False)
    await faults.post("/faults", json={"endpoint": "start", "status": 503, "count": 1})
    await raises_app_error(avatars.start_avatar_session, start, type_="LiveAvatarServerError", retryable=True)
    await run(avatars.stop_avatar_session, AvatarRef(avatar_session_id=created.avatar_session_id))


async def test_a_repeated_start_counts_as_started_and_stop_is_idempotent(
    stack: Settings, livekit: api.LiveKitAPI, liveavatar: LiveAvatarClient
) -> None:
    inp = avatar_input(stack)
    await LiveKitActivities(stack).create_room(room_input(inp.room))
    avatars = AvatarActivities(stack)
    try:
        created = await run(avatars.create_avatar_session, inp)
        start = StartAvatarInput(avatar_session_id=created.avatar_session_id, session_token=created.session_token)
        await run(avatars.start_avatar_session, start)
        await run(avatars.start_avatar_session, start)  # the answer to the first was "lost": same outcome
        ref = AvatarRef(avatar_session_id=created.avatar_session_id)
        await run(avatars.stop_avatar_session, ref)
        await run(avatars.stop_avatar_session, ref)  # already ended counts as stopped
        assert (await liveavatar.get_session(created.avatar_session_id)).is_ended
    finally:
        await LiveKitActivities(stack).delete_room(inp.room)


async def test_avatar_token_without_publish_data_fails_start_for_good(stack: Settings, faults: httpx.AsyncClient) -> None:
    """LiveAvatar answers 500 to a bad livekit_config (reference §3.2); the engine's own avatar tokens always
    carry publish-data (tests/unit/test_grants.py), so this only guards the classification."""
    inp = avatar_input(stack)
    async with LiveAvatarClient(stack.liveavatar_api_url, stack.liveavatar_api_key.get_secret_value()) as client:
        observer_like = api.AccessToken(stack.livekit_api_key, stack.livekit_api_secret.get_secret_value()).with_identity(
            inp.identity
        ).with_grants(api.VideoGrants(room_join=True, room=inp.room, can_publish_data=False)).to_jwt()
        created = await client.create_session_token(
            DEFAULT_AVATAR_ID, livekit_url=stack.livekit_url, livekit_room=inp.room,
            livekit_client_token=observer_like, max_session_duration=300,
        )
    start = StartAvatarInput(avatar_session_id=created.session_id, session_token=created.session_token)
    await raises_app_error(AvatarActivities(stack).start_avatar_session, start, type_="LiveAvatarServerError", retryable=False)
