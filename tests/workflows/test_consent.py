"""Recording only with consent (issue 9, item 5), through the real SessionWorkflow on the time-skipping server.

The egress activities are stand-ins here (the local LiveKit server has no egress service: the refusal path runs
against it in tests/integration/test_consent_recording.py). These tests drive the gating: recording starts
only once every participant the spec names has consented, stops the moment one withdraws, starts again when
everyone consents again, stops at the end; every consent event is in the history and in the outcome.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from config.settings import Settings
from starters.client import NotRecorded, SessionClient, SessionEnded, UnknownParticipant
from tests.support.polling import eventually
from tests.support.worlds import StubWorld
from workflows.models import (
    EndReason,
    RecordingStarted,
    RecordingStatus,
    SessionSpec,
    StartRecordingInput,
)
from workflows.session import SessionWorkflow


@dataclass
class Egress:
    """A stand-in for LiveKit's egress service that records every request it gets."""

    started: list[StartRecordingInput] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    refuse: ApplicationError | None = None
    fail_stop: ApplicationError | None = None

    @activity.defn(name="start_recording")
    async def start_recording(self, inp: StartRecordingInput) -> RecordingStarted:
        self.started.append(inp)
        if self.refuse:
            raise self.refuse
        return RecordingStarted(egress_id=f"EG_{len(self.started)}")

    @activity.defn(name="stop_recording")
    async def stop_recording(self, egress_id: str) -> None:
        if self.fail_stop:
            raise self.fail_stop
        self.stopped.append(egress_id)


@pytest.fixture
def egress() -> Egress:
    return Egress()


@pytest.fixture
async def recorded_sessions(
    time_skipping_env: WorkflowEnvironment, world: StubWorld, egress: Egress
) -> AsyncIterator[SessionClient]:
    task_queue = f"tq-{uuid.uuid4()}"
    async with Worker(
        time_skipping_env.client,
        task_queue=task_queue,
        workflows=[SessionWorkflow],
        activities=[*world.all(), egress.start_recording, egress.stop_recording],
    ):
        yield SessionClient(time_skipping_env.client, Settings(), task_queue=task_queue)


def make_spec(**overrides: Any) -> SessionSpec:
    return SessionSpec.model_validate(
        {
            "session_id": f"rec-{uuid.uuid4().hex[:10]}",
            "deployment": Settings().deployment,
            "kind": "coaching",
            "participants": [{"identity": "coachee", "role": "candidate"}, {"identity": "coach", "role": "coach"},
                             {"identity": "watcher", "role": "observer"}],
            "max_duration": timedelta(minutes=30),
            "recording": {"participants": ["coachee", "coach"]},
        }
        | overrides
    )


async def test_recording_starts_only_once_everyone_named_consents_and_stops_when_one_withdraws(
    recorded_sessions: SessionClient, egress: Egress
) -> None:
    sessions, spec = recorded_sessions, make_spec()
    handle = await sessions.start(spec)
    await sessions.join_running(spec.session_id, "coachee")  # the room exists once a join is answered

    state = await sessions.consent(spec.session_id, "coachee", True)
    assert state.recording is not None and state.recording.status is RecordingStatus.WAITING_FOR_CONSENT
    assert state.recording.waiting_for == ["coach"] and egress.started == []

    state = await sessions.consent(spec.session_id, "coach", True)
    assert state.recording is not None and state.recording.status in (RecordingStatus.STARTING, RecordingStatus.RECORDING)
    await eventually(lambda: _recording_is(sessions, spec, RecordingStatus.RECORDING), what="recording", timeout=10)
    assert egress.started == [StartRecordingInput(session_id=spec.session_id, room=spec.room_name)]  # the request sent

    state = await sessions.consent(spec.session_id, "coach", False)  # withdrawn: stops at once
    await eventually(lambda: _recording_is(sessions, spec, RecordingStatus.WAITING_FOR_CONSENT), what="stop", timeout=10)
    assert egress.stopped == ["EG_1"]

    await sessions.consent(spec.session_id, "coach", True)  # everyone again: a new egress
    await eventually(lambda: _recording_is(sessions, spec, RecordingStatus.RECORDING), what="recording again", timeout=10)

    outcome = await sessions.end(spec.session_id, "session over")
    assert egress.stopped == ["EG_1", "EG_2"]  # the end stops it before the session closes
    recording = outcome.recording
    assert recording is not None and recording.egress_ids == ["EG_1", "EG_2"]
    assert [(c.identity, c.granted) for c in recording.consents] == [
        ("coachee", True), ("coach", True), ("coach", False), ("coach", True)
    ]
    assert [c.at for c in recording.consents] == sorted(c.at for c in recording.consents)
    # Every consent event is in the history, as an accepted update with its identity and decision.
    accepted = [
        e.workflow_execution_update_accepted_event_attributes.accepted_request
        async for e in handle.fetch_history_events()
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    ]
    consent_inputs = [r.input for r in accepted if r.input.name == "consent"]
    assert len(consent_inputs) == 4


async def test_a_refused_recording_leaves_the_session_going_unrecorded(
    recorded_sessions: SessionClient, egress: Egress
) -> None:
    egress.refuse = ApplicationError("LiveKit refused to start recording: 503 unavailable", type="LiveKit_unavailable")
    sessions, spec = recorded_sessions, make_spec(recording={"participants": ["coachee"]})
    await sessions.start(spec)
    await sessions.join_running(spec.session_id, "coachee")
    await sessions.consent(spec.session_id, "coachee", True)
    state = await eventually(
        lambda: _recording_is(sessions, spec, RecordingStatus.UNAVAILABLE), what="the refusal recorded", timeout=30
    )
    assert state.recording is not None and "503 unavailable" in (state.recording.detail or "")
    assert state.end_reason is None  # the session goes on
    assert len(egress.started) == 2  # tried twice (RECORDING_START), then given up for this session
    outcome = await sessions.end(spec.session_id)
    assert outcome.end_reason is EndReason.REQUESTED and outcome.recording is not None
    assert outcome.recording.status is RecordingStatus.UNAVAILABLE and outcome.recording.egress_ids == []


async def test_a_recording_that_cannot_be_stopped_after_a_withdrawal_closes_the_room(
    recorded_sessions: SessionClient, egress: Egress
) -> None:
    sessions, spec = recorded_sessions, make_spec(recording={"participants": ["coachee"]})
    await sessions.start(spec)
    await sessions.join_running(spec.session_id, "coachee")
    await sessions.consent(spec.session_id, "coachee", True)
    await eventually(lambda: _recording_is(sessions, spec, RecordingStatus.RECORDING), what="recording", timeout=10)
    egress.fail_stop = ApplicationError("egress service gone", type="LiveKit_internal", non_retryable=True)
    await sessions.consent(spec.session_id, "coachee", False)
    outcome = await sessions.outcome(spec.session_id)
    assert outcome.end_reason is EndReason.RECORDING_NOT_STOPPED and "egress service gone" in (outcome.end_detail or "")


async def test_consent_is_refused_for_someone_not_asked_for_a_session_not_recorded_and_after_the_end(
    recorded_sessions: SessionClient, egress: Egress
) -> None:
    sessions, spec = recorded_sessions, make_spec()
    await sessions.start(spec)
    with pytest.raises(UnknownParticipant, match="'watcher' is not asked for consent"):
        await sessions.consent(spec.session_id, "watcher", True)
    unrecorded = make_spec(recording=None)
    await sessions.start(unrecorded)
    with pytest.raises(NotRecorded, match="is not recorded"):
        await sessions.consent(unrecorded.session_id, "coachee", True)
    await sessions.end(spec.session_id)
    with pytest.raises(SessionEnded):
        await sessions.consent(spec.session_id, "coachee", True)
    await sessions.end(unrecorded.session_id)
    state_after = await sessions.recorded_outcome(spec.session_id)
    assert state_after.recording is not None and state_after.recording.consents == []  # nothing refused was kept
    assert egress.started == []


async def _recording_is(sessions: SessionClient, spec: SessionSpec, status: RecordingStatus) -> Any:
    state = await sessions.state(spec.session_id)
    return state if state.recording is not None and state.recording.status is status else None
