"""SessionWorkflow's timers, updates and cleanup, on the time-skipping test server with stub activities."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from itertools import groupby
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ApplicationError

from config.settings import Settings
from starters.client import (
    ExtendBeyondCap,
    RoomFull,
    SessionCancelled,
    SessionClient,
    SessionEnded,
    SessionNotFound,
    UnknownParticipant,
)
from tests.support.polling import eventually
from tests.support.worlds import StubWorld
from workflows.machine import SessionMachine
from workflows.models import (
    AvatarEndedBy,
    EndReason,
    JoinGrant,
    RoomEvent,
    RoomEventKind,
    SessionOutcome,
    SessionSpec,
    SessionState,
    SessionStatus,
    avatar_identity_for,
)
from workflows.search_attributes import AVATAR_SESSION_ID
from workflows.session import SessionWorkflow


def make_spec(**overrides: Any) -> SessionSpec:
    base: dict[str, Any] = {
        "session_id": f"s-{uuid.uuid4().hex[:12]}",
        "deployment": Settings().deployment,  # as SessionClient sets it: `room_name` is the real one
        "kind": "interview",
        "participants": [
            {"identity": "cand", "role": "candidate"},
            {"identity": "obs", "role": "observer"},
        ],
        "max_duration": timedelta(minutes=30),
        "max_duration_cap": timedelta(minutes=45),
        "no_show_timeout": timedelta(minutes=5),
    }
    return SessionSpec.model_validate(base | overrides)


async def admit(sessions: SessionClient, spec: SessionSpec, identity: str) -> JoinGrant:
    """Start the session and join it. The time-skipping server stops skipping time after an update-with-start,
    so these tests start and join in two calls; `SessionClient.join` (update-with-start) is covered by the
    integration tests on the real dev server."""
    await start(sessions, spec)
    return await sessions.join_running(spec.session_id, identity)


_handles: dict[str, WorkflowHandle[SessionWorkflow, SessionOutcome]] = {}


async def start(sessions: SessionClient, spec: SessionSpec) -> None:
    _handles.setdefault(spec.session_id, await sessions.start(spec))


async def outcome(sessions: SessionClient, spec: SessionSpec) -> SessionOutcome:
    """Wait for the session's result, letting the test server skip time. (The test server skips time for the
    handle `start_workflow` returned, not for one looked up by id, so keep that one.)"""
    return await asyncio.wait_for(_handles[spec.session_id].result(), timeout=120)  # bounded: a stuck session fails


async def joined(sessions: SessionClient, spec: SessionSpec, identity: str) -> None:
    """Tell the session `identity` is in the room, as the webhook receiver would."""
    await _room_event(sessions, spec, RoomEventKind.PARTICIPANT_JOINED, identity)


async def left(sessions: SessionClient, spec: SessionSpec, identity: str) -> None:
    await _room_event(sessions, spec, RoomEventKind.PARTICIPANT_LEFT, identity)


async def _room_event(sessions: SessionClient, spec: SessionSpec, kind: RoomEventKind, identity: str) -> None:
    await sessions.handle(spec.session_id).signal(
        SessionWorkflow.room_event, RoomEvent(event_id=f"ev-{uuid.uuid4()}", kind=kind, identity=identity)
    )


async def test_max_duration_ends_the_session_and_releases_the_room(sessions: SessionClient, world: StubWorld) -> None:
    spec = make_spec()
    grant = await admit(sessions, spec, "cand")
    assert grant.room == spec.room_name and grant.identity == "cand" and grant.token
    await joined(sessions, spec, "cand")
    result = await outcome(sessions, spec)
    assert result.end_reason is EndReason.MAX_DURATION
    assert result.status is SessionStatus.ENDED
    assert abs((result.ended_at - result.started_at) - spec.max_duration) < timedelta(seconds=5)
    assert world.names() == ["create_room", "mint_participant_token", "delete_room"]


async def test_nobody_joining_ends_the_session_as_no_show(sessions: SessionClient, world: StubWorld) -> None:
    spec = make_spec()
    await admit(sessions, spec, "cand")  # a grant alone is not presence: nobody connects
    result = await outcome(sessions, spec)
    assert result.end_reason is EndReason.NO_SHOW
    assert abs((result.ended_at - result.started_at) - spec.no_show_timeout) < timedelta(seconds=5)
    assert world.names()[-1] == "delete_room"


async def test_extend_moves_the_end_within_the_cap_and_refuses_beyond(sessions: SessionClient) -> None:
    spec = make_spec()
    await admit(sessions, spec, "cand")
    await joined(sessions, spec, "cand")
    before = await sessions.state(spec.session_id)
    after = await sessions.extend(spec.session_id, timedelta(minutes=10))
    assert after.ends_at - before.ends_at == timedelta(minutes=10)
    with pytest.raises(ExtendBeyondCap, match="at most 300 s more"):
        await sessions.extend(spec.session_id, timedelta(minutes=6))
    result = await outcome(sessions, spec)
    assert result.end_reason is EndReason.MAX_DURATION
    assert abs((result.ended_at - result.started_at) - timedelta(minutes=40)) < timedelta(seconds=5)


async def test_end_update_releases_everything_and_returns_the_outcome(sessions: SessionClient, world: StubWorld) -> None:
    spec = make_spec()
    await admit(sessions, spec, "cand")
    await joined(sessions, spec, "cand")
    ended = await sessions.end(spec.session_id, "interview over")
    assert ended.status is SessionStatus.ENDED
    assert ended.end_reason is EndReason.REQUESTED and ended.end_detail == "interview over"
    assert ended.participants_joined == ["cand"]
    assert world.names()[-1] == "delete_room"
    assert await outcome(sessions, spec) == ended


async def test_end_is_idempotent_and_a_closed_session_says_it_has_ended(sessions: SessionClient, world: StubWorld) -> None:
    spec = make_spec()
    await admit(sessions, spec, "cand")
    first = await sessions.end(spec.session_id, "interview over")
    await outcome(sessions, spec)  # closed
    assert await sessions.end(spec.session_id, "again") == first  # the recorded outcome, not a new end
    with pytest.raises(SessionEnded, match=r"has ended|ended"):
        await sessions.extend(spec.session_id, timedelta(minutes=1))
    with pytest.raises(SessionEnded):
        await sessions.join_running(spec.session_id, "cand")
    assert world.names().count("delete_room") == 1
    with pytest.raises(SessionNotFound, match="never started"):
        await sessions.end(f"never-{uuid.uuid4().hex[:8]}")


async def test_join_is_refused_with_typed_errors(sessions: SessionClient, world: StubWorld) -> None:
    spec = make_spec(max_participants=1)
    await admit(sessions, spec, "cand")
    with pytest.raises(RoomFull, match="1 of 1"):
        await sessions.join_running(spec.session_id, "obs")
    with pytest.raises(UnknownParticipant, match="not on the roster"):
        await sessions.join_running(spec.session_id, "stranger")
    # While the session is ending (its cleanup still running), the workflow itself refuses the join.
    world.delete_room_gate = asyncio.Event()
    ending = asyncio.ensure_future(sessions.end(spec.session_id))
    await eventually(lambda: "delete_room" in world.names(), what="the cleanup to start", timeout=10)
    with pytest.raises(SessionEnded, match="has ended \\(requested\\); start a new session id"):
        await sessions.join_running(spec.session_id, "cand")
    world.delete_room_gate.set()
    await asyncio.wait_for(ending, timeout=30)


async def test_cancel_runs_the_cleanup_and_closes_cancelled(sessions: SessionClient, world: StubWorld) -> None:
    spec = make_spec(avatar={"avatar_id": "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a", "start": "immediately"})
    await admit(sessions, spec, "cand")
    handle = sessions.handle(spec.session_id)
    await eventually(lambda: "keep_avatar_alive" in world.names(), what="the avatar to be kept alive", timeout=10)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await outcome(sessions, spec)
    assert (await handle.describe()).status is WorkflowExecutionStatus.CANCELED
    assert ("stop_avatar_session", "avatar-1") in world.calls
    assert ("delete_room", spec.room_name) in world.calls


async def test_avatar_is_recorded_before_it_is_started_and_stopped_at_the_end(
    sessions: SessionClient, world: StubWorld
) -> None:
    spec = make_spec(avatar={"avatar_id": "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a"})
    await admit(sessions, spec, "cand")
    assert "create_avatar_session" not in world.names()  # on_first_join: nobody in the room yet
    await joined(sessions, spec, "cand")
    await eventually(lambda: "keep_avatar_alive" in world.names(), what="the avatar to be kept alive", timeout=10)
    state = await sessions.state(spec.session_id)
    assert state.avatar_session_id == "avatar-1"
    desc = await sessions.handle(spec.session_id).describe()
    assert desc.typed_search_attributes.get(AVATAR_SESSION_ID) == ["avatar-1"]
    await sessions.end(spec.session_id)
    names = world.names()
    assert names.index("create_avatar_session") < names.index("start_avatar_session") < names.index("stop_avatar_session")
    result = await outcome(sessions, spec)
    assert result.avatar_sessions == ["avatar-1"]


AVATAR = "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a"


async def test_a_lost_avatar_is_replaced_with_backoff(sessions: SessionClient, world: StubWorld) -> None:
    world.avatar_ends_after = 0.3  # every avatar session "ends" shortly after it starts
    spec = make_spec(avatar={"avatar_id": AVATAR, "max_replacements": 2, "replace_backoff": "PT1S", "when_lost": "continue"})
    await admit(sessions, spec, "cand")
    await joined(sessions, spec, "cand")
    state = await eventually(
        lambda: _state_if(sessions, spec, lambda st: st.avatar_fallback), what="the avatar fallback", timeout=20
    )
    # The first avatar and two replacements, each stopped exactly once; then the session goes on without one.
    assert world.names().count("create_avatar_session") == 3
    assert sorted(a for n, a in world.calls if n == "stop_avatar_session") == ["avatar-1", "avatar-2", "avatar-3"]
    assert state.status is SessionStatus.DEGRADED
    assert [r for r in state.recoveries if r.startswith("avatar replacement")] == [
        "avatar replacement 1 after: the avatar session ended: AvatarSessionEnded: avatar session ended (IDLE_TIMEOUT)",
        "avatar replacement 2 after: the avatar session ended: AvatarSessionEnded: avatar session ended (IDLE_TIMEOUT)",
    ]
    desc = await sessions.handle(spec.session_id).describe()
    assert desc.typed_search_attributes.get(SearchAttributeKey.for_keyword("SessionStatus")) == "degraded"
    await sessions.end(spec.session_id)
    result = await outcome(sessions, spec)
    assert result.avatar_fallback and result.end_reason is EndReason.REQUESTED
    assert world.names().count("stop_avatar_session") == 3
    # The billing rows support reads: each avatar session billed from its start until LiveAvatar ended it.
    ended = "ended by LiveAvatar: AvatarSessionEnded: avatar session ended (IDLE_TIMEOUT)"
    assert [(b.avatar_session_id, b.identity, b.end_reason, b.ended_by) for b in result.avatar_billing] == [
        (f"avatar-{n}", avatar_identity_for(spec.session_id, n), ended, AvatarEndedBy.LIVEAVATAR) for n in (1, 2, 3)
    ]
    for b in result.avatar_billing:
        assert b.started_at is not None and b.ended_at is not None and b.started_at <= b.ended_at
        assert b.seconds == (b.ended_at - b.started_at).total_seconds()
    assert result.avatar_seconds == pytest.approx(sum(b.seconds for b in result.avatar_billing))
    # A closed session's outcome comes from its memo, billing rows included.
    assert (await sessions.recorded_outcome(spec.session_id)).avatar_billing == result.avatar_billing


async def test_an_avatar_that_cannot_start_ends_the_session_when_the_policy_says_so(
    sessions: SessionClient, world: StubWorld
) -> None:
    world.start_avatar_error = ApplicationError("LiveAvatar failed to start", type="LiveAvatarServerError", non_retryable=True)
    spec = make_spec(avatar={"avatar_id": AVATAR, "max_replacements": 1, "replace_backoff": "PT1S", "when_lost": "end"})
    await admit(sessions, spec, "cand")
    await joined(sessions, spec, "cand")
    result = await outcome(sessions, spec)
    assert result.end_reason is EndReason.AVATAR_LOST
    assert "did not start" in (result.end_detail or "")
    # Both recorded avatar sessions (first try, one replacement) were stopped, once each.
    assert sorted(a for n, a in world.calls if n == "stop_avatar_session") == ["avatar-1", "avatar-2"]
    assert world.names()[-1] in ("delete_room", "stop_avatar_session") and "delete_room" in world.names()


async def test_an_avatar_is_rotated_before_its_session_duration_cap(sessions: SessionClient, world: StubWorld) -> None:
    # The test server skips time only while no activity runs, so here keep-alive returns at once.
    world.keepalive_returns = True
    spec = make_spec(avatar={"avatar_id": AVATAR, "start": "immediately", "max_session_duration": "PT5M"})
    await admit(sessions, spec, "cand")
    await joined(sessions, spec, "cand")
    result = await outcome(sessions, spec)  # runs the full 30 minutes of skipped time
    assert result.end_reason is EndReason.MAX_DURATION
    # 30 min of session with 5-minute avatar sessions rotated a minute early: a fresh one every 4 minutes.
    assert len(result.avatar_sessions) == 8
    stops = [a for n, a in world.calls if n == "stop_avatar_session"]
    assert sorted(stops) == sorted(result.avatar_sessions) and len(set(stops)) == len(stops)
    assert all("rotated" in r for r in result.recoveries)


async def test_a_participant_who_drops_may_rejoin_within_the_grace(sessions: SessionClient) -> None:
    spec = make_spec(reconnect_grace="PT5M")
    await admit(sessions, spec, "cand")
    await joined(sessions, spec, "cand")
    await left(sessions, spec, "cand")
    state = await sessions.state(spec.session_id)
    assert state.status is SessionStatus.DEGRADED and state.reconnecting == ["cand"]
    await sessions.join_running(spec.session_id, "cand")  # a new join within the window is allowed
    await joined(sessions, spec, "cand")
    state = await sessions.state(spec.session_id)
    assert state.status is SessionStatus.LIVE and state.reconnecting == [] and "cand reconnected" in state.recoveries
    await sessions.end(spec.session_id)


@pytest.mark.parametrize(("policy", "others_stay"), [("end", True), ("continue", False)])
async def test_a_participant_who_does_not_return_ends_the_session_per_policy(
    sessions: SessionClient, policy: str, others_stay: bool
) -> None:
    spec = make_spec(
        participants=[{"identity": "cand", "role": "candidate"}, {"identity": "coach", "role": "coach"}],
        reconnect_grace="PT1M",
        when_participant_lost=policy,
    )
    await admit(sessions, spec, "cand")
    await joined(sessions, spec, "cand")
    if others_stay:
        await joined(sessions, spec, "coach")
    await left(sessions, spec, "cand")
    result = await outcome(sessions, spec)
    assert result.end_reason is EndReason.PARTICIPANT_LOST
    assert abs(result.ended_at - result.started_at) < timedelta(minutes=2)


async def test_with_continue_the_session_goes_on_with_who_is_left(sessions: SessionClient) -> None:
    spec = make_spec(
        participants=[{"identity": "cand", "role": "candidate"}, {"identity": "coach", "role": "coach"}],
        reconnect_grace="PT1M",
        when_participant_lost="continue",
    )
    await admit(sessions, spec, "cand")
    await joined(sessions, spec, "cand")
    await joined(sessions, spec, "coach")
    await left(sessions, spec, "cand")
    result = await outcome(sessions, spec)
    assert result.end_reason is EndReason.MAX_DURATION  # the coach stayed: the session ran its course
    assert "continued without cand" in result.recoveries


async def test_a_room_that_cannot_be_created_fails_the_session_after_cleanup(
    sessions: SessionClient, world: StubWorld
) -> None:
    world.create_room_error = ApplicationError("LiveKit refused: 401", type="LiveKitAuthError", non_retryable=True)
    spec = make_spec()
    with pytest.raises(SessionEnded):
        await admit(sessions, spec, "cand")
    with pytest.raises(WorkflowFailureError) as failure:
        await outcome(sessions, spec)
    assert "LiveKit refused: 401" in str(failure.value.cause)
    assert world.names() == ["create_room", "delete_room"]  # the room may exist: deleting is harmless


async def test_a_cancel_answers_updates_in_flight_with_a_typed_refusal_and_records_the_outcome(
    sessions: SessionClient, world: StubWorld
) -> None:
    world.create_room_gate = asyncio.Event()  # the room is still being created when the join comes
    spec = make_spec()
    await start(sessions, spec)
    await eventually(lambda: "create_room" in world.names(), what="the room create to start", timeout=10)
    join = asyncio.ensure_future(sessions.join_running(spec.session_id, "cand"))
    # The room create is a local activity: the join and the cancel reach the session when the worker next completes
    # the workflow task that holds it (its heartbeat, every ~8 s of a create); the room is still not there.
    await eventually(lambda: _accepted(sessions, spec, "join"), what="the join to reach the session", timeout=45)
    await sessions.handle(spec.session_id).cancel()
    await eventually(lambda: _cancel_seen(sessions, spec), what="the session to see the cancel", timeout=45)
    world.create_room_gate.set()
    with pytest.raises(SessionCancelled, match="has ended \\(cancelled\\)"):
        await asyncio.wait_for(join, timeout=30)
    with pytest.raises(WorkflowFailureError):
        await outcome(sessions, spec)
    assert (await sessions.handle(spec.session_id).describe()).status is WorkflowExecutionStatus.CANCELED
    recorded = await sessions.recorded_outcome(spec.session_id)
    assert recorded.end_reason is EndReason.CANCELLED and recorded.status is SessionStatus.ENDED
    # Deleted once its create had landed (the create held this long may have been retried past its 20 s timeout).
    assert [name for name, _ in groupby(world.names())] == ["create_room", "delete_room"]


async def _accepted(sessions: SessionClient, spec: SessionSpec, update: str) -> bool:
    events = (await sessions.handle(spec.session_id).fetch_history()).events
    return any(
        e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name == update
        for e in events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    )


async def _cancel_seen(sessions: SessionClient, spec: SessionSpec) -> bool:
    """A workflow task completed after the cancel request: the session has seen it (the room still being created)."""
    types = [e.event_type for e in (await sessions.handle(spec.session_id).fetch_history()).events]
    if EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED not in types:
        return False
    after = types[types.index(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED):]
    return EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in after


async def test_a_cancel_after_the_end_keeps_the_outcome(sessions: SessionClient, world: StubWorld) -> None:
    spec = make_spec()
    await admit(sessions, spec, "cand")
    world.delete_room_gate = asyncio.Event()  # the cleanup is still running when the cancel comes
    ending = asyncio.ensure_future(sessions.end(spec.session_id, "interview over"))
    await eventually(lambda: "delete_room" in world.names(), what="the cleanup to start", timeout=10)
    await sessions.handle(spec.session_id).cancel()
    world.delete_room_gate.set()
    ended = await asyncio.wait_for(ending, timeout=30)
    assert ended.end_reason is EndReason.REQUESTED and ended.end_detail == "interview over"
    assert await outcome(sessions, spec) == ended  # COMPLETED with the outcome, not CANCELED without it
    assert world.names().count("delete_room") == 1


async def test_a_bug_fails_the_workflow_task_and_a_fixed_worker_resumes_the_session(
    sessions: SessionClient, world: StubWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain exception in workflow code (here: in the room-created step, which runs in a spawned task) must
    not leave the session hanging: the workflow task fails, visibly, and is retried until the code is fixed."""

    def bug(self: SessionMachine, now: object) -> object:
        raise KeyError("injected bug")

    monkeypatch.setattr(SessionMachine, "_on_room_created", bug)
    spec = make_spec()
    await start(sessions, spec)
    handle = sessions.handle(spec.session_id)

    async def failing_task() -> str | None:
        history = await handle.fetch_history()
        failures = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
        return failures[-1].workflow_task_failed_event_attributes.failure.message if failures else None

    message = await eventually(failing_task, what="the workflow task to fail", timeout=20)
    assert "injected bug" in message
    assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING  # paused, not failed, not hanging
    monkeypatch.undo()  # the fixed deploy
    await eventually(
        lambda: _state_if(sessions, spec, lambda st: st.status is SessionStatus.WAITING),
        what="the session to resume once the bug is fixed", timeout=30,
    )
    ended = await sessions.end(spec.session_id, "after the fix")
    assert ended.status is SessionStatus.ENDED and world.names().count("delete_room") == 1


async def _state_if(sessions: SessionClient, spec: SessionSpec, ok: Any) -> SessionState | None:
    state = await sessions.state(spec.session_id)
    return state if ok(state) else None


async def test_the_current_details_tell_what_the_session_is_doing_after_every_change(sessions: SessionClient) -> None:
    spec = make_spec()
    await admit(sessions, spec, "cand")
    handle = sessions.handle(spec.session_id)

    async def details() -> str:
        metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        return metadata.current_details

    assert (await details()).startswith("**waiting**") and "present: nobody" in await details()
    await joined(sessions, spec, "cand")
    assert (await details()).startswith("**live**") and "present: cand" in await details()
    await left(sessions, spec, "cand")  # no status change needed for the details to follow
    assert "reconnecting: cand" in await details()
    await sessions.end(spec.session_id, "interview over")
    assert (await details()).startswith("**ended**") and "end: requested (interview over)" in await details()
