"""What the machine publishes for support beside each status: `SessionDegraded` (ever degraded),
`SessionEndReason` and `AvatarBilledSeconds` (the `PublishStatus` snapshot; the shell upserts it as it is)."""

from __future__ import annotations

from datetime import timedelta

from tests.unit.test_machine import (
    AVATAR_IDENTITY,
    NO_AVATAR,
    at,
    close,
    creates,
    live,
    settle,
    with_started_avatar,
)
from workflows.machine import (
    CancelRequested,
    Command,
    Event,
    ParticipantJoined,
    ParticipantLeft,
    PublishStatus,
    SessionMachine,
    TimerFired,
)
from workflows.models import EndReason, SessionStatus


def recording(m: SessionMachine) -> list[PublishStatus]:
    """Every status upsert `m` issues from now on, in order."""
    published: list[PublishStatus] = []
    handle = m.handle

    def recorded(event: Event, now: object) -> list[Command]:
        commands = handle(event, now)  # type: ignore[arg-type]  # the machine's own signature, passed through
        published.extend(c for c in commands if isinstance(c, PublishStatus))
        return commands

    m.handle = recorded  # type: ignore[method-assign]  # spy on the machine's output, leaving it unchanged
    return published


def test_a_smooth_session_is_never_degraded_and_publishes_its_end_reason_and_billing_at_the_close():
    m = with_started_avatar(live(), "av-1", at(2))
    published = recording(m)
    close(m, at(12))
    ending, ended = published
    assert (ending.status, ending.end_reason, ending.ever_degraded) == (SessionStatus.ENDING, EndReason.REQUESTED, False)
    assert (ended.status, ended.end_reason, ended.ever_degraded) == (SessionStatus.ENDED, EndReason.REQUESTED, False)
    assert ended.avatar_billed_seconds == 600.0  # final: billing ended with the stop at 12 min


def test_degraded_stays_published_after_the_session_recovers():
    m = live(NO_AVATAR)
    m.handle(ParticipantJoined("bob"), at(1))
    published = recording(m)
    m.handle(ParticipantLeft("alice"), at(5))
    m.handle(ParticipantJoined("alice"), at(5.5))
    close(m, at(8))
    assert [(p.status, p.ever_degraded) for p in published] == [
        (SessionStatus.DEGRADED, True), (SessionStatus.LIVE, True), (SessionStatus.ENDING, True), (SessionStatus.ENDED, True),
    ]
    assert published[-1].end_reason is EndReason.REQUESTED


def test_a_lost_avatar_publishes_degraded_and_the_billing_of_both_avatar_sessions_at_the_close():
    m = with_started_avatar(live(), "av-1", at(2))
    m.handle(ParticipantJoined(AVATAR_IDENTITY), at(2))
    published = recording(m)
    settle(m, m.handle(ParticipantLeft(AVATAR_IDENTITY), at(5)), at(5.5))
    assert published[0].status is SessionStatus.DEGRADED and published[0].ever_degraded
    creates(m.handle(TimerFired(), at(5) + timedelta(seconds=2)))
    with_started_avatar(m, "av-2", at(6))
    close(m, at(10))
    assert published[-1].status is SessionStatus.ENDED and published[-1].ever_degraded
    assert published[-1].avatar_billed_seconds == 450.0  # 210 s of av-1, 240 s of av-2


def test_a_cancel_publishes_cancelled_as_the_end_reason():
    m = live(NO_AVATAR)
    published = recording(m)
    settle(m, m.handle(CancelRequested("operator"), at(3)), at(3))
    assert [(p.status, p.end_reason) for p in published] == [
        (SessionStatus.ENDING, EndReason.CANCELLED), (SessionStatus.ENDED, EndReason.CANCELLED),
    ]
    assert published[-1].avatar_billed_seconds == 0.0
