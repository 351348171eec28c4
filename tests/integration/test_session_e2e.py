"""Whole sessions on the real stack, with real LiveKit participants joining on the tokens the session mints."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from livekit import api, rtc
from livekit.rtc.participant import PublishTrackError
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError

from activities.liveavatar_client import LiveAvatarClient, SessionEndReason
from sandbox.media import SyntheticMedia, join_room
from starters.client import InvalidInput, SessionClient, SessionEnded, UnknownParticipant
from tests.support.histories import record_history
from tests.support.livekit import room_names
from tests.support.polling import eventually
from tests.support.specs import interview
from workflows.models import EndReason, SessionState, SessionStatus, avatar_identity_prefix

pytestmark = pytest.mark.stack


def avatar_video_in(room: rtc.Room, session_id: str) -> str | None:
    """The identity of an avatar of this session whose video `room` receives."""
    return next(
        (
            identity
            for identity, p in room.remote_participants.items()
            if identity.startswith(avatar_identity_prefix(session_id))
            and any(pub.kind == rtc.TrackKind.KIND_VIDEO and pub.subscribed for pub in p.track_publications.values())
        ),
        None,
    )


async def test_a_full_avatar_interview_releases_its_room_and_avatar(
    sessions: SessionClient, livekit: api.LiveKitAPI, liveavatar: LiveAvatarClient
) -> None:
    spec = interview()
    grant = await sessions.join(spec, "cand")
    assert grant.room == spec.room_name and grant.identity == "cand"
    assert await room_names(livekit, spec.room_name) == [spec.room_name]

    async with join_room(grant.url, grant.token, publish_media=True) as room:
        # The avatar starts once a human is in the room, joins with its own token and publishes video.
        avatar_identity = await eventually(
            lambda: avatar_video_in(room, spec.session_id), what="the avatar's video track", timeout=45
        )
        state = await eventually(
            lambda: _state_when(
                sessions, spec.session_id, lambda s: s.status is SessionStatus.LIVE and s.avatar_present and s.present == ["cand"]
            ),
            what="the session to see the candidate and the avatar", timeout=30,
        )
        avatar_id = state.avatar_session_id
        assert avatar_id is not None and state.avatar_identity == avatar_identity
        assert not (await liveavatar.get_session(avatar_id)).is_ended

        final = await sessions.end(spec.session_id, "interview over")

    assert final.status is SessionStatus.ENDED and final.end_reason is EndReason.REQUESTED
    assert await room_names(livekit, spec.room_name) == []
    entry = await liveavatar.get_session(avatar_id)
    assert entry.is_ended and entry.end_reason is SessionEndReason.USER_CLOSED
    active = await liveavatar.list_sessions("active", page_size=100)
    assert avatar_id not in [s.id for s in active.results]

    handle = sessions.handle(spec.session_id)
    outcome = await handle.result()
    assert outcome.avatar_sessions == [avatar_id] and outcome.participants_joined == ["cand"]
    assert outcome.live_seconds > 0 and outcome.avatar_seconds > 0
    await record_history(handle, "full_avatar_interview")


async def test_a_join_is_answered_in_the_sessions_first_workflow_task(
    sessions: SessionClient, livekit: api.LiveKitAPI
) -> None:
    """One round trip through the server per join (`local-room-create`): the first workflow task creates the room,
    mints the token (both local activities, markers in history) and answers the update."""
    spec = interview(avatar=None)
    grant = await sessions.join(spec, "cand")
    assert await room_names(livekit, spec.room_name) == [spec.room_name]  # the room the grant is for exists
    events = (await sessions.handle(spec.session_id).fetch_history()).events
    answered = next(
        i for i, e in enumerate(events) if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED
    )
    before = [e.event_type for e in events[:answered]]
    assert before.count(EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED) == 1, [EventType.Name(t) for t in before]
    scheduled = {
        e.activity_task_scheduled_event_attributes.activity_type.name for e in events[:answered]
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }
    assert not scheduled & {"create_room", "mint_participant_token"}  # no activity round trip on the join's path
    local = [
        e.marker_recorded_event_attributes.marker_name for e in events[:answered]
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
        and e.marker_recorded_event_attributes.marker_name == "core_local_activity"
    ]
    assert len(local) == 2  # the room create, then the token
    assert grant.room == spec.room_name and grant.identity == "cand"
    await sessions.end(spec.session_id, "checked")
    assert await room_names(livekit, spec.room_name) == []


async def test_an_observer_can_watch_but_not_publish(sessions: SessionClient, livekit: api.LiveKitAPI) -> None:
    spec = interview(avatar=None)
    grant = await sessions.join(spec, "watcher")
    async with join_room(grant.url, grant.token, publish_media=False) as room:
        info = await livekit.room.get_participant(api.RoomParticipantIdentity(room=spec.room_name, identity="watcher"))
        assert not info.permission.can_publish and not info.permission.can_publish_data
        assert info.permission.can_subscribe
        # The server never acknowledges a track from a participant without the publish grant.
        media = SyntheticMedia()
        with pytest.raises(PublishTrackError):
            await media.start(room)
        await media.stop()
        info = await livekit.room.get_participant(api.RoomParticipantIdentity(room=spec.room_name, identity="watcher"))
        assert list(info.tracks) == [], "the server accepted a track from an observer"
    await sessions.end(spec.session_id)
    await record_history(sessions.handle(spec.session_id), "observer_only")


async def test_joining_an_ended_session_is_refused(sessions: SessionClient, livekit: api.LiveKitAPI) -> None:
    spec = interview(avatar=None)
    await sessions.join(spec, "cand")
    await sessions.end(spec.session_id)
    with pytest.raises(SessionEnded, match="has ended"):
        await sessions.join(spec, "cand")
    # Refused means refused: no new run started, no room came back.
    assert (await sessions.handle(spec.session_id).describe()).status is WorkflowExecutionStatus.COMPLETED
    assert await room_names(livekit, spec.room_name) == []
    await record_history(sessions.handle(spec.session_id), "ended_then_join_refused")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"participants": [{"identity": "cand", "role": "ceo"}]}, "role"),
        ({"session_id": "Bad Id!"}, "session_id"),
        ({"metadata": {f"note{i}": "x" * 1000 for i in range(5)}}, "4096"),
        ({"participants": "cand"}, "participants"),
        ({"max_duration": "forever"}, "max_duration"),
        ({"surprise": True}, "surprise"),
    ],
    ids=["unknown-role", "malformed-session-id", "oversize-metadata", "wrong-type", "bad-duration", "extra-field"],
)
async def test_bad_input_is_rejected_before_anything_exists(
    sessions: SessionClient, livekit: api.LiveKitAPI, change: dict[str, Any], expected: str
) -> None:
    session_id = f"it-{uuid.uuid4().hex[:10]}"
    raw = interview(session_id=session_id).model_dump(mode="json") | change
    with pytest.raises(InvalidInput, match=expected):
        await sessions.join(raw, "cand")
    await _assert_nothing_exists(sessions, livekit, raw["session_id"])


async def test_an_identity_not_on_the_roster_starts_nothing(sessions: SessionClient, livekit: api.LiveKitAPI) -> None:
    spec = interview()
    with pytest.raises(UnknownParticipant, match="not on the roster"):
        await sessions.join(spec, "stranger")
    with pytest.raises(InvalidInput, match="identity"):
        await sessions.join(spec, "no spaces allowed")
    await _assert_nothing_exists(sessions, livekit, spec.session_id)


async def _assert_nothing_exists(sessions: SessionClient, livekit: api.LiveKitAPI, session_id: str) -> None:
    with pytest.raises(RPCError, match="not found"):
        await sessions.client.get_workflow_handle(f"session-{session_id}").describe()
    assert await room_names(livekit, f"session-{session_id}") == []


async def _state_when(sessions: SessionClient, session_id: str, ok: Callable[[SessionState], bool]) -> SessionState | None:
    state = await sessions.state(session_id)
    return state if ok(state) else None
