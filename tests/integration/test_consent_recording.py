"""Recording with consent against the real LiveKit server, which has no egress service locally: the session
asks for the recording only once everyone named consented, sends the request for its own room, takes the
server's refusal cleanly (recording `unavailable`, the session goes on), and keeps every consent event."""

from __future__ import annotations

import pytest
from temporalio.api.enums.v1 import EventType

from starters.client import SessionClient, UnknownParticipant
from tests.integration.test_show_and_list import sessionflow
from tests.support.polling import eventually
from tests.support.specs import interview
from workflows.models import EndReason, RecordingStatus, SessionState, SessionStatus

pytestmark = pytest.mark.stack


async def test_recording_waits_for_consent_and_the_servers_refusal_leaves_the_session_going(sessions: SessionClient) -> None:
    spec = interview(avatar=None, recording={"participants": ["cand"]})
    await sessions.join(spec, "cand")
    with pytest.raises(UnknownParticipant):
        await sessions.consent(spec.session_id, "watcher", True)  # on the roster, but not asked
    assert await _recording_requests(sessions, spec.session_id) == []  # nothing asked of LiveKit without consent

    await sessions.consent(spec.session_id, "cand", True)

    async def refused() -> SessionState | None:
        state = await sessions.state(spec.session_id)
        assert state.recording is not None
        return state if state.recording.status is RecordingStatus.UNAVAILABLE else None

    # Each attempt waits for an egress service that is not there (LiveKit answers 503 after ~20 s; our call
    # timeout is 10 s), tried twice.
    state = await eventually(refused, what="the recording to be refused", timeout=60)
    assert state.recording is not None and "LiveKit" in (state.recording.detail or "")
    assert state.status is SessionStatus.WAITING and state.end_reason is None  # the session goes on
    assert await _recording_requests(sessions, spec.session_id) == [{"session_id": spec.session_id, "room": spec.room_name}]

    outcome = await sessions.end(spec.session_id, "interview over")
    assert outcome.end_reason is EndReason.REQUESTED and outcome.recording is not None
    assert outcome.recording.status is RecordingStatus.UNAVAILABLE
    assert [(c.identity, c.granted) for c in outcome.recording.consents] == [("cand", True)]


async def _recording_requests(sessions: SessionClient, session_id: str) -> list[object]:
    """The inputs of every start_recording the session scheduled, as its history holds them."""
    found = []
    async for event in sessions.handle(session_id).fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled = event.activity_task_scheduled_event_attributes
            if scheduled.activity_type.name == "start_recording":
                # Payloads are encrypted (workers/codec.py): read through the client's converter.
                [request] = await sessions.client.data_converter.decode([scheduled.input.payloads[0]], [dict])
                found.append(request)
    return found


async def test_the_cli_gives_and_withdraws_consent_and_says_where_the_recording_stands(sessions: SessionClient) -> None:
    spec = interview(avatar=None, recording={"participants": ["cand", "watcher"]})
    await sessions.join(spec, "cand")
    try:
        rc, stdout, stderr = await sessionflow("consent", spec.session_id, "cand", "grant")
        assert (rc, stdout.strip(), stderr) == (0, "recording: waiting_for_consent; consented: cand; waiting for: watcher", "")
        rc, stdout, _ = await sessionflow("consent", spec.session_id, "cand", "withdraw")
        assert (rc, stdout.strip()) == (0, "recording: waiting_for_consent; consented: nobody; waiting for: cand, watcher")
        rc, stdout, stderr = await sessionflow("consent", spec.session_id, "nobody-asked", "grant")
        assert rc == 2 and stdout == "" and "'nobody-asked' is not asked for consent" in stderr
    finally:
        outcome = await sessions.end(spec.session_id)
    assert outcome.recording is not None
    assert [(c.identity, c.granted) for c in outcome.recording.consents] == [("cand", True), ("cand", False)]
