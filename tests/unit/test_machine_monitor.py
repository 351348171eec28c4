"""The room monitor's side of the machine: one event stream with the webhooks (deduplicated, any order), the
quality policy, a frozen or silent avatar, avatars' first frames (handoff metrics), a room that vanished, and
presence reconciled after a gap."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_machine import (
    AVATAR_IDENTITY,
    NO_AVATAR,
    SESSION_ID,
    T0,
    T1,
    at,
    identity,
    machine,
    make_spec,
    settle,
    with_started_avatar,
)
from workflows.machine import (
    AvatarFirstFrame,
    AvatarFrozen,
    AvatarSilent,
    CancelKeepAlive,
    CancelMonitor,
    CreateAvatarSession,
    CreateRoom,
    DeleteRoom,
    EndRequested,
    MonitorStopped,
    ParticipantJoined,
    ParticipantLeft,
    PresenceObserved,
    QualityChanged,
    RoomCreated,
    RoomLost,
    RoomPhase,
    SessionMachine,
    StartMonitor,
    StopAvatarSession,
    TimerFired,
    TrackPublished,
    TrackUnpublished,
)
from workflows.models import ConnectionLevel, EndReason, QualityPolicy, SessionKind, SessionSpec, SessionStatus


def monitored(spec: SessionSpec | None = None, *, avatar_media: bool = True) -> SessionMachine:
    """A machine with the monitor on, its room live (the monitor started), nobody in yet. `avatar_media`: the
    monitor also watches the avatar's audio and reports first frames (sessions started after that patch)."""
    m = SessionMachine(spec or make_spec(), started_at=T0)
    m.enable_monitor()
    if avatar_media:
        m.enable_avatar_media_watch()
    m.begin()
    commands = m.handle(RoomCreated(), T0)
    [start] = [c for c in commands if isinstance(c, StartMonitor)]
    assert start.request.room == "session-abc-123" and start.request.workflow_id == "session-abc-123"
    assert start.request.avatar_identity_prefix == f"avatar-{SESSION_ID}-"
    return m


def test_the_monitor_starts_with_the_room_once_and_only_when_enabled():
    plain = machine()
    assert not any(isinstance(c, StartMonitor) for c in plain.handle(RoomCreated(), T0))
    m = monitored()
    assert m.state().monitored
    assert not any(isinstance(c, StartMonitor) for c in m.handle(ParticipantJoined("alice"), T1))


def test_the_end_cancels_the_monitor_before_the_room_is_deleted_and_waits_for_it():
    m = monitored(NO_AVATAR)
    m.handle(ParticipantJoined("alice"), T1)
    commands = m.handle(EndRequested("done"), at(2))
    assert commands.index(CancelMonitor()) < next(i for i, c in enumerate(commands) if isinstance(c, DeleteRoom))
    settle(m, commands, at(2))
    assert m.released and not m.finished  # the monitor has not acknowledged yet
    m.handle(MonitorStopped(), at(2))
    assert m.finished


def test_monitor_and_webhook_joins_are_one_event_whichever_comes_first():
    m = monitored(NO_AVATAR)
    m.handle(ParticipantJoined("alice", "mon-1", sid="PA_1", at=at(1)), at(1))
    before = m.state()
    m.handle(ParticipantJoined("alice", "EV_1", sid="PA_1", at=at(1)), at(1.01))  # the webhook, later
    m.handle(ParticipantJoined("alice", "mon-1", sid="PA_1", at=at(1)), at(1.02))  # the monitor, retried
    assert m.state() == before and m.people.joined == ["alice"]


def test_a_late_join_after_the_leave_changes_nothing():
    m = monitored(NO_AVATAR)
    m.handle(ParticipantJoined("alice", "mon-j", sid="PA_1", at=at(1)), at(1))
    m.handle(ParticipantLeft("alice", "mon-l", sid="PA_1", at=at(2)), at(2))
    m.handle(ParticipantJoined("alice", "EV_j", sid="PA_1", at=at(1)), at(2.5))  # webhook retried late
    assert "alice" not in m.people.present and "alice" in m.people.reconnect_by


def test_an_old_connection_leaving_after_a_new_one_joined_is_not_a_leave():
    m = monitored(NO_AVATAR)
    m.handle(ParticipantJoined("alice", "j1", sid="PA_1", at=at(1)), at(1))
    m.handle(ParticipantJoined("alice", "j2", sid="PA_2", at=at(2)), at(2))
    m.handle(ParticipantLeft("alice", "l1", sid="PA_1", at=at(2.1)), at(2.1))
    assert "alice" in m.people.present and m.status is SessionStatus.LIVE


def test_tracks_follow_publish_and_unpublish_and_are_forgotten_when_they_leave():
    m = monitored(NO_AVATAR)
    m.handle(ParticipantJoined("alice"), T1)
    m.handle(TrackPublished("alice", "TR_a", "audio", "p1"), T1)
    m.handle(TrackPublished("alice", "TR_v", "video", "p2"), T1)
    m.handle(TrackPublished("mallory", "TR_x", "video", "p3"), T1)  # not one of ours
    assert m.state().tracks == {"alice": ["audio", "video"]}
    m.handle(TrackUnpublished("alice", "TR_v", "u1"), T1)
    assert m.state().tracks == {"alice": ["audio"]}
    m.handle(ParticipantLeft("alice"), at(2))
    assert m.state().tracks == {}


def test_sustained_poor_quality_degrades_naming_who_and_why_and_recovery_clears_it():
    m = monitored(NO_AVATAR)
    m.handle(ParticipantJoined("alice"), T1)
    m.handle(QualityChanged("alice", ConnectionLevel.POOR, "rtt 400 ms", "q1"), at(2))
    state = m.state()
    assert state.status is SessionStatus.DEGRADED
    [why] = state.degraded
    assert (why.identity, why.quality, why.since, why.detail) == ("alice", ConnectionLevel.POOR, at(2), "rtt 400 ms")
    m.handle(QualityChanged("alice", ConnectionLevel.GOOD, None, "q2"), at(3))
    assert m.state().status is SessionStatus.LIVE and m.state().degraded == []
    assert "alice's connection recovered (good)" in m.recoveries


def test_the_quality_policy_is_per_kind_and_configurable():
    coaching = make_spec(avatar=None).model_copy(update={"kind": SessionKind.COACHING})
    m = monitored(coaching)
    m.handle(ParticipantJoined("alice"), T1)
    m.handle(QualityChanged("alice", ConnectionLevel.POOR, None, "q1"), at(2))
    assert m.state().status is SessionStatus.LIVE  # coaching only minds a lost connection
    m.handle(QualityChanged("alice", ConnectionLevel.LOST, None, "q2"), at(3))
    assert m.state().status is SessionStatus.DEGRADED
    strict = make_spec(avatar=None).model_copy(update={"quality": QualityPolicy(degrade_on=[ConnectionLevel.GOOD])})
    s = monitored(strict)
    s.handle(ParticipantJoined("alice"), T1)
    s.handle(QualityChanged("alice", ConnectionLevel.GOOD, None, "q1"), at(2))
    assert s.status is SessionStatus.DEGRADED
    start = next(c for c in monitored(coaching).handle(EndRequested("x"), T1) if isinstance(c, CancelMonitor))
    assert start == CancelMonitor()


def test_quality_of_someone_not_present_or_not_on_the_roster_changes_nothing():
    m = monitored(NO_AVATAR)
    m.handle(ParticipantJoined("alice"), T1)
    m.handle(QualityChanged("bob", ConnectionLevel.LOST, None, "q1"), at(2))
    m.handle(QualityChanged("monitor-x", ConnectionLevel.LOST, None, "q2"), at(2))
    assert m.status is SessionStatus.LIVE and m.state().degraded == []


def test_a_frozen_avatar_is_replaced_by_the_usual_recovery():
    m = monitored()
    m.handle(ParticipantJoined("alice"), T1)
    with_started_avatar(m)
    commands = m.handle(AvatarFrozen(AVATAR_IDENTITY, "no frame for 6 s", "f1"), at(2))
    assert CancelKeepAlive("av-1") in commands and StopAvatarSession("av-1") in commands
    assert m.status is SessionStatus.DEGRADED and "froze" in (m.avatar.problem or "")
    assert m.avatar.retry_at is not None  # replaced after the backoff, as any lost avatar
    assert m.handle(AvatarFrozen(identity(7), "stale", "f2"), at(2)) == []  # not the serving avatar


def test_the_monitor_watches_the_avatars_audio_and_first_frames_only_in_sessions_that_enabled_it():
    def start_request(avatar_media: bool, spec: SessionSpec | None = None) -> StartMonitor:
        m = SessionMachine(spec or make_spec(), started_at=T0)
        m.enable_monitor()
        if avatar_media:
            m.enable_avatar_media_watch()
        m.begin()
        [start] = [c for c in m.handle(RoomCreated(), T0) if isinstance(c, StartMonitor)]
        return start

    old = start_request(False).request
    assert old.avatar_silent_after_s is None and not old.avatar_first_frame  # as sessions before the patch asked
    new = start_request(True).request
    assert new.avatar_silent_after_s == 8.0 and new.avatar_first_frame  # the default policy
    quick = make_spec().model_copy(update={"quality": QualityPolicy(avatar_silent_after=timedelta(seconds=3))})
    assert start_request(True, quick).request.avatar_silent_after_s == 3.0


def test_a_silent_avatar_is_replaced_by_the_usual_recovery():
    m = monitored()
    m.handle(ParticipantJoined("alice"), T1)
    with_started_avatar(m)
    commands = m.handle(AvatarSilent(AVATAR_IDENTITY, "its audio track carried no packets for 8 s", "s1"), at(2))
    assert CancelKeepAlive("av-1") in commands and StopAvatarSession("av-1") in commands
    assert m.status is SessionStatus.DEGRADED and "went silent" in (m.avatar.problem or "")
    assert m.avatars["av-1"].stop_reason == "lost: the avatar went silent: its audio track carried no packets for 8 s"
    assert m.avatar.retry_at is not None  # replaced after the backoff, as any lost avatar
    assert m.handle(AvatarSilent(AVATAR_IDENTITY, "again", "s1"), at(2)) == []  # a duplicate
    assert m.handle(AvatarSilent(identity(7), "stale", "s2"), at(2)) == []  # not the serving avatar
    replacement = m.handle(TimerFired(), m.avatar.retry_at)
    assert any(isinstance(c, CreateAvatarSession) for c in replacement)
    assert "avatar replacement 1 after: the avatar went silent" in m.recoveries[-1]


def test_silence_of_an_outgoing_avatar_or_while_ending_changes_nothing():
    m = monitored()
    m.handle(ParticipantJoined("alice"), T1)
    with_started_avatar(m)
    m.handle(EndRequested("done"), at(2))
    assert m.handle(AvatarSilent(AVATAR_IDENTITY, "no audio", "s1"), at(2)) == []
    assert m.avatars["av-1"].stop_reason == "session ended: requested"


def test_first_frames_time_each_avatar_and_a_replacement_from_the_loss_to_its_first_frame():
    m = monitored()
    m.handle(ParticipantJoined("alice"), T1)  # the first avatar is asked for now
    with_started_avatar(m)
    m.handle(ParticipantJoined(AVATAR_IDENTITY), at(1) + timedelta(seconds=3))
    m.handle(AvatarFirstFrame(AVATAR_IDENTITY, at(1) + timedelta(seconds=4), "ff1"), at(1) + timedelta(seconds=5))
    m.handle(AvatarFirstFrame(AVATAR_IDENTITY, at(1) + timedelta(seconds=9), "ff1-again"), at(1.2))  # told twice
    assert m.state().handoff.avatar_first_frame_s == [4.0]  # the frame's time, not the signal's
    assert m.state().handoff.avatar_replacement_s == []
    m.handle(AvatarSilent(AVATAR_IDENTITY, "no audio track published for 8 s", "s1"), at(2))
    assert m.avatar.retry_at is not None
    m.handle(TimerFired(), m.avatar.retry_at)  # a replacement, asked for after the backoff
    asked = m.avatar.retry_at or at(2) + timedelta(seconds=2)
    with_started_avatar(m, "av-2", asked)
    m.handle(AvatarFirstFrame(identity(2), asked + timedelta(seconds=3), "ff2"), asked + timedelta(seconds=3))
    handoff = m.state().handoff
    assert handoff.avatar_first_frame_s == [4.0, 3.0]
    assert handoff.avatar_replacement_s == [5.0]  # silent at 2 min, backoff 2 s, first frame 3 s later
    assert m.recoveries[-1] == f"avatar replaced: {identity(2)}'s first frame 5.0 s after the loss"
    m.handle(EndRequested("done"), at(3))
    assert m.state().handoff.avatar_replacement_s == [5.0]


def test_a_frame_time_outside_what_the_session_knows_is_bounded_and_strangers_are_ignored():
    m = monitored()
    m.handle(ParticipantJoined("alice"), T1)
    with_started_avatar(m)
    m.handle(AvatarFirstFrame("avatar-someone-else-1", at(1.5), "x"), at(1.5))
    m.handle(AvatarFirstFrame(AVATAR_IDENTITY, at(9), "ff1"), at(1.5))  # a clock ahead of the server's: now
    assert m.state().handoff.avatar_first_frame_s == [30.0]
    m2 = monitored()
    m2.handle(ParticipantJoined("alice"), T1)
    m2.handle(AvatarFirstFrame(AVATAR_IDENTITY, at(0), "ff1"), at(1.5))  # a clock behind: not before asked for
    assert m2.state().handoff.avatar_first_frame_s == [0.0]


def test_a_rotation_is_not_a_replacement():
    m = monitored(make_spec(max_session_duration=timedelta(minutes=2)))
    m.handle(ParticipantJoined("alice"), T1)
    with_started_avatar(m)
    rotate_at = m.avatar.rotate_at
    assert rotate_at is not None
    m.handle(TimerFired(), rotate_at)
    with_started_avatar(m, "av-2", rotate_at)
    m.handle(AvatarFirstFrame(identity(2), rotate_at, "ff2"), rotate_at)
    assert m.state().handoff.avatar_first_frame_s == [0.0] and m.state().handoff.avatar_replacement_s == []


def test_a_room_loss_is_repaired_by_the_fresh_avatars_first_frame():
    m = monitored()
    m.handle(ParticipantJoined("alice"), T1)
    with_started_avatar(m)
    m.handle(RoomLost("gone", "l1"), at(2))
    commands = m.handle(RoomCreated(), at(2) + timedelta(seconds=1))
    assert any(isinstance(c, CreateAvatarSession) for c in commands)
    with_started_avatar(m, "av-2", at(2) + timedelta(seconds=2))
    m.handle(AvatarFirstFrame(identity(2), at(2) + timedelta(seconds=4), "ff2"), at(2) + timedelta(seconds=4))
    assert m.state().handoff.avatar_replacement_s == [4.0]


def test_a_lost_room_is_re_created_with_a_fresh_avatar_and_people_get_their_grace():
    m = monitored(make_spec(reconnect_grace=timedelta(seconds=30)))
    m.handle(ParticipantJoined("alice"), T1)
    m.handle(ParticipantJoined("bob"), T1)
    with_started_avatar(m)
    commands = m.handle(RoomLost("room missing after reconnect", "lost-1"), at(2))
    assert any(isinstance(c, CreateRoom) for c in commands) and StopAvatarSession("av-1") in commands
    assert m.room.phase is RoomPhase.CREATING and m.status is SessionStatus.DEGRADED
    assert m.state().reconnecting == ["alice", "bob"] and m.people.present == set()
    assert m.handle(RoomLost("again", "lost-1"), at(2)) == []  # a duplicate
    assert not m.join_decidable  # joins wait for the new room
    commands = m.handle(RoomCreated(), at(2.1))
    assert [c.request.identity for c in commands if isinstance(c, CreateAvatarSession)] == [identity(2)]
    assert any("re-created 6.0 s after it was lost" in r for r in m.recoveries)
    m.handle(ParticipantJoined("alice"), at(2.2))  # alice comes back with a fresh grant; bob left during the outage
    m.handle(TimerFired(), at(2.6))
    assert m.people.present == {"alice"} and "continued without bob" in m.recoveries


def test_room_lost_while_ending_or_before_the_room_exists_changes_nothing():
    m = monitored(NO_AVATAR)
    m.handle(EndRequested("done"), T1)
    assert m.handle(RoomLost("gone", "l1"), T1) == []
    fresh = machine()
    assert fresh.handle(RoomLost("gone", "l2"), T0) == []


def test_an_end_while_the_room_is_being_re_created_deletes_it_once_it_lands():
    m = monitored(NO_AVATAR)
    m.handle(ParticipantJoined("alice"), T1)
    m.handle(RoomLost("gone", "l1"), at(2))
    commands = m.handle(EndRequested("done"), at(2.1))
    assert not any(isinstance(c, DeleteRoom) for c in commands)
    assert m.handle(RoomCreated(), at(2.2)) == [DeleteRoom("session-abc-123")]


def test_presence_after_a_gap_drops_who_is_gone_and_adds_who_came():
    m = monitored(NO_AVATAR)
    m.handle(ParticipantJoined("alice", "j1", sid="PA_1", at=at(1)), at(1))
    m.handle(ParticipantJoined("bob", "j2", sid="PB_1", at=at(1)), at(1))
    m.handle(PresenceObserved(("bob", "carol", "monitor-x"), at(3), "p1"), at(3))
    assert m.people.present == {"bob", "carol"} and "alice" in m.people.reconnect_by
    # A presence older than what a webhook already said about carol leaving does not bring her back.
    m.handle(ParticipantLeft("carol", "l1", sid="PC_1", at=at(4)), at(4))
    m.handle(PresenceObserved(("bob", "carol"), at(3.5), "p2"), at(4.1))
    assert "carol" not in m.people.present


# ---- one stream, any order: the same happenings in any order with duplicates end in the same presence ------

HAPPENINGS = [
    ParticipantJoined("alice", "j-a1", sid="PA_1", at=at(1)),
    ParticipantJoined("bob", "j-b1", sid="PB_1", at=at(1.5)),
    ParticipantLeft("alice", "l-a1", sid="PA_1", at=at(2)),
    ParticipantJoined("alice", "j-a2", sid="PA_2", at=at(3)),
    ParticipantLeft("bob", "l-b1", sid="PB_1", at=at(4)),
]


@settings(max_examples=300, deadline=None)
@given(
    order=st.permutations(range(len(HAPPENINGS))),
    dupes=st.lists(st.integers(0, len(HAPPENINGS) - 1), max_size=6),
    rename=st.booleans(),
)
def test_any_order_with_duplicates_from_either_source_ends_in_the_same_presence(order, dupes, rename):
    m = monitored(NO_AVATAR)
    for i in [*order, *dupes]:
        event = HAPPENINGS[i]
        if rename and i in dupes:  # the same happening seen by the other source: another id
            event = type(event)(event.identity, f"other-{event.event_id}", event.sid, event.at)
        m.handle(event, at(5))
    assert m.people.present == {"alice"}
    assert set(m.people.reconnect_by) <= {"bob"}


def test_handoff_metrics_say_how_connections_went():
    m = monitored(make_spec(reconnect_grace=timedelta(minutes=5)))
    m.admit("alice", at(1))
    m.handle(ParticipantJoined("alice"), at(1) + timedelta(seconds=2))
    commands = m.handle(TimerFired(), at(1.1))  # nothing due: the avatar was asked for at the join
    assert commands == []
    m.handle(ParticipantJoined(AVATAR_IDENTITY), at(1) + timedelta(seconds=5))
    m.handle(QualityChanged("alice", ConnectionLevel.EXCELLENT, None, "q1"), at(2))
    m.handle(QualityChanged("alice", ConnectionLevel.POOR, None, "q2"), at(3))
    m.handle(ParticipantLeft("alice"), at(4))
    m.admit("alice", at(4.5))
    m.handle(ParticipantJoined("alice"), at(5))
    m.handle(RoomLost("gone", "l1"), at(6))
    m.handle(RoomCreated(), at(6.05))
    state = m.state().handoff
    alice = state.participants["alice"]
    assert alice.connect_s == 2.0 and alice.reconnects == 1
    assert alice.quality_s == {ConnectionLevel.EXCELLENT: 60.0, ConnectionLevel.POOR: 60.0}
    assert state.avatar_join_s == [3.0]  # asked for at alice's join (1 min + 2 s), in the room 3 s later
    assert state.room_recovery_s == [3.0]
    m.handle(EndRequested("done"), at(7))
    assert m.state().handoff.participants["alice"].quality_s[ConnectionLevel.POOR] == 60.0


def test_a_candidate_whose_connection_stays_lost_ends_the_session_when_the_policy_says_so():
    policy = QualityPolicy(end_when_candidate_lost_for=timedelta(seconds=30))
    m = monitored(make_spec(avatar=None).model_copy(update={"quality": policy}))
    m.handle(ParticipantJoined("alice"), T1)  # alice is the candidate
    m.handle(ParticipantJoined("bob"), T1)
    m.handle(QualityChanged("bob", ConnectionLevel.LOST, None, "q0"), at(2))  # an interviewer: degraded, no clock
    assert deadline_name(m) == "max duration"
    m.handle(QualityChanged("alice", ConnectionLevel.LOST, None, "q1"), at(2))
    deadline = m.next_deadline()
    assert deadline is not None and deadline.name == "connection lost: alice" and deadline.at == at(2.5)
    m.handle(QualityChanged("alice", ConnectionLevel.POOR, None, "q2"), at(2.2))  # better: the clock stops
    assert deadline_name(m) == "max duration"
    m.handle(QualityChanged("alice", ConnectionLevel.LOST, None, "q3"), at(3))
    commands = m.handle(TimerFired(), at(3.5))
    assert m.ending is not None and m.ending.reason is EndReason.PARTICIPANT_LOST
    assert "alice's connection stayed lost for 30 s" in (m.ending.detail or "")
    assert CancelMonitor() in commands


def test_without_the_policy_a_lost_connection_only_degrades():
    m = monitored(NO_AVATAR)
    m.handle(ParticipantJoined("alice"), T1)
    m.handle(QualityChanged("alice", ConnectionLevel.LOST, None, "q1"), at(2))
    assert deadline_name(m) == "max duration" and m.handle(TimerFired(), at(30)) == []
    assert m.ending is None and m.state().status is SessionStatus.DEGRADED


def deadline_name(m: SessionMachine) -> str:
    deadline = m.next_deadline()
    assert deadline is not None
    return deadline.name
