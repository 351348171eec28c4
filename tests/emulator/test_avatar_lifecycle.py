"""The emulated avatar in a real LiveKit room, and how sessions end (reference §3.2, §5, §6, §9.5).

Every test observes the room with a real rtc participant (or the server's participant list), never the emulator's
word alone.
"""

from __future__ import annotations

import asyncio

from livekit import rtc

from tests.support.emulator import Emulator, EmulatorFactory
from tests.support.livekit import AUDIO_AND_VIDEO, LiveKit, observer, subscribed_kinds
from tests.support.polling import eventually


async def _frames_arrive(track: rtc.Track) -> None:
    """Wait for the first frame of ``track``: media really flows, not just a publication."""
    stream: rtc.VideoStream | rtc.AudioStream = (
        rtc.VideoStream(track) if track.kind == rtc.TrackKind.KIND_VIDEO else rtc.AudioStream(track)
    )
    try:
        async with asyncio.timeout(10):
            await anext(aiter(stream))
    finally:
        await stream.aclose()


async def test_avatar_joins_publishes_and_leaves_on_stop(emulator: Emulator, livekit: LiveKit, room: str) -> None:
    session = await emulator.create_session(room, identity="avatar-under-test")
    async with observer(livekit, room) as viewer:
        response = await emulator.start(session)
        assert response.status_code == 201, response.text
        # /start answers once the avatar is in: the server already lists it.
        assert "avatar-under-test" in await livekit.identities(room)
        await eventually(
            lambda: subscribed_kinds(viewer, "avatar-under-test") == AUDIO_AND_VIDEO,
            timeout=10, what="the observer to receive the avatar's audio and video tracks",
        )
        avatar = next(p for p in viewer.remote_participants.values() if p.identity == "avatar-under-test")
        for publication in avatar.track_publications.values():
            assert publication.track is not None
            await _frames_arrive(publication.track)
        assert (await emulator.control_view(session.id))["avatar_present"] is True

        stop = await emulator.http.post("/v1/sessions/stop", headers=session.bearer, json={"reason": "USER_CLOSED"})
        assert stop.status_code == 200
        await eventually(
            lambda: "avatar-under-test" not in {p.identity for p in viewer.remote_participants.values()},
            timeout=10, what="the avatar to leave the room after stop",
        )
    assert "avatar-under-test" not in await livekit.identities(room)
    assert (await emulator.entry(session.id))["end_reason"] == "USER_CLOSED"


async def test_start_fails_with_500_when_the_token_lacks_can_publish_data(
    emulator: Emulator, livekit: LiveKit, room: str
) -> None:
    session = await emulator.create_session(room, can_publish_data=False)
    response = await emulator.start(session)
    assert response.status_code == 500
    assert "canpublishdata" in response.json()["message"].lower()
    assert await livekit.identities(room) == set()
    assert (await emulator.control_view(session.id))["state"] == "created"  # nothing billed, nothing running


async def test_start_fails_with_500_when_the_avatar_cannot_join(emulator: Emulator, livekit: LiveKit) -> None:
    # Room auto-creation is off on our server: a room nobody created cannot be joined.
    session = await emulator.create_session("room-that-does-not-exist")
    response = await emulator.start(session)
    assert response.status_code == 500
    assert "could not join" in response.json()["message"]
    credits = await emulator.http.get("/v1/users/credits", headers=emulator.key)
    assert credits.json()["data"]["credits_left"] == emulator.config.credits  # escrow refunded


async def test_idle_timeout_ends_the_session_and_the_avatar_leaves(
    emulator_factory: EmulatorFactory, livekit: LiveKit, room: str
) -> None:
    emulator = await emulator_factory(idle_timeout_s=1.5)
    session = await emulator.started_session(room)
    kept = await emulator.started_session()
    for _ in range(4):  # keep-alives hold one session past its idle timeout, the other one idles out
        assert (await emulator.http.post("/v1/sessions/keep-alive", headers=kept.bearer, json={})).status_code == 200
        await asyncio.sleep(0.5)  # the keep-alive cadence; 4 rounds = 2 s, longer than the idle timeout under test
    entry = await emulator.wait_ended(session.id)
    assert entry["end_reason"] == "IDLE_TIMEOUT"
    assert "end_at" not in await emulator.entry(kept.id)

    async def avatar_gone() -> bool:
        return session.avatar_identity not in await livekit.identities(room)

    await eventually(avatar_gone, timeout=10, what="the idle avatar to leave the room")


async def test_max_duration_and_sandbox_length_end_with_max_duration_reached(
    emulator_factory: EmulatorFactory, livekit: LiveKit, room: str
) -> None:
    emulator = await emulator_factory(sandbox_session_s=1)
    limited = await emulator.started_session(room, max_session_duration=1)
    sandbox = await emulator.started_session(is_sandbox=True)
    for session in (limited, sandbox):
        entry = await emulator.wait_ended(session.id, timeout=5)
        assert entry["end_reason"] == "MAX_DURATION_REACHED"
    assert entry["credits_consumed"] == 0  # sandbox is free

    async def avatar_gone() -> bool:
        return limited.avatar_identity not in await livekit.identities(room)

    await eventually(avatar_gone, timeout=10, what="the avatar to leave at max duration")


async def test_avatar_left_alone_is_reaped_as_a_zombie(
    emulator_factory: EmulatorFactory, livekit: LiveKit, room: str
) -> None:
    emulator = await emulator_factory(zombie_reap_s=1.0)
    async with observer(livekit, room, hidden=False):  # someone the avatar can see
        session = await emulator.started_session(room)
        await asyncio.sleep(1.5)  # longer than the reap delay: company keeps it alive
        assert "end_at" not in await emulator.entry(session.id)
    entry = await emulator.wait_ended(session.id, timeout=5)
    assert entry["end_reason"] == "ZOMBIE_SESSION_REAP"


async def test_running_out_of_credits_ends_with_no_credits(emulator_factory: EmulatorFactory) -> None:
    emulator = await emulator_factory(credits=2.5, billing_period_s=0.3)
    session = await emulator.started_session()
    entry = await emulator.wait_ended(session.id, timeout=5)
    assert entry["end_reason"] == "NO_CREDITS" and entry["credits_consumed"] == 2.0
