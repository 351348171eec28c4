"""The session's decisions as a pure state machine: state + event -> new state + commands.

No Temporal, no I/O, no clock: `now` comes in with every event. `SessionWorkflow` is the thin shell that turns
the commands into activities and feeds what happened back in as events. Keeping the decisions here lets the
unit and property tests walk every path and check the one promise that matters most: every resource the
session created (the room, each avatar session) is released, exactly once, whatever happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from workflows.models import (
    AvatarStart,
    EndReason,
    SessionSpec,
    SessionStatus,
    avatar_identity_for,
)

# ---- events: what happened ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoomCreated:
    pass


@dataclass(frozen=True)
class ParticipantJoined:
    identity: str


@dataclass(frozen=True)
class ParticipantLeft:
    identity: str


@dataclass(frozen=True)
class JoinGranted:
    identity: str


@dataclass(frozen=True)
class AvatarRecorded:
    """Step A done: LiveAvatar allocated a session id. Recorded before anything can bill."""

    avatar_session_id: str


@dataclass(frozen=True)
class AvatarStarted:
    avatar_session_id: str


@dataclass(frozen=True)
class AvatarLost:
    """The avatar could not start, or its keep-alive found the session ended."""

    avatar_session_id: str | None
    detail: str


@dataclass(frozen=True)
class EndRequested:
    reason: EndReason
    detail: str | None = None


@dataclass(frozen=True)
class Extended:
    by: timedelta


@dataclass(frozen=True)
class TimerFired:
    """The shell's wait for `next_deadline()` ran out."""


@dataclass(frozen=True)
class RoomClosed:
    """LiveKit reports the room finished while the session did not ask for it."""


@dataclass(frozen=True)
class RoomReleased:
    pass


@dataclass(frozen=True)
class AvatarReleased:
    avatar_session_id: str


Event = (
    RoomCreated
    | ParticipantJoined
    | ParticipantLeft
    | JoinGranted
    | AvatarRecorded
    | AvatarStarted
    | AvatarLost
    | EndRequested
    | Extended
    | TimerFired
    | RoomClosed
    | RoomReleased
    | AvatarReleased
)

# ---- commands: what the shell must do ----------------------------------------------------------------------


@dataclass(frozen=True)
class CreateRoom:
    pass


@dataclass(frozen=True)
class StartAvatar:
    pass


@dataclass(frozen=True)
class StopAvatarWork:
    """Stop the in-flight avatar work (start steps, keep-alive) before releasing."""


@dataclass(frozen=True)
class ReleaseAvatar:
    avatar_session_id: str


@dataclass(frozen=True)
class ReleaseRoom:
    pass


Command = CreateRoom | StartAvatar | StopAvatarWork | ReleaseAvatar | ReleaseRoom


class Held(StrEnum):
    """Where a resource stands. Release is asked once (RELEASING) and confirmed once (RELEASED)."""

    NONE = "none"
    HELD = "held"
    RELEASING = "releasing"
    RELEASED = "released"


# ---- typed refusals for `join` and `extend` -----------------------------------------------------------------


class Refusal(Exception):
    """A request the session refuses; `kind` becomes the ApplicationError type the caller sees."""

    kind = "Refused"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownParticipant(Refusal):
    kind = "UnknownParticipant"


class SessionEnded(Refusal):
    kind = "SessionEnded"


class RoomFull(Refusal):
    kind = "RoomFull"


class ExtendBeyondCap(Refusal):
    kind = "ExtendBeyondCap"


# ---- the machine -------------------------------------------------------------------------------------------


@dataclass
class SessionMachine:
    spec: SessionSpec
    started_at: datetime
    status: SessionStatus = SessionStatus.PROVISIONING
    room: Held = Held.NONE
    avatars: dict[str, Held] = field(default_factory=dict)
    avatar_requested: bool = False
    avatar_failed: bool = False
    avatar_present: bool = False
    avatar_problem: str | None = None
    present: set[str] = field(default_factory=set)
    admitted: set[str] = field(default_factory=set)
    joined: list[str] = field(default_factory=list)
    deadline: datetime = field(init=False)
    end_reason: EndReason | None = None
    end_detail: str | None = None
    ended_at: datetime | None = None
    live_since: datetime | None = None
    avatar_billed_since: dict[str, datetime] = field(default_factory=dict)
    avatar_seconds: float = 0.0
    _room_may_exist: bool = False

    def __post_init__(self) -> None:
        self.deadline = self.started_at + self.spec.max_duration

    # -- reading -------------------------------------------------------------------------------------------

    @property
    def hard_deadline(self) -> datetime:
        return self.started_at + self.spec.max_duration_cap

    @property
    def no_show_deadline(self) -> datetime:
        return self.started_at + self.spec.no_show_timeout

    @property
    def ending(self) -> bool:
        return self.end_reason is not None

    @property
    def closed(self) -> bool:
        """Ended and every resource released: the workflow may return."""
        return self.ending and self.unreleased() == [] and self.status in (SessionStatus.ENDED, SessionStatus.FAILED)

    @property
    def room_ready(self) -> bool:
        return self.room is Held.HELD and not self.ending

    @property
    def avatar_session_id(self) -> str | None:
        return next(reversed(self.avatars), None) if self.avatars else None

    def unreleased(self) -> list[Command]:
        """Release commands for everything held and not yet being released: the cleanup's to-do list."""
        todo: list[Command] = [ReleaseAvatar(a) for a, h in self.avatars.items() if h is Held.HELD]
        # A CreateRoom that was issued but never reported back (cancel, failure) may have created the room.
        if self.room is Held.HELD or (self.room is Held.NONE and self._room_may_exist):
            todo.append(ReleaseRoom())
        return todo

    def next_deadline(self) -> datetime | None:
        """When the shell should wake us with `TimerFired` if nothing else happens first."""
        if self.ending:
            return None
        if not self.joined:
            return min(self.deadline, self.no_show_deadline)
        return self.deadline

    def check_join(self, identity: str) -> None:
        """Raise a typed refusal if `identity` may not join now (the `join` update's validator)."""
        if self.ending:
            raise SessionEnded(
                f"session {self.spec.session_id!r} has ended ({self.end_reason}); start a new session id"
            )
        if self.spec.participant(identity) is None:
            raise UnknownParticipant(
                f"{identity!r} is not on the roster of session {self.spec.session_id!r}; "
                "add them to the session's participants when starting it"
            )
        if identity not in self.admitted and len(self.admitted) >= self.spec.room_capacity:
            raise RoomFull(
                f"session {self.spec.session_id!r} already admitted {len(self.admitted)} of "
                f"{self.spec.room_capacity} participants"
            )

    def check_extend(self, by: timedelta) -> None:
        if self.ending:
            raise SessionEnded(f"session {self.spec.session_id!r} has ended ({self.end_reason}); it cannot be extended")
        if self.deadline + by > self.hard_deadline:
            room_left = max(self.hard_deadline - self.deadline, timedelta(0))
            raise ExtendBeyondCap(
                f"extending by {int(by.total_seconds())} s would pass the session's cap of "
                f"{int(self.spec.max_duration_cap.total_seconds())} s; at most "
                f"{int(room_left.total_seconds())} s more can be added"
            )

    # -- deciding ------------------------------------------------------------------------------------------

    def begin(self) -> list[Command]:
        self._room_may_exist = True
        return [CreateRoom()]

    def handle(self, event: Event, now: datetime) -> list[Command]:
        match event:
            case RoomCreated():
                if self.room is not Held.NONE:
                    return []  # a duplicate or late report: the room is already held or being released
                self.room = Held.HELD
                if self.ending:
                    # Created after we decided to end (a late result): release it at once.
                    return self._release_all(now)
                self.status = SessionStatus.WAITING
                if self.spec.avatar and self.spec.avatar.start is AvatarStart.IMMEDIATELY:
                    return self._request_avatar()
                return []
            case JoinGranted(identity):
                self.admitted.add(identity)
                return []
            case ParticipantJoined(identity):
                return self._on_joined(identity, now)
            case ParticipantLeft(identity):
                if identity == avatar_identity_for(self.spec.session_id):
                    self.avatar_present = False
                self.present.discard(identity)
                return []
            case AvatarRecorded(avatar_id):
                self.avatars[avatar_id] = Held.HELD
                # Recorded after the end was decided: release it along with the rest.
                return [ReleaseAvatar(avatar_id)] if self.ending else []
            case AvatarStarted(avatar_id):
                self.avatar_billed_since.setdefault(avatar_id, now)
                if not self.ending and self.status is SessionStatus.DEGRADED:
                    self.status = SessionStatus.LIVE
                return []
            case AvatarLost(avatar_id, detail):
                if self.ending:
                    return []
                self.avatar_failed = True
                self.avatar_present = False
                self.status = SessionStatus.DEGRADED
                self.avatar_problem = detail
                cmds: list[Command] = [StopAvatarWork()]
                if avatar_id is not None and self.avatars.get(avatar_id) is Held.HELD:
                    self.avatars[avatar_id] = Held.RELEASING
                    cmds.append(ReleaseAvatar(avatar_id))
                return cmds
            case EndRequested(reason, detail):
                return self._end(reason, detail, now)
            case Extended(by):
                self.check_extend(by)
                self.deadline += by
                return []
            case TimerFired():
                if self.ending:
                    return []
                if now >= self.deadline:
                    return self._end(EndReason.MAX_DURATION, None, now)
                if not self.joined and now >= self.no_show_deadline:
                    return self._end(EndReason.NO_SHOW, "nobody joined before the no-show timeout", now)
                return []
            case RoomClosed():
                if self.ending:
                    return []  # our own delete_room, echoed back by the webhook
                return self._end(EndReason.ROOM_CLOSED, "LiveKit closed the room", now)
            case RoomReleased():
                self.room = Held.RELEASED
                self._room_may_exist = False
                return self._maybe_close(now)
            case AvatarReleased(avatar_id):
                if avatar_id in self.avatars:
                    self.avatars[avatar_id] = Held.RELEASED
                since = self.avatar_billed_since.pop(avatar_id, None)
                if since is not None:
                    self.avatar_seconds += (now - since).total_seconds()
                return self._maybe_close(now)
        raise TypeError(f"unknown event {event!r}")

    def _on_joined(self, identity: str, now: datetime) -> list[Command]:
        if identity == avatar_identity_for(self.spec.session_id):
            self.avatar_present = True
            return []
        if self.spec.participant(identity) is None:
            return []  # not one of ours (the monitor, a stale client): presence only counts the roster
        self.present.add(identity)
        self.admitted.add(identity)
        if identity not in self.joined:
            self.joined.append(identity)
        if self.ending:
            return []
        if self.status is SessionStatus.WAITING:
            self.status = SessionStatus.LIVE
            self.live_since = now
        if self.spec.avatar and self.spec.avatar.start is AvatarStart.ON_FIRST_JOIN:
            return self._request_avatar()
        return []

    def _request_avatar(self) -> list[Command]:
        if self.avatar_requested or self.ending:
            return []
        self.avatar_requested = True
        return [StartAvatar()]

    def _end(self, reason: EndReason, detail: str | None, now: datetime) -> list[Command]:
        if self.ending:
            return []
        self.end_reason = reason
        self.end_detail = detail
        self.status = SessionStatus.ENDING
        return self._release_all(now)

    def _release_all(self, now: datetime) -> list[Command]:
        cmds: list[Command] = [StopAvatarWork()] if self.avatar_requested else []
        for c in self.unreleased():
            if isinstance(c, ReleaseAvatar):
                self.avatars[c.avatar_session_id] = Held.RELEASING
            else:
                self.room = Held.RELEASING
            cmds.append(c)
        return cmds + self._maybe_close(now)

    def _maybe_close(self, now: datetime) -> list[Command]:
        if not self.ending or self.closed:
            return []
        if self.room in (Held.HELD, Held.RELEASING) or self._room_may_exist:
            return []
        if any(h in (Held.HELD, Held.RELEASING) for h in self.avatars.values()):
            return []
        self.status = SessionStatus.FAILED if self.end_reason is EndReason.FAILED else SessionStatus.ENDED
        self.ended_at = now
        return []

    @property
    def live_seconds(self) -> float:
        if self.live_since is None:
            return 0.0
        end = self.ended_at or self.live_since
        return max((end - self.live_since).total_seconds(), 0.0)
