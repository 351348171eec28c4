"""The session's decisions, walked path by path, then checked by a simulated world on random paths.

The promise checked above all: every resource the session created (the room, each avatar session) is
released, exactly once, whatever happens, and the session only closes once that is confirmed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workflows.machine import (
    AvatarLost,
    AvatarRecorded,
    AvatarReleased,
    AvatarStarted,
    Command,
    CreateRoom,
    EndRequested,
    Event,
    ExtendBeyondCap,
    Extended,
    Held,
    JoinGranted,
    ParticipantJoined,
    ParticipantLeft,
    Refusal,
    ReleaseAvatar,
    ReleaseRoom,
    RoomClosed,
    RoomCreated,
    RoomCreateFailed,
    RoomFull,
    RoomReleased,
    SessionEnded,
    SessionMachine,
    StartAvatar,
    StopAvatarWork,
    TimerFired,
    UnknownParticipant,
)
from workflows.models import AvatarStart, EndReason, SessionSpec, SessionStatus, WhenLost, avatar_identity_for

T0 = datetime(2025, 1, 1, 9, 0, tzinfo=UTC)
SESSION_ID = "abc-123"
AVATAR_IDENTITY = avatar_identity_for(SESSION_ID, 1)  # the first avatar session's identity


def start_avatar(n: int) -> StartAvatar:
    """The command that starts the session's n-th avatar session (each has its own room identity)."""
    return StartAvatar(avatar_identity_for(SESSION_ID, n))
AVATAR_ID = "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a"
ROSTER = ("alice", "bob", "carol")


def make_spec(
    avatar: AvatarStart | None = AvatarStart.ON_FIRST_JOIN,
    participants: tuple[str, ...] = ROSTER,
    max_participants: int | None = None,
    max_duration: timedelta = timedelta(hours=1),
    max_duration_cap: timedelta = timedelta(hours=2),
    no_show_timeout: timedelta = timedelta(minutes=10),
    reconnect_grace: timedelta = timedelta(seconds=60),
    when_participant_lost: WhenLost = WhenLost.CONTINUE,
    **avatar_options: Any,
) -> SessionSpec:
    """A spec for these tests; `avatar_options` go into the AvatarSpec (max_replacements, when_lost, ...)."""
    return SessionSpec(
        session_id=SESSION_ID,
        kind="interview",
        participants=[{"identity": p, "role": "candidate" if i == 0 else "interviewer"} for i, p in enumerate(participants)],
        avatar=None if avatar is None else {"avatar_id": AVATAR_ID, "start": avatar, **avatar_options},
        max_participants=max_participants,
        max_duration=max_duration,
        max_duration_cap=max_duration_cap,
        no_show_timeout=no_show_timeout,
        reconnect_grace=reconnect_grace,
        when_participant_lost=when_participant_lost,
    )


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def machine(spec: SessionSpec | None = None) -> SessionMachine:
    """A machine that has begun (CreateRoom issued), as the workflow's first step leaves it."""
    m = SessionMachine(spec or make_spec(), started_at=T0)
    assert m.begin() == [CreateRoom()]
    return m


def waiting(spec: SessionSpec | None = None) -> SessionMachine:
    m = machine(spec)
    m.handle(RoomCreated(), T0)
    return m


def live(spec: SessionSpec | None = None, who: str = "alice", when: datetime = at(1)) -> SessionMachine:
    m = waiting(spec)
    m.handle(ParticipantJoined(who), when)
    return m


def with_started_avatar(m: SessionMachine, avatar_id: str = "av-1", when: datetime = at(1)) -> SessionMachine:
    m.handle(AvatarRecorded(avatar_id), when)
    m.handle(AvatarStarted(avatar_id), when)
    return m


def release_confirmations(commands: list[Command]) -> list[Event]:
    """What the shell reports back once each release command's activity has succeeded."""
    confirmations: list[Event] = []
    for c in commands:
        if isinstance(c, ReleaseRoom):
            confirmations.append(RoomReleased())
        elif isinstance(c, ReleaseAvatar):
            confirmations.append(AvatarReleased(c.avatar_session_id))
    return confirmations


# ---- starting: room, waiting, live -------------------------------------------------------------------------


def test_begin_asks_for_the_room_and_counts_it_as_possibly_existing():
    m = SessionMachine(make_spec(), started_at=T0)
    assert m.begin() == [CreateRoom()]
    assert m.status is SessionStatus.PROVISIONING
    # a CreateRoom may reach LiveKit even if its result never comes back: cleanup must cover it
    assert m.unreleased() == [ReleaseRoom()]
    assert not m.room_ready


def test_room_created_makes_the_session_wait_for_people():
    m = machine()
    assert m.handle(RoomCreated(), T0) == []
    assert m.status is SessionStatus.WAITING
    assert m.room_ready


def test_duplicate_room_created_is_ignored():
    m = waiting(make_spec(avatar=AvatarStart.IMMEDIATELY))
    assert m.handle(RoomCreated(), at(1)) == []
    assert m.status is SessionStatus.WAITING


def test_first_human_join_goes_live_and_starts_the_avatar_exactly_once():
    m = waiting()
    assert m.handle(ParticipantJoined("alice"), at(2)) == [start_avatar(1)]
    assert m.status is SessionStatus.LIVE
    assert m.live_since == at(2)
    assert m.present == {"alice"} and m.joined == ["alice"] and "alice" in m.admitted
    assert m.handle(ParticipantJoined("bob"), at(3)) == []
    assert m.handle(ParticipantLeft("alice"), at(4)) == []
    assert m.handle(ParticipantJoined("alice"), at(5)) == []
    assert m.present == {"alice", "bob"}
    assert m.joined == ["alice", "bob"]
    assert m.live_since == at(2)


def test_without_an_avatar_a_join_goes_live_and_starts_nothing():
    m = waiting(make_spec(avatar=None))
    assert m.handle(ParticipantJoined("alice"), at(1)) == []
    assert m.status is SessionStatus.LIVE


def test_immediately_policy_starts_the_avatar_when_the_room_exists_and_not_again_on_join():
    m = machine(make_spec(avatar=AvatarStart.IMMEDIATELY))
    assert m.handle(RoomCreated(), T0) == [start_avatar(1)]
    assert m.handle(ParticipantJoined("alice"), at(1)) == []
    assert m.status is SessionStatus.LIVE


@pytest.mark.parametrize("identity", ["mallory", "monitor-abc-123", AVATAR_IDENTITY])
def test_joins_outside_the_roster_do_not_count_as_presence(identity):
    m = waiting()
    assert m.handle(ParticipantJoined(identity), at(1)) == []
    assert m.status is SessionStatus.WAITING
    assert m.present == set() and m.joined == []
    # nobody real joined, so the no-show timeout still applies
    assert m.next_deadline() == m.no_show_deadline


def test_avatar_presence_is_tracked_apart_from_people():
    m = with_started_avatar(live())
    m.handle(ParticipantJoined(AVATAR_IDENTITY), at(2))
    assert m.avatar_present and AVATAR_IDENTITY not in m.present
    m.handle(ParticipantLeft(AVATAR_IDENTITY), at(3))
    assert not m.avatar_present


# ---- participants dropping and coming back ------------------------------------------------------------------


def test_participant_who_drops_gets_a_reconnect_grace_and_the_session_degrades_meanwhile():
    m = live(make_spec(avatar=None))
    m.handle(ParticipantJoined("bob"), at(1))
    assert m.handle(ParticipantLeft("alice"), at(5)) == []
    assert m.status is SessionStatus.DEGRADED and not m.ending
    assert m.reconnect_by == {"alice": at(6)}
    assert m.next_deadline() == at(6)


def test_reconnecting_within_the_grace_restores_live_and_is_recorded():
    m = live(make_spec(avatar=None))
    m.handle(ParticipantLeft("alice"), at(5))
    m.handle(ParticipantJoined("alice"), at(5.5))
    assert m.status is SessionStatus.LIVE
    assert m.reconnect_by == {}
    assert m.recoveries == ["alice reconnected"]
    assert m.handle(TimerFired(), at(6)) == [] and not m.ending


def test_missing_the_grace_with_others_present_continues_without_them():
    m = live(make_spec(avatar=None))
    m.handle(ParticipantJoined("bob"), at(1))
    m.handle(ParticipantLeft("alice"), at(5))
    assert m.handle(TimerFired(), at(5.9)) == []
    assert m.handle(TimerFired(), at(6)) == []
    assert not m.ending and m.status is SessionStatus.LIVE
    assert m.recoveries == ["continued without alice"]


def test_missing_the_grace_with_nobody_left_ends_the_session():
    m = live(make_spec(avatar=None))
    m.handle(ParticipantLeft("alice"), at(5))
    assert m.handle(TimerFired(), at(6)) == [ReleaseRoom()]
    assert m.end_reason is EndReason.PARTICIPANT_LOST
    assert m.end_detail and "alice" in m.end_detail and "nobody is left" in m.end_detail


def test_policy_end_ends_the_session_when_anyone_misses_the_grace():
    m = live(make_spec(avatar=None, when_participant_lost=WhenLost.END))
    m.handle(ParticipantJoined("bob"), at(1))
    m.handle(ParticipantLeft("bob"), at(5))
    assert m.handle(TimerFired(), at(6)) == [ReleaseRoom()]
    assert m.end_reason is EndReason.PARTICIPANT_LOST
    assert m.end_detail == "bob did not return within the reconnect grace"


def test_leaving_after_the_end_starts_no_grace():
    m = live(make_spec(avatar=None))
    m.handle(EndRequested(EndReason.REQUESTED), at(5))
    m.handle(ParticipantLeft("alice"), at(6))
    assert m.reconnect_by == {} and m.present == set()


def test_leave_of_someone_never_present_is_ignored():
    m = live(make_spec(avatar=None))
    assert m.handle(ParticipantLeft("bob"), at(2)) == []
    assert m.reconnect_by == {} and m.status is SessionStatus.LIVE


# ---- deadlines ---------------------------------------------------------------------------------------------


def test_next_deadline_is_the_no_show_deadline_until_someone_joins_then_the_max_duration():
    m = waiting()
    assert m.next_deadline() == T0 + timedelta(minutes=10)
    m.handle(ParticipantJoined("alice"), at(1))
    assert m.next_deadline() == T0 + timedelta(hours=1)


def test_next_deadline_before_anyone_joins_is_the_earlier_of_the_two():
    m = waiting(make_spec(max_duration=timedelta(minutes=5), no_show_timeout=timedelta(minutes=10)))
    assert m.next_deadline() == at(5)


def test_timer_before_the_no_show_deadline_does_nothing():
    m = waiting()
    assert m.handle(TimerFired(), at(9.99)) == []
    assert not m.ending


def test_nobody_joining_before_the_no_show_deadline_ends_the_session_and_releases_the_room():
    m = waiting()
    assert m.handle(TimerFired(), at(10)) == [ReleaseRoom()]
    assert m.end_reason is EndReason.NO_SHOW
    assert m.status is SessionStatus.ENDING
    assert m.end_detail and "no-show" in m.end_detail
    assert m.next_deadline() is None


def test_no_show_deadline_does_not_apply_once_someone_has_joined_even_if_they_left():
    m = live(make_spec(avatar=None))
    m.handle(ParticipantJoined("bob"), at(1))
    m.handle(ParticipantLeft("alice"), at(2))
    assert m.handle(TimerFired(), at(30)) == []
    assert not m.ending


def test_timer_before_max_duration_does_nothing_and_at_it_ends_the_session():
    m = with_started_avatar(live())
    assert m.handle(TimerFired(), at(59.9)) == []
    assert m.handle(TimerFired(), at(60)) == [StopAvatarWork(), ReleaseAvatar("av-1"), ReleaseRoom()]
    assert m.end_reason is EndReason.MAX_DURATION


def test_timer_after_the_end_does_nothing():
    m = live()
    m.handle(EndRequested(EndReason.REQUESTED), at(5))
    assert m.handle(TimerFired(), at(600)) == []
    assert m.end_reason is EndReason.REQUESTED


# ---- extend ---------------------------------------------------------------------------------------------


def test_extend_moves_the_deadline_and_the_timer_follows():
    m = live()
    assert m.handle(Extended(timedelta(minutes=30)), at(10)) == []
    assert m.deadline == at(90) == m.next_deadline()
    assert m.handle(TimerFired(), at(60)) == []
    assert m.handle(TimerFired(), at(90)) != []
    assert m.end_reason is EndReason.MAX_DURATION


def test_extend_up_to_exactly_the_cap_is_allowed():
    m = live()
    m.check_extend(timedelta(hours=1))
    m.handle(Extended(timedelta(hours=1)), at(10))
    assert m.deadline == m.hard_deadline == T0 + timedelta(hours=2)


def test_extend_beyond_the_cap_is_refused_saying_how_much_is_left():
    m = live()
    m.handle(Extended(timedelta(minutes=45)), at(10))
    with pytest.raises(ExtendBeyondCap) as refused:
        m.check_extend(timedelta(minutes=20))
    assert refused.value.kind == "ExtendBeyondCap"
    assert "1200 s" in refused.value.message  # what was asked
    assert "7200 s" in refused.value.message  # the cap
    assert "at most 900 s more" in refused.value.message  # what is left


def test_refused_extend_leaves_the_deadline_alone():
    m = live()
    with pytest.raises(ExtendBeyondCap):
        m.handle(Extended(timedelta(hours=2)), at(10))
    assert m.deadline == T0 + timedelta(hours=1)


def test_extend_after_the_end_is_refused_as_ended():
    m = live()
    m.handle(EndRequested(EndReason.REQUESTED), at(5))
    with pytest.raises(SessionEnded) as refused:
        m.check_extend(timedelta(minutes=1))
    assert "cannot be extended" in refused.value.message and SESSION_ID in refused.value.message


# ---- join checks ------------------------------------------------------------------------------------------


def test_join_by_someone_off_the_roster_is_refused_naming_them_and_the_fix():
    m = waiting()
    with pytest.raises(UnknownParticipant) as refused:
        m.check_join("mallory")
    assert refused.value.kind == "UnknownParticipant"
    assert "'mallory'" in refused.value.message and SESSION_ID in refused.value.message
    assert "participants" in refused.value.message


def test_join_after_the_end_is_refused_telling_to_start_a_new_session():
    m = live()
    m.handle(EndRequested(EndReason.REQUESTED), at(5))
    with pytest.raises(SessionEnded) as refused:
        m.check_join("bob")
    assert refused.value.kind == "SessionEnded"
    assert "requested" in refused.value.message and "start a new session id" in refused.value.message


def test_join_past_capacity_is_refused_but_an_admitted_participant_may_come_back():
    m = waiting(make_spec(max_participants=2))
    for who in ("alice", "bob"):
        m.check_join(who)
        m.handle(JoinGranted(who), at(1))
    with pytest.raises(RoomFull) as refused:
        m.check_join("carol")
    assert refused.value.kind == "RoomFull"
    assert "2 of 2" in refused.value.message
    m.check_join("alice")  # reconnecting is not a new seat


def test_refusals_are_all_typed_refusals():
    for cls in (UnknownParticipant, SessionEnded, RoomFull, ExtendBeyondCap):
        assert issubclass(cls, Refusal) and cls.kind != Refusal.kind


# ---- ending and releasing -------------------------------------------------------------------------------


def test_end_releases_everything_held_once_and_closes_only_when_all_is_confirmed():
    m = with_started_avatar(live())
    cmds = m.handle(EndRequested(EndReason.REQUESTED, "done"), at(20))
    assert cmds == [StopAvatarWork(), ReleaseAvatar("av-1"), ReleaseRoom()]
    assert m.status is SessionStatus.ENDING and not m.closed
    assert m.unreleased() == []  # being released: nothing more to ask for
    assert m.handle(EndRequested(EndReason.CANCELLED), at(21)) == []
    assert m.end_reason is EndReason.REQUESTED and m.end_detail == "done"
    assert m.handle(RoomReleased(), at(22)) == []
    assert not m.closed and m.status is SessionStatus.ENDING
    assert m.handle(AvatarReleased("av-1"), at(23)) == []
    assert m.closed
    assert m.status is SessionStatus.ENDED
    assert m.ended_at == at(23)


def test_end_before_the_room_is_confirmed_still_releases_it():
    m = machine()
    assert m.handle(EndRequested(EndReason.CANCELLED), at(1)) == [ReleaseRoom()]
    assert not m.closed
    # the create's result arrives late: the release already asked for covers it
    assert m.handle(RoomCreated(), at(2)) == []
    m.handle(RoomReleased(), at(3))
    assert m.closed and m.status is SessionStatus.ENDED


def test_end_with_nothing_ever_created_closes_at_once():
    m = SessionMachine(make_spec(), started_at=T0)  # begin() never ran: no CreateRoom was issued
    assert m.handle(EndRequested(EndReason.CANCELLED), T0) == []
    assert m.closed


def test_avatar_recorded_after_the_end_is_released_once():
    m = live()  # StartAvatar issued, its create still in flight
    assert m.handle(EndRequested(EndReason.REQUESTED), at(5)) == [StopAvatarWork(), ReleaseRoom()]
    assert m.handle(AvatarRecorded("late"), at(6)) == [ReleaseAvatar("late")]
    assert m.unreleased() == []  # asked for already: not on the cleanup's to-do list again
    assert m.handle(AvatarLost("late", "stopped"), at(7)) == []
    m.handle(RoomReleased(), at(8))
    assert not m.closed
    m.handle(AvatarReleased("late"), at(9))
    assert m.closed


# ---- losing and replacing the avatar ----------------------------------------------------------------------


def test_losing_the_avatar_releases_it_degrades_and_schedules_a_replacement():
    m = with_started_avatar(live())
    cmds = m.handle(AvatarLost("av-1", "keep-alive: session ended"), at(5))
    assert cmds == [StopAvatarWork("av-1"), ReleaseAvatar("av-1")]
    assert m.status is SessionStatus.DEGRADED and not m.ending
    assert m.avatar_problem == "keep-alive: session ended"
    assert m.avatar_current is None and not m.avatar_present
    assert m.next_deadline() == at(5) + timedelta(seconds=2)


def test_replacement_starts_after_the_backoff_and_restores_live():
    m = with_started_avatar(live())
    m.handle(AvatarLost("av-1", "gone"), at(5))
    assert m.handle(TimerFired(), at(5) + timedelta(seconds=1)) == []
    assert m.handle(TimerFired(), at(5) + timedelta(seconds=2)) == [start_avatar(2)]
    assert m.recoveries == ["avatar replacement 1 after: gone"]
    with_started_avatar(m, "av-2", at(6))
    assert m.status is SessionStatus.LIVE
    assert m.avatar_current == "av-2" and m.avatar_problem is None


def test_replacement_backoff_doubles_after_each_loss():
    m = with_started_avatar(live(make_spec(max_replacements=3, replace_backoff=timedelta(seconds=10))))
    lost_at = at(5)
    for n, avatar_id in enumerate(["av-1", "av-2", "av-3"]):
        m.handle(AvatarLost(avatar_id, "gone"), lost_at)
        retry_at = lost_at + timedelta(seconds=10 * 2**n)
        assert m.next_deadline() == retry_at
        assert m.handle(TimerFired(), retry_at) == [start_avatar(n + 2)]
        with_started_avatar(m, f"av-{n + 2}", retry_at)
        lost_at = retry_at + timedelta(minutes=1)
    assert m.avatar_replacements == 3


def test_replacements_exhausted_with_policy_continue_falls_back_to_no_avatar():
    m = with_started_avatar(live(make_spec(max_replacements=0)))
    assert m.handle(AvatarLost("av-1", "gone"), at(5)) == [StopAvatarWork("av-1"), ReleaseAvatar("av-1")]
    assert m.avatar_fallback and m.avatar_retry_at is None
    assert m.status is SessionStatus.DEGRADED and not m.ending
    assert m.recoveries == ["continuing without the avatar: gone"]
    assert m.handle(TimerFired(), at(30)) == []  # no more starts
    assert m.next_deadline() == m.deadline


def test_replacements_exhausted_with_policy_end_ends_the_session():
    m = with_started_avatar(live(make_spec(max_replacements=0, when_lost=WhenLost.END)))
    cmds = m.handle(AvatarLost("av-1", "gone"), at(5))
    assert cmds == [StopAvatarWork("av-1"), ReleaseAvatar("av-1"), StopAvatarWork(), ReleaseRoom()]
    assert m.end_reason is EndReason.AVATAR_LOST
    assert m.end_detail == "the avatar could not be kept: gone"


def test_avatar_that_never_got_an_id_is_retried_without_a_release():
    m = live()
    assert m.handle(AvatarLost(None, "could not create"), at(2)) == []
    assert m.status is SessionStatus.DEGRADED
    assert m.avatars == {} and m.avatar_retry_at is not None


def test_avatar_leaving_the_room_counts_as_losing_it():
    m = with_started_avatar(live())
    m.handle(ParticipantJoined(AVATAR_IDENTITY), at(2))
    assert m.handle(ParticipantLeft(AVATAR_IDENTITY), at(3)) == [StopAvatarWork("av-1"), ReleaseAvatar("av-1")]
    assert m.avatar_problem == "the avatar left the room"


def test_lost_avatar_is_not_released_again_at_the_end():
    m = with_started_avatar(live())
    m.handle(AvatarLost("av-1", "gone"), at(5))
    assert m.handle(EndRequested(EndReason.REQUESTED), at(6)) == [StopAvatarWork(), ReleaseRoom()]
    m.handle(RoomReleased(), at(8))
    assert not m.closed  # the lost avatar's release is still in flight
    m.handle(AvatarReleased("av-1"), at(9))
    assert m.closed


def test_avatar_lost_after_the_end_is_not_a_problem_to_report():
    m = with_started_avatar(live())
    m.handle(EndRequested(EndReason.REQUESTED), at(5))
    assert m.handle(AvatarLost("av-1", "stopped by us"), at(6)) == []
    assert m.status is SessionStatus.ENDING and m.avatar_problem is None


# ---- rotating the avatar before its plan's duration cap --------------------------------------------------


def rotating() -> SessionMachine:
    """A live session whose avatar (av-1, started at 1 min) may last 10 min; the rotation timer just fired."""
    m = with_started_avatar(live(make_spec(max_session_duration=timedelta(minutes=10))), "av-1", at(1))
    assert m.next_deadline() == at(10)  # 1 min + 10 min - the 60 s margin
    assert m.handle(TimerFired(), at(10)) == [start_avatar(2)]
    return m


def test_rotation_hands_over_to_a_fresh_avatar_then_releases_the_old_one():
    m = rotating()
    assert m.avatar_current == "av-1" and m.status is SessionStatus.LIVE
    m.handle(AvatarRecorded("av-2"), at(10))
    assert m.handle(AvatarStarted("av-2"), at(10.5)) == [StopAvatarWork("av-1"), ReleaseAvatar("av-1")]
    assert m.avatar_current == "av-2"
    assert m.avatar_replacements == 0  # rotations are not losses
    assert m.recoveries == ["avatar rotated from av-1 to av-2 before its duration cap"]


def test_failed_rotation_keeps_the_current_avatar_serving():
    m = rotating()
    m.handle(AvatarRecorded("av-2"), at(10))
    assert m.handle(AvatarLost("av-2", "did not start"), at(10.5)) == [StopAvatarWork("av-2"), ReleaseAvatar("av-2")]
    assert m.avatar_current == "av-1" and m.status is SessionStatus.LIVE


def test_no_rotation_when_the_session_ends_before_the_avatar_would():
    m = with_started_avatar(live(make_spec(max_duration=timedelta(minutes=10), max_session_duration=timedelta(minutes=10))))
    # the rotation time (10 min) is the session's own end: it ends instead
    assert not any(isinstance(c, StartAvatar) for c in m.handle(TimerFired(), at(10)))
    assert m.end_reason is EndReason.MAX_DURATION


def test_avatar_session_length_is_bounded_by_the_plan_and_the_session_cap():
    m = live(make_spec(max_session_duration=timedelta(minutes=30)))
    assert m.avatar_session_length(at(1)) == timedelta(minutes=30)
    assert m.avatar_session_length(T0 + timedelta(hours=1, minutes=50)) == timedelta(minutes=11)


def test_room_closed_by_livekit_while_live_ends_the_session():
    m = live(make_spec(avatar=None))
    assert m.handle(RoomClosed(), at(5)) == [ReleaseRoom()]
    assert m.end_reason is EndReason.ROOM_CLOSED
    assert m.end_detail == "LiveKit closed the room"


def test_room_closed_echo_of_our_own_delete_is_ignored():
    m = live()
    m.handle(EndRequested(EndReason.MAX_DURATION), at(5))
    assert m.handle(RoomClosed(), at(6)) == []
    assert m.end_reason is EndReason.MAX_DURATION


@pytest.mark.parametrize("reason", list(EndReason), ids=str)
def test_final_status_is_failed_only_for_a_failure(reason):
    m = live(make_spec(avatar=None))
    for event in release_confirmations(m.handle(EndRequested(reason), at(5))):
        m.handle(event, at(6))
    assert m.closed
    assert m.status is (SessionStatus.FAILED if reason is EndReason.FAILED else SessionStatus.ENDED)
    assert m.end_reason is reason


def test_joins_after_the_end_are_recorded_but_change_nothing():
    m = live(make_spec(avatar=None))
    m.handle(EndRequested(EndReason.REQUESTED), at(5))
    assert m.handle(ParticipantJoined("bob"), at(6)) == []
    assert m.status is SessionStatus.ENDING
    assert m.joined == ["alice", "bob"]


# ---- accounting ---------------------------------------------------------------------------------------------


def close(m: SessionMachine, reason: EndReason, when: datetime) -> None:
    """End the session and confirm every release at the same instant."""
    for event in release_confirmations(m.handle(EndRequested(reason), when)):
        m.handle(event, when)
    assert m.closed


def test_live_seconds_run_from_the_first_join_to_the_end():
    m = live(make_spec(avatar=None), when=at(2))
    m.handle(ParticipantJoined("bob"), at(4))
    assert m.live_seconds == 0.0  # not over yet
    close(m, EndReason.REQUESTED, at(12))
    assert m.live_seconds == 600.0


def test_live_seconds_are_zero_when_nobody_came():
    m = waiting()
    m.handle(TimerFired(), at(10))
    for event in release_confirmations([ReleaseRoom()]):
        m.handle(event, at(10))
    assert m.closed and m.live_seconds == 0.0 and m.joined == []


def test_going_live_is_recorded_even_if_the_avatar_was_lost_before_anyone_joined():
    # `immediately`: the avatar fails while the room is still empty, then people join and talk
    m = machine(make_spec(avatar=AvatarStart.IMMEDIATELY))
    m.handle(RoomCreated(), T0)
    m.handle(AvatarLost(None, "could not create"), at(1))
    m.handle(ParticipantJoined("alice"), at(2))
    assert m.status is SessionStatus.DEGRADED  # still without its avatar
    close(m, EndReason.REQUESTED, at(12))
    assert m.live_seconds == 600.0


def test_avatar_seconds_run_from_start_to_release():
    m = live(when=at(1))
    m.handle(AvatarRecorded("av-1"), at(1))
    m.handle(AvatarStarted("av-1"), at(2))
    cmds = m.handle(EndRequested(EndReason.REQUESTED), at(10))
    m.handle(RoomReleased(), at(10))
    assert ReleaseAvatar("av-1") in cmds
    m.handle(AvatarReleased("av-1"), at(11))
    assert m.avatar_seconds == 9 * 60
    assert m.avatar_session_id == "av-1"


def test_avatar_that_never_started_bills_nothing():
    m = live()
    m.handle(AvatarRecorded("av-1"), at(1))
    releases = m.handle(EndRequested(EndReason.REQUESTED), at(10))
    m.handle(AvatarLost("av-1", "not started: the session is ending"), at(10))
    for event in release_confirmations(releases):
        m.handle(event, at(10))
    assert m.closed
    assert m.avatar_seconds == 0.0


# ---- the simulated world: property tests ----------------------------------------------------------------------

CREATE_ROOM, DELETE_ROOM, CREATE_AVATAR, START_AVATAR, STOP_AVATAR = (
    "create_room",
    "delete_room",
    "create_avatar",
    "start_avatar",
    "stop_avatar",
)


@dataclass
class World:
    """LiveKit and LiveAvatar as far as the session can tell, plus a shell that runs the machine's commands.

    It mirrors `SessionWorkflow`: CreateRoom -> create_room -> RoomCreated (failing for good ends the session as
    FAILED); StartAvatar -> create (AvatarRecorded) -> start (AvatarStarted) -> keep-alive, a failure at any
    step -> AvatarLost; StopAvatarWork(None) stops all avatar work, StopAvatarWork(id) one keep-alive;
    ReleaseAvatar -> stop, once that avatar's start has settled -> AvatarReleased; ReleaseRoom -> delete_room
    -> RoomReleased. Every operation sits in `pending` until the test decides to run it, in any order.
    """

    machine: SessionMachine
    now: datetime = T0
    room_exists: bool = False
    room_came_to_exist: bool = False
    create_room_issued: bool = False
    avatars: dict[str, str] = field(default_factory=dict)  # id -> created | started | stopped, at LiveAvatar
    pending: list[tuple[str, str | None]] = field(default_factory=list)
    starting: set[str] = field(default_factory=set)  # recorded, start step not settled (the shell's `_starting`)
    keepalives: set[str] = field(default_factory=set)
    stop_avatar_work: bool = False
    room_releases: int = 0
    avatar_releases: Counter[str] = field(default_factory=Counter)
    unconfirmed: set[Command] = field(default_factory=set)
    someone_joined: bool = False
    recorded_after_close: set[str] = field(default_factory=set)  # the known gap below

    # -- the shell ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.execute(self.machine.begin())

    def apply(self, event: Event) -> None:
        was_starting, was_ending = self.machine.avatar_starting, self.machine.ending
        commands = self.machine.handle(event, self.now)
        if any(isinstance(c, StartAvatar) for c in commands):
            assert not was_ending, "an avatar was started after the end"
            assert not was_starting, "a second avatar start while one was in flight"
            assert sum(isinstance(c, StartAvatar) for c in commands) == 1
        self.execute(commands)
        self.check_invariants()

    def execute(self, commands: list[Command]) -> None:
        for c in commands:
            match c:
                case CreateRoom():
                    self.create_room_issued = True
                    self.pending.append((CREATE_ROOM, None))
                case StartAvatar(_):
                    self.pending.append((CREATE_AVATAR, None))
                case StopAvatarWork(None):
                    self.stop_avatar_work = True
                    self.keepalives.clear()
                case StopAvatarWork(avatar_id):
                    self.keepalives.discard(avatar_id)
                case ReleaseAvatar(avatar_id):
                    assert avatar_id in self.avatars, f"release of avatar {avatar_id} that LiveAvatar never created"
                    self.avatar_releases[avatar_id] += 1
                    assert self.avatar_releases[avatar_id] == 1, f"avatar {avatar_id} released twice"
                    self.unconfirmed.add(c)
                    self.pending.append((STOP_AVATAR, avatar_id))
                case ReleaseRoom():
                    assert self.create_room_issued, "release of a room that was never asked for"
                    self.room_releases += 1
                    assert self.room_releases == 1, "room released twice"
                    self.unconfirmed.add(c)
                    self.pending.append((DELETE_ROOM, None))

    def runnable(self) -> list[int]:
        in_flight = {kind for kind, _ in self.pending}
        ready = []
        for i, (kind, avatar_id) in enumerate(self.pending):
            if kind == STOP_AVATAR and avatar_id in self.starting:
                continue  # the shell stops an avatar only once its start has settled
            if kind == DELETE_ROOM and CREATE_ROOM in in_flight:
                continue  # the shell deletes only after the create has landed (`_release_room`)
            ready.append(i)
        return ready

    def run(self, index: int, succeeds: bool, reached_server: bool) -> None:
        """Run one pending operation against the services and report its result to the machine.

        `reached_server`: for a failure, whether the service acted before the answer was lost; for an avatar
        create after the stop, whether the create was already under way when the stop came.
        """
        kind, avatar_id = self.pending.pop(index)
        match kind:
            case "create_room":
                if succeeds or reached_server:
                    self.room_exists = self.room_came_to_exist = True
                if succeeds:
                    self.apply(RoomCreated())
                else:
                    self.apply(RoomCreateFailed())
                    self.apply(EndRequested(EndReason.FAILED, "create_room failed"))
            case "delete_room":
                self.room_exists = False  # idempotent: a missing room counts as deleted
                self.confirm(ReleaseRoom(), RoomReleased())
            case "create_avatar":
                if self.stop_avatar_work and not reached_server:
                    # the avatar task saw the stop before creating anything, and says so
                    self.apply(AvatarLost(None, "not started: the session is ending"))
                    return
                if not succeeds:
                    self.apply(AvatarLost(None, "could not create the avatar session"))
                    return
                new_id = f"av-{len(self.avatars) + 1}"
                self.avatars[new_id] = "created"
                self.starting.add(new_id)
                if self.machine.closed:
                    self.recorded_after_close.add(new_id)
                self.apply(AvatarRecorded(new_id))
                if self.stop_avatar_work:
                    self.starting.discard(new_id)
                    self.apply(AvatarLost(new_id, "not started: the session is ending"))
                else:
                    self.pending.append((START_AVATAR, new_id))
            case "start_avatar":
                assert avatar_id is not None
                self.starting.discard(avatar_id)
                if succeeds or reached_server:
                    self.avatars[avatar_id] = "started"
                if not succeeds:
                    self.apply(AvatarLost(avatar_id, "the avatar did not start"))
                    return
                self.apply(AvatarStarted(avatar_id))
                if not self.stop_avatar_work and self.machine.avatars.get(avatar_id) is Held.HELD:
                    self.keepalives.add(avatar_id)
            case "stop_avatar":
                assert avatar_id is not None
                self.avatars[avatar_id] = "stopped"
                self.keepalives.discard(avatar_id)
                self.confirm(ReleaseAvatar(avatar_id), AvatarReleased(avatar_id))

    def confirm(self, command: Command, event: Event) -> None:
        self.unconfirmed.discard(command)
        self.apply(event)

    def keepalive_fails(self, pick: int) -> None:
        if self.keepalives:
            avatar_id = sorted(self.keepalives)[pick % len(self.keepalives)]
            self.keepalives.discard(avatar_id)
            self.apply(AvatarLost(avatar_id, "the avatar session ended"))

    def join(self, identity: str) -> None:
        # people only get a token once the room is ready; late webhooks may still arrive after the end
        if self.machine.room_ready or self.machine.ending:
            if self.machine.room_ready and self.machine.spec.participant(identity) is not None:
                self.someone_joined = True
            self.apply(ParticipantJoined(identity))

    def room_closed(self) -> None:
        if self.room_exists:
            self.room_exists = False
            self.apply(RoomClosed())

    # -- what must hold -----------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        m = self.machine
        assert not (set(m.unreleased()) & self.unconfirmed), "a release in flight was listed as still to do"
        assert m.live_seconds >= 0 and m.avatar_seconds >= 0
        assert m.deadline <= m.hard_deadline, "extended past the cap"
        # an avatar session nobody uses any more is released at once, not at the end (it bills meanwhile)
        held = {a for a, h in m.avatars.items() if h is Held.HELD}
        assert held <= {m.avatar_current, m.avatar_incoming, m.avatar_rotating_from}, f"idle avatars held: {held}"
        alive = [a for a, state in self.avatars.items() if state != "stopped" and not self.avatar_releases[a]]
        assert len(alive) <= 2, f"more than a rotation's two avatar sessions at once: {alive}"
        if m.closed:
            late = {ReleaseAvatar(a) for a in self.recorded_after_close}
            assert self.unconfirmed <= late, f"closed with releases unconfirmed: {self.unconfirmed - late}"
        if self.someone_joined:
            assert m.live_since is not None, "people joined but the session never went live"
        if m.ending:
            assert m.next_deadline() is None
        else:
            assert m.next_deadline() is not None

    def check_all_released(self) -> None:
        m = self.machine
        assert not self.pending
        assert m.closed
        assert m.status in (SessionStatus.ENDED, SessionStatus.FAILED)
        assert (m.status is SessionStatus.FAILED) == (m.end_reason is EndReason.FAILED)
        assert not self.room_exists, "the room outlived the session"
        assert [a for a, state in self.avatars.items() if state != "stopped"] == [], "an avatar outlived the session"
        assert self.room_releases == (1 if self.room_came_to_exist else self.room_releases)
        assert all(self.avatar_releases[a] == 1 for a in self.avatars), "an avatar was not released exactly once"
        assert not self.unconfirmed
        assert m.avatar_billed_since == {}, "an avatar's billed time was never accounted for"
        assert list(m.avatars) == list(self.avatars)


SPECS = [
    make_spec(avatar=None),
    make_spec(avatar=AvatarStart.ON_FIRST_JOIN),
    make_spec(avatar=AvatarStart.IMMEDIATELY, max_participants=1, no_show_timeout=timedelta(hours=1)),
    make_spec(
        avatar=AvatarStart.ON_FIRST_JOIN,
        participants=("alice",),
        max_replacements=0,
        when_lost=WhenLost.END,
        when_participant_lost=WhenLost.END,
    ),
    make_spec(
        avatar=AvatarStart.IMMEDIATELY,
        max_replacements=1,
        max_session_duration=timedelta(minutes=2),  # rotates often
        reconnect_grace=timedelta(0),
    ),
]
# How often each action comes up. Mostly work getting done and people coming and going; the session-ending
# events are rare, so that the longer stories (replacements, rotations, fallback, reconnects) are reached.
ACTION_WEIGHTS = {
    "run": 16,
    "join": 8,
    "timer": 5,
    "leave": 2,
    "grant": 2,
    "extend": 2,
    "keepalive_fails": 3,
    "end": 1,
    "room_closed": 1,
}
ACTIONS = [action for action, weight in ACTION_WEIGHTS.items() for _ in range(weight)]
# Most operations succeed; a quarter fail, which is plenty to reach every failure path.
SUCCEEDS = st.sampled_from([True, True, True, False])
IDENTITIES = st.sampled_from([*ROSTER, *ROSTER, "mallory", AVATAR_IDENTITY])


def run_one(world: World, data: st.DataObject) -> None:
    ready = world.runnable()
    if ready:
        index = data.draw(st.sampled_from(ready), label="operation")
        world.run(index, data.draw(SUCCEEDS, label="succeeds"), data.draw(st.booleans(), label="reached_server"))


def external_step(world: World, data: st.DataObject) -> None:
    action = data.draw(st.sampled_from(ACTIONS), label="action")
    m = world.machine
    match action:
        case "run":
            run_one(world, data)
        case "join":
            world.join(data.draw(IDENTITIES, label="identity"))
        case "leave":
            world.apply(ParticipantLeft(data.draw(IDENTITIES, label="identity")))
        case "grant":
            identity = data.draw(IDENTITIES, label="identity")
            try:
                m.check_join(identity)
            except Refusal:
                return
            world.apply(JoinGranted(identity))
        case "timer":
            # mostly as the shell does (wake at the next deadline), sometimes early or very late
            due = m.next_deadline()
            wait = data.draw(st.sampled_from(["due", "due", "soon", "late"]), label="wake")
            if wait == "due" and due is not None:
                world.now = max(world.now, due)
            else:
                limit = 600 if wait == "soon" else 3 * 3600
                world.now += timedelta(seconds=data.draw(st.integers(0, limit), label="wait_s"))
            world.apply(TimerFired())
        case "extend":
            try:
                world.apply(Extended(timedelta(minutes=data.draw(st.integers(1, 240), label="extend_min"))))
            except Refusal:
                pass
        case "end":
            world.apply(EndRequested(data.draw(st.sampled_from(list(EndReason)), label="reason"), "test"))
        case "keepalive_fails":
            world.keepalive_fails(data.draw(st.integers(0, 3), label="which"))
        case "room_closed":
            world.room_closed()


def drain(world: World, data: st.DataObject) -> None:
    """End the session (if nothing else did) and let every operation in flight finish, in any order."""
    if not world.machine.ending:
        world.apply(EndRequested(EndReason.REQUESTED, "test over"))
    for _ in range(100):
        if not world.pending:
            return
        run_one(world, data)
    raise AssertionError(f"operations never settled: {world.pending}")


def simulate(spec: SessionSpec, data: st.DataObject, max_steps: int) -> World:
    world = World(SessionMachine(spec, started_at=T0))
    world.start()
    for _ in range(data.draw(st.integers(0, max_steps), label="steps")):
        external_step(world, data)
    drain(world, data)
    return world


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.sampled_from(SPECS), data=st.data())
def test_every_resource_that_came_to_exist_is_released_exactly_once(spec, data):
    simulate(spec, data, max_steps=60).check_all_released()


def live_world(spec: SessionSpec) -> World:
    """The common path done: room made, alice in, avatar (if any) started and kept alive."""
    world = World(SessionMachine(spec, started_at=T0))
    world.start()
    world.run(0, succeeds=True, reached_server=True)
    world.join("alice")
    while ready := world.runnable():
        world.run(ready[0], succeeds=True, reached_server=True)
    assert world.machine.status is SessionStatus.LIVE
    assert world.keepalives == (set() if spec.avatar is None else {"av-1"})
    return world


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.sampled_from(SPECS), data=st.data())
def test_a_live_session_with_a_working_avatar_releases_everything_too(spec, data):
    """Start from the common path, so that the avatar's longer stories (losses, replacements, rotations,
    fallback) are explored, then let anything happen."""
    world = live_world(spec)
    for _ in range(data.draw(st.integers(0, 60), label="steps")):
        external_step(world, data)
    drain(world, data)
    world.check_all_released()


# ---- races between a create in flight and the end (each once a known gap) -----------------------------------


def test_room_created_after_our_delete_ran_is_released_again():
    m = machine()
    assert m.handle(EndRequested(EndReason.CANCELLED), at(1)) == [ReleaseRoom()]
    m.handle(RoomReleased(), at(2))  # delete_room ran first: "no such room" counts as deleted
    assert m.handle(RoomCreated(), at(3)) == [ReleaseRoom()]


def test_session_does_not_close_while_an_avatar_start_is_in_flight():
    m = live()  # StartAvatar issued
    m.handle(EndRequested(EndReason.REQUESTED), at(5))
    m.handle(RoomReleased(), at(6))
    assert not m.closed


def test_old_avatar_leaving_after_a_rotation_is_not_taken_for_losing_the_new_one():
    m = rotating()
    m.handle(ParticipantJoined(AVATAR_IDENTITY), at(2))  # av-1 in the room
    m.handle(AvatarRecorded("av-2"), at(10))
    m.handle(AvatarStarted("av-2"), at(10.5))  # handover: av-1 is released
    m.handle(ParticipantJoined(avatar_identity_for(SESSION_ID, 2)), at(10.5))  # av-2 joins, as itself
    assert m.handle(ParticipantLeft(AVATAR_IDENTITY), at(10.6)) == []  # av-1's departure, reported late
    assert m.avatar_current == "av-2"
