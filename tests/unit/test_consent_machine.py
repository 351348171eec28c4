"""The recording's rules in the pure machine: consent gates it, a withdrawal stops it, the end stops it, and the
session never closes with an egress on its way up or down."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workflows.machine import (
    Consent,
    DeleteRoom,
    EndRequested,
    NotRecorded,
    ParticipantJoined,
    RecordingBegan,
    RecordingStartFailed,
    RecordingStopped,
    RoomCreated,
    RoomDeleted,
    SessionMachine,
    StartRecording,
    StopRecording,
    UnexpectedEvent,
    UnknownParticipant,
)
from workflows.models import RecordingStatus, SessionSpec, SessionStatus, StartRecordingInput

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
ASKED = ("alice", "bob")


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def machine(recording: bool = True) -> SessionMachine:
    spec = SessionSpec.model_validate({
        "session_id": "rec-1", "kind": "coaching",
        "participants": [{"identity": "alice", "role": "candidate"}, {"identity": "bob", "role": "coach"},
                         {"identity": "eve", "role": "observer"}],
        "recording": {"participants": list(ASKED)} if recording else None,
    })
    m = SessionMachine(spec, started_at=T0)
    m.begin()
    m.handle(RoomCreated(), at(1))
    m.handle(ParticipantJoined("alice"), at(2))
    return m


START = StartRecording(StartRecordingInput(session_id="rec-1", room="session-rec-1"))


def test_the_recording_starts_with_the_last_consent_and_not_before() -> None:
    m = machine()
    assert m.handle(Consent("alice", granted=True), at(3)) == []
    assert m.handle(Consent("bob", granted=True), at(4)) == [START]
    assert m.handle(RecordingBegan("EG_1"), at(5)) == []
    report = m.recording_report()
    assert report is not None and report.status is RecordingStatus.RECORDING and report.egress_ids == ["EG_1"]


def test_a_withdrawal_while_starting_stops_it_as_soon_as_it_has_started() -> None:
    m = machine()
    m.handle(Consent("alice", granted=True), at(3))
    m.handle(Consent("bob", granted=True), at(4))
    assert m.handle(Consent("alice", granted=False), at(4.5)) == []  # the start is in flight
    assert m.handle(RecordingBegan("EG_1"), at(5)) == [StopRecording("EG_1")]
    assert m.handle(RecordingStopped("EG_1"), at(6)) == []
    report = m.recording_report()
    assert report is not None and report.status is RecordingStatus.WAITING_FOR_CONSENT and report.waiting_for == ["alice"]


def test_consent_before_the_room_exists_starts_the_recording_with_the_room() -> None:
    spec = machine().spec
    m = SessionMachine(spec, started_at=T0)
    m.begin()
    m.handle(Consent("alice", granted=True), at(0.5))
    m.handle(Consent("bob", granted=True), at(0.6))
    assert START in m.handle(RoomCreated(), at(1))


def test_the_end_stops_the_recording_and_the_session_closes_only_once_it_has_stopped() -> None:
    m = machine()
    m.handle(Consent("alice", granted=True), at(3))
    m.handle(Consent("bob", granted=True), at(4))
    m.handle(RecordingBegan("EG_1"), at(5))
    commands = m.handle(EndRequested("done"), at(6))
    assert commands.index(StopRecording("EG_1")) < commands.index(DeleteRoom("session-rec-1"))
    m.handle(RoomDeleted(), at(7))
    assert not m.released  # the egress is still stopping
    m.handle(RecordingStopped("EG_1"), at(8))
    assert m.released and m.outcome().status is SessionStatus.ENDED
    outcome = m.outcome()
    assert outcome.recording is not None and [(c.identity, c.granted) for c in outcome.recording.consents] == [
        ("alice", True), ("bob", True)
    ]


def test_a_refused_start_is_final_for_the_session_and_the_session_goes_on() -> None:
    m = machine()
    m.handle(Consent("alice", granted=True), at(3))
    m.handle(Consent("bob", granted=True), at(4))
    assert m.handle(RecordingStartFailed("no egress"), at(5)) == []
    assert m.ending is None and m.status is SessionStatus.LIVE
    m.handle(Consent("bob", granted=False), at(6))
    assert m.handle(Consent("bob", granted=True), at(7)) == []  # not tried again
    report = m.recording_report()
    assert report is not None and report.status is RecordingStatus.UNAVAILABLE and "no egress" in (report.detail or "")


def test_consent_refusals() -> None:
    with pytest.raises(NotRecorded):
        machine(recording=False).check_consent("alice")
    with pytest.raises(UnknownParticipant):
        machine().check_consent("eve")
    with pytest.raises(UnexpectedEvent):
        machine().handle(RecordingBegan("EG_9"), at(3))  # nothing was starting


@given(st.lists(st.tuples(st.sampled_from(ASKED), st.booleans()), max_size=20))
def test_recording_is_on_exactly_while_everyone_asked_consents(decisions: list[tuple[str, bool]]) -> None:
    """With each start and stop answered at once: recording after every decision iff each asked participant's
    latest decision is a grant, and every decision is kept in order."""
    m, live, t, latest = machine(), False, 3.0, dict[str, bool]()
    for who, granted in decisions:
        latest[who] = granted
        pending = m.handle(Consent(who, granted=granted), at(t))
        while pending:
            t += 0.1
            command = pending.pop(0)
            if isinstance(command, StartRecording):
                live, answer = True, m.handle(RecordingBegan(f"EG_{t:.1f}"), at(t))
            else:
                assert isinstance(command, StopRecording)
                live, answer = False, m.handle(RecordingStopped(command.egress_id), at(t))
            pending += answer
        t += 1
        assert live == all(latest.get(p, False) for p in ASKED)
    report = m.recording_report()
    assert report is not None and [(c.identity, c.granted) for c in report.consents] == decisions
