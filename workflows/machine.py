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
    WhenLost,
    avatar_identity_for,
    avatar_identity_prefix,
)

# A fresh avatar session is started this long before the current one reaches its max_session_duration.
ROTATION_MARGIN = timedelta(seconds=60)

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
class RoomCreateFailed:
    """create_room gave up. The room may still exist (a timed-out attempt may have succeeded)."""


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
    | RoomCreateFailed
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
    """Create and start an avatar session that joins the room as `identity`."""

    identity: str


@dataclass(frozen=True)
class StopAvatarWork:
    """Stop the keep-alive of one avatar session, or (None) all avatar work: no new starts, no keep-alives.
    A start already in flight finishes first, so its session is never stopped halfway into billing."""

    avatar_session_id: str | None = None


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
    room_creating: bool = False  # create_room is in flight
    _room_may_exist: bool = False
    # Avatar sessions in the order they were recorded; the last one started is `avatar_current`.
    avatars: dict[str, Held] = field(default_factory=dict)
    avatar_requested: bool = False  # a first avatar was asked for
    avatar_starting: bool = False  # a StartAvatar is in flight (not yet started, nor failed)
    avatar_incoming: str | None = None  # the recorded id of that in-flight start
    avatar_current: str | None = None  # the avatar session serving the room
    avatar_identities: dict[str, str] = field(default_factory=dict)  # avatar session id -> room identity
    avatar_starts: int = 0
    avatar_present: bool = False
    avatar_problem: str | None = None
    avatar_replacements: int = 0  # replacements after losses (rotations do not count)
    avatar_retry_at: datetime | None = None
    avatar_rotate_at: datetime | None = None
    avatar_rotating_from: str | None = None
    avatar_fallback: bool = False
    avatar_billed_since: dict[str, datetime] = field(default_factory=dict)
    avatar_seconds: float = 0.0
    present: set[str] = field(default_factory=set)
    admitted: set[str] = field(default_factory=set)
    joined: list[str] = field(default_factory=list)
    reconnect_by: dict[str, datetime] = field(default_factory=dict)
    recoveries: list[str] = field(default_factory=list)
    deadline: datetime = field(init=False)
    end_reason: EndReason | None = None
    end_detail: str | None = None
    ended_at: datetime | None = None
    end_decided_at: datetime | None = None
    live_since: datetime | None = None

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
        return self.status in (SessionStatus.ENDED, SessionStatus.FAILED)

    @property
    def room_ready(self) -> bool:
        return self.room is Held.HELD and not self.ending

    @property
    def avatar_session_id(self) -> str | None:
        """The avatar session now serving the room (or the last one recorded)."""
        return self.avatar_current or next(reversed(self.avatars), None)

    @property
    def avatar_identity(self) -> str | None:
        """The room identity of the avatar session serving the room."""
        current = self.avatar_session_id
        return self.avatar_identities.get(current) if current else None

    def _is_avatar(self, identity: str) -> bool:
        return identity.startswith(avatar_identity_prefix(self.spec.session_id))

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
        times = [self.deadline, *self.reconnect_by.values()]
        if not self.joined:
            times.append(self.no_show_deadline)
        times += [t for t in (self.avatar_retry_at, self.avatar_rotate_at) if t is not None]
        return min(times)

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

    def avatar_session_length(self, now: datetime) -> timedelta:
        """`max_session_duration` for a new avatar session: until the session's hard cap, within the plan."""
        assert self.spec.avatar is not None
        return min(self.hard_deadline - now + ROTATION_MARGIN, self.spec.avatar.max_session_duration)

    # -- deciding ------------------------------------------------------------------------------------------

    def begin(self) -> list[Command]:
        self._room_may_exist = True
        self.room_creating = True
        return [CreateRoom()]

    def handle(self, event: Event, now: datetime) -> list[Command]:
        match event:
            case RoomCreated():
                self.room_creating = False
                if self.room is Held.RELEASED:
                    # Our delete ran before this create landed: the room exists again, so release it again.
                    self.room = Held.HELD
                    return self._release_all(now)
                if self.room is not Held.NONE:
                    return self._maybe_close(now)  # a duplicate report, or its delete is on the way
                self.room = Held.HELD
                if self.ending:
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
                return self._on_left(identity, now)
            case AvatarRecorded(avatar_id):
                self.avatars[avatar_id] = Held.HELD
                if self.avatar_starting:
                    self.avatar_incoming = avatar_id
                    self.avatar_identities[avatar_id] = avatar_identity_for(self.spec.session_id, self.avatar_starts)
                # Recorded after the end was decided: release it along with the rest.
                if self.ending:
                    self.avatars[avatar_id] = Held.RELEASING
                    return [ReleaseAvatar(avatar_id)]
                return []
            case AvatarStarted(avatar_id):
                return self._on_avatar_started(avatar_id, now)
            case AvatarLost(avatar_id, detail):
                return self._on_avatar_lost(avatar_id, detail, now)
            case EndRequested(reason, detail):
                return self._end(reason, detail, now)
            case Extended(by):
                self.check_extend(by)
                self.deadline += by
                return []
            case TimerFired():
                return self._on_timer(now)
            case RoomCreateFailed():
                self.room_creating = False
                return self._maybe_close(now)
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

    # -- participants --------------------------------------------------------------------------------------

    def _on_joined(self, identity: str, now: datetime) -> list[Command]:
        if self._is_avatar(identity):
            if identity == self.avatar_identity:
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
        if self.reconnect_by.pop(identity, None) is not None:
            self.recoveries.append(f"{identity} reconnected")
        if self.status is SessionStatus.WAITING:
            self.live_since = now
        self._refresh_status()
        if self.spec.avatar and self.spec.avatar.start is AvatarStart.ON_FIRST_JOIN:
            return self._request_avatar()
        return []

    def _on_left(self, identity: str, now: datetime) -> list[Command]:
        if self._is_avatar(identity):
            # Only the serving avatar leaving is a loss; an earlier one leaving is its own release.
            if identity == self.avatar_identity and self.avatar_current is not None and not self.ending:
                self.avatar_present = False
                return self._on_avatar_lost(self.avatar_current, "the avatar left the room", now)
            return []
        if identity not in self.present:
            return []
        self.present.discard(identity)
        if not self.ending:
            self.reconnect_by[identity] = now + self.spec.reconnect_grace
            self._refresh_status()
        return []

    def _participants_lost(self, now: datetime) -> list[Command]:
        missed = sorted(i for i, t in self.reconnect_by.items() if now >= t)
        for identity in missed:
            del self.reconnect_by[identity]
        if not missed:
            return []
        who = ", ".join(missed)
        if self.spec.when_participant_lost is WhenLost.END:
            return self._end(EndReason.PARTICIPANT_LOST, f"{who} did not return within the reconnect grace", now)
        if not self.present and not self.reconnect_by:
            return self._end(EndReason.PARTICIPANT_LOST, f"{who} did not return and nobody is left", now)
        self.recoveries.append(f"continued without {who}")
        self._refresh_status()
        return []

    # -- the avatar ----------------------------------------------------------------------------------------

    def _request_avatar(self) -> list[Command]:
        if self.avatar_requested or self.ending:
            return []
        self.avatar_requested = True
        return self._start_avatar()

    def _start_avatar(self) -> list[Command]:
        self.avatar_starting = True
        self.avatar_starts += 1
        return [StartAvatar(avatar_identity_for(self.spec.session_id, self.avatar_starts))]

    def _on_avatar_started(self, avatar_id: str, now: datetime) -> list[Command]:
        self.avatar_starting = False
        self.avatar_incoming = None
        self.avatar_billed_since.setdefault(avatar_id, now)
        if self.ending:
            return self._maybe_close(now)
        previous, self.avatar_current = self.avatar_rotating_from, avatar_id
        self.avatar_rotating_from = None
        self.avatar_problem = None
        assert self.spec.avatar is not None
        self.avatar_rotate_at = now + self.spec.avatar.max_session_duration - ROTATION_MARGIN
        self._refresh_status()
        if previous is not None:
            # Rotation: the new avatar took over (same identity, so LiveKit replaced the old participant).
            self.recoveries.append(f"avatar rotated from {previous} to {avatar_id} before its duration cap")
            return self._release_avatar(previous)
        return []

    def _on_avatar_lost(self, avatar_id: str | None, detail: str, now: datetime) -> list[Command]:
        incoming = self.avatar_starting and (avatar_id is None or avatar_id == self.avatar_incoming)
        was_current = avatar_id is not None and avatar_id == self.avatar_current
        cmds = self._release_avatar(avatar_id) if avatar_id is not None else []
        if incoming:
            self.avatar_starting = False
            self.avatar_incoming = None
        if self.ending:
            return cmds + self._maybe_close(now)
        if incoming:
            if self.avatar_rotating_from is not None:
                # A rotation's new avatar failed: the current one serves on; when it ends, it is replaced.
                self.avatar_rotating_from = None
                return cmds
            return cmds + self._recover(detail, now)
        if avatar_id is not None and avatar_id == self.avatar_rotating_from:
            # The outgoing avatar ended during a rotation: the incoming one takes over once it has started.
            self.avatar_rotating_from = None
            return cmds
        if was_current:
            return cmds + self._recover(detail, now)
        return cmds  # an older session, already replaced: releasing it is all

    def _recover(self, detail: str, now: datetime) -> list[Command]:
        """The serving avatar is gone: replace it after a backoff, or follow the fallback policy."""
        assert self.spec.avatar is not None
        self.avatar_current = None
        self.avatar_present = False
        self.avatar_rotate_at = None
        self.avatar_problem = detail
        if self.avatar_replacements < self.spec.avatar.max_replacements:
            self.avatar_retry_at = now + self.spec.avatar.replace_backoff * (2**self.avatar_replacements)
        elif self.spec.avatar.when_lost is WhenLost.END:
            return self._end(EndReason.AVATAR_LOST, f"the avatar could not be kept: {detail}", now)
        else:
            self.avatar_fallback = True
            self.recoveries.append(f"continuing without the avatar: {detail}")
        self._refresh_status()
        return []

    def _release_avatar(self, avatar_id: str) -> list[Command]:
        if self.avatar_current == avatar_id:
            self.avatar_current = None
        if self.avatars.get(avatar_id) is not Held.HELD:
            return []  # never recorded, or already being released: release exactly once
        self.avatars[avatar_id] = Held.RELEASING
        return [StopAvatarWork(avatar_id), ReleaseAvatar(avatar_id)]

    def _start_replacement(self, rotation: bool) -> list[Command]:
        if rotation:
            self.avatar_rotating_from = self.avatar_current
        else:
            self.avatar_replacements += 1
            self.recoveries.append(f"avatar replacement {self.avatar_replacements} after: {self.avatar_problem}")
        return self._start_avatar()

    # -- timers --------------------------------------------------------------------------------------------

    def _on_timer(self, now: datetime) -> list[Command]:
        if self.ending:
            return []
        if now >= self.deadline:
            return self._end(EndReason.MAX_DURATION, None, now)
        if not self.joined and now >= self.no_show_deadline:
            return self._end(EndReason.NO_SHOW, "nobody joined before the no-show timeout", now)
        cmds = self._participants_lost(now)
        if self.ending:
            return cmds
        if self.avatar_retry_at is not None and now >= self.avatar_retry_at:
            self.avatar_retry_at = None
            cmds += self._start_replacement(rotation=False)
        if self.avatar_rotate_at is not None and now >= self.avatar_rotate_at:
            self.avatar_rotate_at = None
            # Only if the session will outlive the current avatar session.
            if self.deadline > now + ROTATION_MARGIN and not self.avatar_starting:
                cmds += self._start_replacement(rotation=True)
        return cmds

    # -- status and the end --------------------------------------------------------------------------------

    def _refresh_status(self) -> None:
        """LIVE once someone joined; DEGRADED while the avatar is lost or someone is reconnecting."""
        if self.ending or not self.joined:
            return
        avatar_down = self.spec.avatar is not None and self.avatar_requested and (
            self.avatar_fallback or self.avatar_retry_at is not None or (self.avatar_current is None and self.avatar_problem is not None)
        )
        self.status = SessionStatus.DEGRADED if avatar_down or self.reconnect_by else SessionStatus.LIVE

    def _end(self, reason: EndReason, detail: str | None, now: datetime) -> list[Command]:
        if self.ending:
            return []
        self.end_reason = reason
        self.end_detail = detail
        self.end_decided_at = now
        self.status = SessionStatus.ENDING
        self.avatar_retry_at = self.avatar_rotate_at = None
        self.reconnect_by.clear()
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
        # Nothing may still be on its way into existence: a create in flight would land after we are gone.
        if self.room_creating or self.avatar_starting:
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
        end = self.end_decided_at or self.live_since
        return max((end - self.live_since).total_seconds(), 0.0)
