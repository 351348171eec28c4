"""The session's decisions as a pure state machine: events in, commands out.

Everything that decides what a session does lives in this file: when to create and delete the room, when to
create, start, keep alive, stop and replace an avatar session, who may join, when timers fire and what they
mean, what each failure means, when the session may close. `SessionWorkflow` is the interpreter around it:
it runs each command (an activity, a search-attribute upsert, a keep-alive cancel), turns what happened into
an event, and feeds it back. No Temporal, no I/O, no clock: `now` comes in with every event.

Each resource has its own small lifecycle, so the ordering rules are states, not code in the shell:

    room:           none -> creating -> live | maybe -> deleting -> gone
                    (a delete asked for while `creating` waits in `delete_wanted` until the create lands)
    avatar session: starting -> live -> stopping -> stopped
                    (a stop asked for while `starting` waits in `stop_wanted` until the start settles)

An event that a resource's table does not expect (a start result for an avatar session that is not
starting, a delete result for a room that is not deleting) is a bug in the shell: it raises
`UnexpectedEvent`, which fails the workflow task loudly instead of leaving the session in a state nobody
planned for. Room happenings (webhooks, the monitor) are different: they arrive late, twice or out of
order, so they are deduplicated by event id and tolerated in any state.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, PlainSerializer

from workflows.models import (
    AvatarBilling,
    AvatarEndedBy,
    AvatarStart,
    ConnectionLevel,
    ConsentEvent,
    CreateAvatarInput,
    CreateRoomInput,
    Degradation,
    EndReason,
    Handoff,
    MintTokenInput,
    MonitorInput,
    ParticipantHandoff,
    RecordingReport,
    RecordingStatus,
    Role,
    SessionOutcome,
    SessionSpec,
    SessionState,
    SessionStatus,
    StartRecordingInput,
    WhenLost,
    avatar_identity_for,
    avatar_identity_prefix,
)

# A fresh avatar session is started this long before the current one reaches its max_session_duration.
ROTATION_MARGIN = timedelta(seconds=60)
PARTICIPANT_TOKEN_TTL = timedelta(minutes=15)  # LiveKit refreshes the token of a connected client
# A participant's token expires at the latest this long after the session's hard cap (max_duration_cap): a token
# that outlives its session can re-create the room on a server that auto-creates rooms (LiveKit Cloud).
TOKEN_GRACE = timedelta(minutes=1)
# LiveKit keeps the room this long after the last person leaves, on top of their reconnect grace.
DEPARTURE_MARGIN = timedelta(minutes=1)
# Besides the roster, the room holds the engine's own participants: the avatar and the room monitor.
ENGINE_PARTICIPANTS = 2
SEEN_EVENT_IDS = 512  # room events are deduplicated over this many recent ids

# A set of names in the carried state (`CarriedSession`) is written sorted: the same state, the same payload.
Names = Annotated[set[str], PlainSerializer(sorted, return_type=list[str])]

# ---- events: what happened ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoomCreated:
    pass


@dataclass(frozen=True)
class RoomCreateFailed:
    """create_room gave up. The room may still exist (a timed-out attempt may have succeeded)."""

    detail: str = "the room could not be created"


@dataclass(frozen=True)
class RoomDeleted:
    pass


@dataclass(frozen=True)
class ParticipantJoined:
    identity: str
    event_id: str | None = None
    sid: str | None = None  # the participant's connection, when the source says (webhook or monitor)
    at: datetime | None = None  # when it happened, when the source says: older than what we know is stale


@dataclass(frozen=True)
class ParticipantLeft:
    identity: str
    event_id: str | None = None
    sid: str | None = None
    at: datetime | None = None


@dataclass(frozen=True)
class RoomClosed:
    """LiveKit reports the room finished."""

    event_id: str | None = None


@dataclass(frozen=True)
class AvatarCreated:
    """Step A done: LiveAvatar allocated a session id (nothing bills yet). `session_token` starts it."""

    avatar_session_id: str
    session_token: str


@dataclass(frozen=True)
class AvatarCreateFailed:
    detail: str


@dataclass(frozen=True)
class AvatarStarted:
    avatar_session_id: str


@dataclass(frozen=True)
class AvatarStartFailed:
    avatar_session_id: str
    detail: str


@dataclass(frozen=True)
class AvatarEnded:
    """The keep-alive found the avatar session ended on LiveAvatar's side."""

    avatar_session_id: str
    detail: str


@dataclass(frozen=True)
class KeepAliveStopped:
    """The keep-alive acknowledged its cancel."""

    avatar_session_id: str


@dataclass(frozen=True)
class AvatarStopped:
    avatar_session_id: str


@dataclass(frozen=True)
class EndRequested:
    detail: str


@dataclass(frozen=True)
class CancelRequested:
    """The workflow was cancelled (the abort path; `end` is the normal one)."""

    detail: str | None = None


@dataclass(frozen=True)
class Failed:
    """Something failed for good outside any resource's lifecycle (an unexpected failure of the run)."""

    detail: str


@dataclass(frozen=True)
class Extended:
    by: timedelta


@dataclass(frozen=True)
class TimerFired:
    """The shell's wait for `next_deadline()` ran out."""


@dataclass(frozen=True)
class Consent:
    """The `consent` update: `identity` grants or withdraws consent to record the session."""

    identity: str
    granted: bool


@dataclass(frozen=True)
class RecordingBegan:
    egress_id: str


@dataclass(frozen=True)
class RecordingStartFailed:
    detail: str


@dataclass(frozen=True)
class RecordingStopped:
    egress_id: str


@dataclass(frozen=True)
class RecordingStopFailed:
    egress_id: str
    detail: str
# The room monitor's events (see "the room monitor" below). Webhooks feed ParticipantJoined/Left/RoomClosed.


@dataclass(frozen=True)
class TrackPublished:
    identity: str
    track_sid: str
    kind: str
    event_id: str | None = None


@dataclass(frozen=True)
class TrackUnpublished:
    identity: str
    track_sid: str
    event_id: str | None = None


@dataclass(frozen=True)
class QualityChanged:
    """A participant's connection quality settled on `quality` (it outlasted the monitor's debounce)."""

    identity: str
    quality: ConnectionLevel
    detail: str | None = None
    event_id: str | None = None


@dataclass(frozen=True)
class AvatarFrozen:
    """The avatar publishes video but no frame arrived for the policy's `avatar_frozen_after`."""

    identity: str
    detail: str
    event_id: str | None = None


@dataclass(frozen=True)
class AvatarSilent:
    """The avatar's audio carried no packets, or it published none, for the policy's `avatar_silent_after`."""

    identity: str
    detail: str
    event_id: str | None = None


@dataclass(frozen=True)
class AvatarFirstFrame:
    """The first video frame of the avatar `identity` reached the room at `at` (seen by the monitor)."""

    identity: str
    at: datetime | None = None
    event_id: str | None = None


@dataclass(frozen=True)
class RoomLost:
    """The room vanished without a webhook (a LiveKit node restarted): the monitor found it missing."""

    detail: str
    event_id: str | None = None


@dataclass(frozen=True)
class PresenceObserved:
    """Who is really in the room at `at` (after a gap in what the monitor saw: its start, a reconnect)."""

    identities: tuple[str, ...]
    at: datetime | None = None
    event_id: str | None = None


@dataclass(frozen=True)
class MonitorStopped:
    """The room monitor activity ended: cancelled (detail None), or it failed for good."""

    detail: str | None = None


Event = (
    RoomCreated
    | RoomCreateFailed
    | RoomDeleted
    | ParticipantJoined
    | ParticipantLeft
    | RoomClosed
    | AvatarCreated
    | AvatarCreateFailed
    | AvatarStarted
    | AvatarStartFailed
    | AvatarEnded
    | KeepAliveStopped
    | AvatarStopped
    | EndRequested
    | CancelRequested
    | Failed
    | Extended
    | TimerFired
    | Consent
    | RecordingBegan
    | RecordingStartFailed
    | RecordingStopped
    | RecordingStopFailed
    | TrackPublished
    | TrackUnpublished
    | QualityChanged
    | AvatarFrozen
    | AvatarSilent
    | AvatarFirstFrame
    | RoomLost
    | PresenceObserved
    | MonitorStopped
)

# ---- commands: what the shell must do ----------------------------------------------------------------------


@dataclass(frozen=True)
class CreateRoom:
    request: CreateRoomInput


@dataclass(frozen=True)
class DeleteRoom:
    room: str


@dataclass(frozen=True)
class CreateAvatarSession:
    """Step A: allocate a LiveAvatar session (no billing). Answered by AvatarCreated or AvatarCreateFailed."""

    request: CreateAvatarInput


@dataclass(frozen=True)
class PublishAvatarSessions:
    """Upsert the `AvatarSessionId` search attribute: every avatar session the session recorded."""

    avatar_session_ids: tuple[str, ...]


@dataclass(frozen=True)
class StartAvatarSession:
    """Step B: billing starts. Answered by AvatarStarted or AvatarStartFailed."""

    avatar_session_id: str
    session_token: str


@dataclass(frozen=True)
class KeepAvatarAlive:
    """Run the keep-alive until cancelled; answered by KeepAliveStopped (cancelled) or AvatarEnded."""

    avatar_session_id: str


@dataclass(frozen=True)
class CancelKeepAlive:
    avatar_session_id: str


@dataclass(frozen=True)
class StopAvatarSession:
    """Answered by AvatarStopped (retried until it succeeds)."""

    avatar_session_id: str


@dataclass(frozen=True)
class PublishStatus:
    """Upsert the `SessionStatus` search attribute, and with it what support searches by that moves with the
    status: `SessionDegraded` (ever degraded), `SessionEndReason` and `AvatarBilledSeconds` (so far; final
    with the closing status)."""

    status: SessionStatus
    # A snapshot of the session at the status change, not part of what the command is: two status upserts are
    # the same command whatever the snapshot says (compare=False), and these are asserted on their own.
    ever_degraded: bool = field(default=False, compare=False)
    end_reason: EndReason | None = field(default=None, compare=False)
    avatar_billed_seconds: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class StartRecording:
    """Start the room's egress. Answered by RecordingBegan or RecordingStartFailed."""

    request: StartRecordingInput


@dataclass(frozen=True)
class StopRecording:
    """Answered by RecordingStopped or RecordingStopFailed."""

    egress_id: str


@dataclass(frozen=True)
class StartMonitor:
    """Run the room monitor (media task queue) until cancelled; answered by MonitorStopped."""

    request: MonitorInput


@dataclass(frozen=True)
class CancelMonitor:
    """Stop the room monitor: it leaves the room (before the room is deleted)."""


Command = (
    CreateRoom
    | DeleteRoom
    | CreateAvatarSession
    | PublishAvatarSessions
    | StartAvatarSession
    | KeepAvatarAlive
    | CancelKeepAlive
    | StopAvatarSession
    | PublishStatus
    | StartRecording
    | StopRecording
    | StartMonitor
    | CancelMonitor
)


@dataclass(frozen=True)
class Deadline:
    """When the shell must wake the machine with `TimerFired`, and what for (the timer's name in the UI)."""

    at: datetime
    name: str


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


class SessionCancelled(SessionEnded):
    kind = "SessionCancelled"


class RoomFull(Refusal):
    kind = "RoomFull"


class ExtendBeyondCap(Refusal):
    kind = "ExtendBeyondCap"


class NotRecorded(Refusal):
    """Consent was asked of a session that is not recorded."""

    kind = "NotRecorded"


class UnexpectedEvent(RuntimeError):
    """An event the machine's tables do not allow in the current state: a bug in the shell, never input."""


# ---- the resources -----------------------------------------------------------------------------------------


class RoomPhase(StrEnum):
    NONE = "none"  # nothing asked of LiveKit yet
    CREATING = "creating"  # create_room in flight
    LIVE = "live"
    MAYBE = "maybe"  # create_room gave up; the room may exist all the same
    DELETING = "deleting"  # delete_room in flight (retried until it succeeds)
    GONE = "gone"


@dataclass(frozen=True)
class Room:
    phase: RoomPhase = RoomPhase.NONE
    delete_wanted: bool = False  # the end came while the create was in flight: delete once it lands


class AvatarPhase(StrEnum):
    STARTING = "starting"  # recorded (step A done), start in flight
    LIVE = "live"  # started: billing
    STOPPING = "stopping"  # stop in flight (retried until it succeeds)
    STOPPED = "stopped"


@dataclass(frozen=True)
class AvatarSession:
    """One LiveAvatar session of this session, by its own id and its own room identity."""

    id: str
    identity: str
    phase: AvatarPhase = AvatarPhase.STARTING
    stop_wanted: bool = False  # lost or unwanted while starting: stopped once the start settles
    keepalive: bool = False  # its keep-alive activity is running
    billed_from: datetime | None = None
    billed_until: datetime | None = None
    # Why it was stopped or ended, and by whom: set once, by the first decision (a later one changes nothing).
    stop_reason: str | None = None
    ended_by: AvatarEndedBy | None = None

    @property
    def billed_seconds(self) -> float:
        if self.billed_from is None or self.billed_until is None:
            return 0.0
        return max((self.billed_until - self.billed_from).total_seconds(), 0.0)

    def ended(self, reason: str, by: AvatarEndedBy = AvatarEndedBy.SESSIONFLOW) -> AvatarSession:
        """This avatar session with why and by whom it ended, unless that was already decided."""
        return self if self.stop_reason is not None else replace(self, stop_reason=reason, ended_by=by)

    def billing(self) -> AvatarBilling:
        return AvatarBilling(
            avatar_session_id=self.id,
            identity=self.identity,
            started_at=self.billed_from,
            ended_at=self.billed_until,
            seconds=self.billed_seconds,
            end_reason=self.stop_reason,
            ended_by=self.ended_by,
        )


@dataclass
class AvatarPlan:
    """Which avatar session serves the room, and what happens when it is lost or reaches its cap."""

    requested: bool = False  # a first avatar was asked for
    creating: str | None = None  # identity of a step A in flight (no id yet)
    incoming: str | None = None  # the recorded id being started to serve the room
    current: str | None = None  # the avatar session serving the room
    rotating_from: str | None = None  # during a rotation: the one the incoming replaces
    starts: int = 0  # avatar sessions asked for (their identities are numbered)
    present: bool = False  # the serving avatar is in the room
    problem: str | None = None
    replacements: int = 0  # after losses (rotations do not count)
    retry_at: datetime | None = None
    rotate_at: datetime | None = None
    fallback: bool = False  # could not be kept: the session goes on without it

    @property
    def start_in_flight(self) -> bool:
        return self.creating is not None or self.incoming is not None


class RecordingPhase(StrEnum):
    IDLE = "idle"  # not recording (waiting for consent)
    STARTING = "starting"  # start_recording in flight
    LIVE = "live"
    STOPPING = "stopping"  # stop_recording in flight
    UNAVAILABLE = "unavailable"  # the start was refused: not tried again in this session


@dataclass
class Recording:
    """The session's recording and the consents that gate it."""

    phase: RecordingPhase = RecordingPhase.IDLE
    egress_id: str | None = None  # the live (or stopping) egress
    egress_ids: list[str] = field(default_factory=list)
    consented: Names = field(default_factory=set)
    consents: list[ConsentEvent] = field(default_factory=list)
    detail: str | None = None


@dataclass
class People:
    present: Names = field(default_factory=set)
    admitted: Names = field(default_factory=set)
    joined: list[str] = field(default_factory=list)
    reconnect_by: dict[str, datetime] = field(default_factory=dict)


@dataclass(frozen=True)
class Heard:
    """The latest thing a room event said about one participant: later news about an older moment is stale."""

    at: datetime
    sid: str | None
    joined: bool


@dataclass
class RoomWatch:
    """What the room monitor tells the session beyond presence: tracks, quality, a vanished room."""

    enabled: bool = False  # this session runs a monitor (the shell turns it on: `workflow.patched`)
    # The monitor also watches the avatar's audio and reports its first frames (the shell: `workflow.patched`).
    avatar_media: bool = False
    running: bool = False
    tracks: dict[str, dict[str, str]] = field(default_factory=dict)  # identity -> track sid -> kind
    quality: dict[str, ConnectionLevel] = field(default_factory=dict)
    degraded: dict[str, Degradation] = field(default_factory=dict)  # identity -> why it degrades the session
    heard: dict[str, Heard] = field(default_factory=dict)
    gone_sids: dict[str, Names] = field(default_factory=dict)  # connections that left, per identity
    lost_at: datetime | None = None  # the room vanished then; it is being re-created
    connection_lost_since: dict[str, datetime] = field(default_factory=dict)  # candidates whose quality is LOST
    avatar_after_room: bool = False  # the avatar was lost with the room: start a fresh one into the new room

    @property
    def troubled(self) -> bool:
        return bool(self.degraded) or self.lost_at is not None


@dataclass
class HandoffClock:
    """The times behind the session's connection metrics (`Handoff`)."""

    granted_at: dict[str, datetime] = field(default_factory=dict)  # grant issued, not in the room yet
    connect_s: dict[str, float] = field(default_factory=dict)
    reconnects: dict[str, int] = field(default_factory=dict)
    level: dict[str, tuple[ConnectionLevel, datetime]] = field(default_factory=dict)  # current level, since
    level_s: dict[str, dict[ConnectionLevel, float]] = field(default_factory=dict)
    avatar_asked: dict[str, datetime] = field(default_factory=dict)  # avatar identity -> create asked for
    avatar_join_s: list[float] = field(default_factory=list)
    room_recovery_s: list[float] = field(default_factory=list)
    framed_asked: dict[str, datetime] = field(default_factory=dict)  # avatar identity -> asked for, no frame yet
    avatar_first_frame_s: list[float] = field(default_factory=list)
    avatar_lost_at: datetime | None = None  # the serving avatar was lost then; no replacement has shown a frame
    replacing: dict[str, datetime] = field(default_factory=dict)  # replacement avatar identity -> the loss it repairs
    avatar_replacement_s: list[float] = field(default_factory=list)
    last_now: datetime | None = None

    def add_level_time(self, identity: str, until: datetime) -> None:
        if identity in self.level:
            level, since = self.level[identity]
            spent = self.level_s.setdefault(identity, {})
            spent[level] = spent.get(level, 0.0) + max((until - since).total_seconds(), 0.0)
            self.level[identity] = (level, until)

    def report(self, now: datetime | None) -> Handoff:
        people = set(self.connect_s) | set(self.reconnects) | set(self.level_s) | set(self.level)
        participants = {}
        for who in sorted(people):
            spent = dict(self.level_s.get(who, {}))
            if who in self.level and now is not None:
                level, since = self.level[who]
                spent[level] = spent.get(level, 0.0) + max((now - since).total_seconds(), 0.0)
            participants[who] = ParticipantHandoff(
                connect_s=self.connect_s.get(who), reconnects=self.reconnects.get(who, 0),
                quality_s={k: round(v, 1) for k, v in spent.items()},
            )
        return Handoff(participants=participants, avatar_join_s=list(self.avatar_join_s),
                       room_recovery_s=list(self.room_recovery_s), avatar_first_frame_s=list(self.avatar_first_frame_s),
                       avatar_replacement_s=list(self.avatar_replacement_s))


@dataclass(frozen=True)
class Ending:
    reason: EndReason
    detail: str | None
    decided_at: datetime


# ---- the state carried into the next run ------------------------------------------------------------------

CARRIED_VERSION: Literal[1] = 1


class CarriedSession(BaseModel):
    """Everything the machine knows, carried into the next run when a long session continues as new.

    Strict and versioned like every payload (and encrypted by the payload codec with them): a run that reads a
    version it does not know fails its workflow task loudly (fixed by a deploy), never guesses. Times are
    absolute, so every deadline (max duration, no-show, reconnect grace, avatar backoff and rotation, a lost
    connection's clock) stands as it was; resources keep their ids and phases, so nothing is created again.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: Literal[1] = CARRIED_VERSION
    spec: SessionSpec  # as the session was started: it never changes
    runs: int  # runs before the one this state is carried into (1 for the first continue-as-new)
    started_at: datetime
    deadline: datetime
    status: SessionStatus
    room: Room
    avatars: dict[str, AvatarSession]  # in the order they were recorded (a JSON object keeps its order)
    avatar: AvatarPlan
    people: People
    ending: Ending | None
    live_since: datetime | None
    ended_at: datetime | None
    recoveries: list[str]
    recording: Recording
    ever_degraded: bool
    seen_event_ids: list[str]  # oldest first, at most SEEN_EVENT_IDS
    room_watch: RoomWatch
    clock: HandoffClock


# ---- the machine -------------------------------------------------------------------------------------------


class SessionMachine:
    def __init__(self, spec: SessionSpec, started_at: datetime) -> None:
        self.spec = spec
        self.started_at = started_at
        self.deadline = started_at + spec.max_duration
        self.status = SessionStatus.PROVISIONING
        self.room = Room()
        self.avatars: dict[str, AvatarSession] = {}  # in the order they were recorded
        self.avatar = AvatarPlan()
        self.people = People()
        self.ending: Ending | None = None
        self.live_since: datetime | None = None
        self.ended_at: datetime | None = None
        self.recoveries: list[str] = []
        self.recording = Recording()
        self.ever_degraded = False  # the `SessionDegraded` search attribute
        self._seen: deque[str] = deque(maxlen=SEEN_EVENT_IDS)
        self.room_watch = RoomWatch()
        self.clock = HandoffClock()
        self.runs = 1  # this run and the ones it continued from

    # -- continue-as-new -----------------------------------------------------------------------------------

    def carry(self) -> CarriedSession:
        """The whole state, for the next run (a deep copy: the machine goes on unchanged)."""
        mine = copy.deepcopy
        return CarriedSession(
            spec=self.spec,
            runs=self.runs,
            started_at=self.started_at,
            deadline=self.deadline,
            status=self.status,
            room=self.room,
            avatars=mine(self.avatars),
            avatar=mine(self.avatar),
            people=mine(self.people),
            ending=self.ending,
            live_since=self.live_since,
            ended_at=self.ended_at,
            recoveries=list(self.recoveries),
            recording=mine(self.recording),
            ever_degraded=self.ever_degraded,
            seen_event_ids=list(self._seen),
            room_watch=mine(self.room_watch),
            clock=mine(self.clock),
        )

    @classmethod
    def carried(cls, state: CarriedSession) -> SessionMachine:
        """The machine of a run that continued from another, exactly as that one left it. `resume()` says
        which long-running watchers to start again."""
        machine = cls(state.spec, state.started_at)
        mine = copy.deepcopy
        machine.deadline = state.deadline
        machine.status = state.status
        machine.room = state.room
        machine.avatars = mine(state.avatars)
        machine.avatar = mine(state.avatar)
        machine.people = mine(state.people)
        machine.ending = state.ending
        machine.live_since = state.live_since
        machine.ended_at = state.ended_at
        machine.recoveries = list(state.recoveries)
        machine.recording = mine(state.recording)
        machine.ever_degraded = state.ever_degraded
        machine._seen.extend(state.seen_event_ids)
        machine.room_watch = mine(state.room_watch)
        machine.clock = mine(state.clock)
        machine.runs = state.runs + 1
        return machine

    @property
    def quiet(self) -> bool:
        """Nothing one-shot is on its way (room create or delete, avatar create, start or stop, recording start
        or stop, a keep-alive winding down) and the session is not ending: the state can move to a new run, and
        only the long-running watchers (keep-alives, the room monitor) need starting again there."""
        return (
            self.ending is None
            and self.room.phase in (RoomPhase.NONE, RoomPhase.LIVE)
            and self.avatar.creating is None
            and all(a.phase is AvatarPhase.LIVE if a.keepalive else a.phase is AvatarPhase.STOPPED
                    for a in self.avatars.values())
            and self.recording.phase not in (RecordingPhase.STARTING, RecordingPhase.STOPPING)
        )

    def resume(self) -> list[Command]:
        """The first commands of a run that continued from another: the watchers the last run had running
        (each avatar session's keep-alive, the room monitor), and nothing else: no room, no avatar is created or
        started again, and billing runs on as it was."""
        commands: list[Command] = [KeepAvatarAlive(a.id) for a in self.avatars.values() if a.keepalive]
        if self.room_watch.running:
            self.room_watch.running = False  # started again just below
            commands += self._start_monitor()
        return commands

    # -- reading -------------------------------------------------------------------------------------------

    @property
    def hard_deadline(self) -> datetime:
        return self.started_at + self.spec.max_duration_cap

    @property
    def no_show_deadline(self) -> datetime:
        return self.started_at + self.spec.no_show_timeout

    @property
    def end_reason(self) -> EndReason | None:
        return self.ending.reason if self.ending else None

    @property
    def released(self) -> bool:
        """Ended, and every resource the session created is confirmed released: updates may be answered."""
        return self.status in (SessionStatus.ENDED, SessionStatus.FAILED)

    @property
    def finished(self) -> bool:
        """Released, and no keep-alive or room monitor still winding down: the workflow may return."""
        return self.released and not any(a.keepalive for a in self.avatars.values()) and not self.room_watch.running

    @property
    def join_decidable(self) -> bool:
        """A waiting `join` can be answered: the room exists, or the session is ending."""
        return self.room.phase is RoomPhase.LIVE or self.ending is not None

    @property
    def avatar_session_id(self) -> str | None:
        """The avatar session serving the room (or, while none does, the last one recorded)."""
        return self.avatar.current or next(reversed(self.avatars), None)

    @property
    def avatar_identity(self) -> str | None:
        current = self.avatar_session_id
        return self.avatars[current].identity if current else None

    @property
    def avatar_seconds(self) -> float:
        return sum(a.billed_seconds for a in self.avatars.values())

    def avatar_billing(self) -> list[AvatarBilling]:
        """One row per avatar session, in the order they were recorded."""
        return [a.billing() for a in self.avatars.values()]

    @property
    def live_seconds(self) -> float:
        if self.live_since is None:
            return 0.0
        end = self.ending.decided_at if self.ending else self.live_since
        return max((end - self.live_since).total_seconds(), 0.0)

    def next_deadline(self) -> Deadline | None:
        """When the shell should wake the machine with `TimerFired` if nothing else happens first."""
        if self.ending:
            return None
        deadlines = [Deadline(self.deadline, "max duration")]
        if not self.people.joined:
            deadlines.append(Deadline(self.no_show_deadline, f"no-show {_seconds(self.spec.no_show_timeout)}"))
        deadlines += [Deadline(at, f"reconnect grace for {who}") for who, at in sorted(self.people.reconnect_by.items())]
        if self.avatar.retry_at is not None:
            deadlines.append(Deadline(self.avatar.retry_at, f"avatar replacement {self.avatar.replacements + 1} backoff"))
        if self.avatar.rotate_at is not None:
            deadlines.append(Deadline(self.avatar.rotate_at, "avatar rotation"))
        deadlines += self._connection_deadlines()
        return min(deadlines, key=lambda d: d.at)

    def check_join(self, identity: str) -> None:
        """Raise a typed refusal if `identity` may not join now (the `join` update's validator)."""
        if self.ending:
            raise self._ended_refusal("start a new session id")
        if self.spec.participant(identity) is None:
            raise UnknownParticipant(
                f"{identity!r} is not on the roster of session {self.spec.session_id!r}; "
                "add them to the session's participants when starting it"
            )
        if identity not in self.people.admitted and len(self.people.admitted) >= self.spec.room_capacity:
            raise RoomFull(
                f"session {self.spec.session_id!r} already admitted {len(self.people.admitted)} of "
                f"{self.spec.room_capacity} participants"
            )

    def check_extend(self, by: timedelta) -> None:
        if self.ending:
            raise self._ended_refusal("it cannot be extended")
        if self.deadline + by > self.hard_deadline:
            room_left = max(self.hard_deadline - self.deadline, timedelta(0))
            raise ExtendBeyondCap(
                f"extending by {int(by.total_seconds())} s would pass the session's cap of "
                f"{int(self.spec.max_duration_cap.total_seconds())} s; at most "
                f"{int(room_left.total_seconds())} s more can be added"
            )

    def _ended_refusal(self, what_now: str) -> SessionEnded:
        assert self.ending is not None
        kind = SessionCancelled if self.ending.reason is EndReason.CANCELLED else SessionEnded
        return kind(f"session {self.spec.session_id!r} has ended ({self.ending.reason}); {what_now}")

    # -- deciding: the entry points ------------------------------------------------------------------------

    def begin(self) -> list[Command]:
        """The first commands of a session: create its room (unless an `end` or a cancel came first)."""
        if self.ending:
            return []
        if self.room.phase is not RoomPhase.NONE:
            raise UnexpectedEvent("begin() called twice")
        self.room = Room(RoomPhase.CREATING)
        return [CreateRoom(self._room_request())]

    def _room_request(self) -> CreateRoomInput:
        spec = self.spec
        return CreateRoomInput(
            room=spec.room_name,
            workflow_id=spec.workflow_id,
            session_kind=spec.kind,
            max_participants=spec.room_capacity + ENGINE_PARTICIPANTS,
            empty_timeout_s=int((spec.no_show_timeout + timedelta(minutes=1)).total_seconds()),
            departure_timeout_s=int((spec.reconnect_grace + DEPARTURE_MARGIN).total_seconds()),
        )

    def admit(self, identity: str, now: datetime | None = None, *, bounded_ttl: bool = True) -> MintTokenInput:
        """Admit `identity` (raises a typed refusal) and say which token to mint for them. `now` starts their
        connection clock (grant issued, to in the room).

        With `now` and `bounded_ttl`, the token expires no later than the session may last (`participant_token_ttl`);
        otherwise after PARTICIPANT_TOKEN_TTL, as sessions that started before the bound existed keep doing.
        """
        self.check_join(identity)
        if now is not None and identity not in self.people.present:
            self.clock.granted_at.setdefault(identity, now)
        participant = self.spec.participant(identity)
        assert participant is not None
        self.people.admitted.add(identity)
        return MintTokenInput(
            room=self.spec.room_name,
            identity=participant.identity,
            name=participant.name,
            role=participant.role,
            ttl=self.participant_token_ttl(now) if now is not None and bounded_ttl else PARTICIPANT_TOKEN_TTL,
        )

    def participant_token_ttl(self, now: datetime) -> timedelta:
        """PARTICIPANT_TOKEN_TTL, cut to end TOKEN_GRACE after the hard cap: no extend can make the session last
        longer, and a token that outlived it could bring its room back."""
        return max(min(PARTICIPANT_TOKEN_TTL, self.hard_deadline + TOKEN_GRACE - now), timedelta(seconds=1))

    def handle(self, event: Event, now: datetime) -> list[Command]:
        """Apply one event; return the commands it calls for (a status upsert first when the status moved)."""
        before = self.status
        self.clock.last_now = now
        commands = self._dispatch(event, now)
        commands += self._maybe_close(now)
        if self.status is not before:
            commands.insert(0, self._publish_status())
        return commands

    def _dispatch(self, event: Event, now: datetime) -> list[Command]:
        match event:
            case RoomCreated():
                return self._on_room_created(now)
            case RoomCreateFailed(detail):
                return self._on_room_create_failed(detail, now)
            case RoomDeleted():
                self._expect_room(RoomPhase.DELETING, event)
                self.room = Room(RoomPhase.GONE)
                return []
            case ParticipantJoined(identity, event_id, sid, at):
                if self._seen_before(event_id) or self._stale(identity, sid, at, joined=True):
                    return []
                return self._on_joined(identity, now)
            case ParticipantLeft(identity, event_id, sid, at):
                if self._seen_before(event_id) or self._stale(identity, sid, at, joined=False):
                    return []
                self._forget_connection(identity, now)
                return self._on_left(identity, now)
            case RoomClosed(event_id):
                if self._seen_before(event_id) or self.ending:
                    return []  # our own delete_room, echoed back by the webhook, or a duplicate
                return self._end(EndReason.ROOM_CLOSED, "LiveKit closed the room", now)
            case AvatarCreated(avatar_id, token):
                return self._on_avatar_created(avatar_id, token, now)
            case AvatarCreateFailed(detail):
                if self.avatar.creating is None:
                    raise UnexpectedEvent(f"{event!r}: no avatar session was being created")
                self.avatar.creating = None
                return self._on_incoming_lost(f"could not create the avatar session: {detail}", now)
            case AvatarStarted(avatar_id):
                return self._on_avatar_started(avatar_id, now)
            case AvatarStartFailed(avatar_id, detail):
                return self._on_avatar_start_failed(avatar_id, detail, now)
            case AvatarEnded(avatar_id, detail):
                return self._on_avatar_ended(avatar_id, detail, now)
            case KeepAliveStopped(avatar_id):
                avatar = self._avatar(avatar_id, event)
                if not avatar.keepalive:
                    raise UnexpectedEvent(f"{event!r}: no keep-alive was running")
                self.avatars[avatar_id] = replace(avatar, keepalive=False)
                return []
            case AvatarStopped(avatar_id):
                avatar = self._avatar(avatar_id, event)
                if avatar.phase is not AvatarPhase.STOPPING:
                    raise UnexpectedEvent(f"{event!r} while the avatar session is {avatar.phase}")
                # Billing ends with our stop, unless LiveAvatar had already ended the session (billed_until set).
                billed_until = avatar.billed_until or (now if avatar.billed_from else None)
                self.avatars[avatar_id] = replace(avatar, phase=AvatarPhase.STOPPED, billed_until=billed_until)
                return []
            case EndRequested(detail):
                return self._end(EndReason.REQUESTED, detail, now)
            case CancelRequested(detail):
                return self._end(EndReason.CANCELLED, detail, now)
            case Failed(detail):
                return self._end(EndReason.FAILED, detail, now)
            case Extended(by):
                self.check_extend(by)
                self.deadline += by
                self._plan_rotation(now)
                return []
            case TimerFired():
                return self._on_timer(now)
            case Consent() | RecordingBegan() | RecordingStartFailed() | RecordingStopped() | RecordingStopFailed():
                return self._on_recording_event(event, now)
            case (
                TrackPublished() | TrackUnpublished() | QualityChanged() | AvatarFrozen() | AvatarSilent()
                | AvatarFirstFrame() | RoomLost() | PresenceObserved() | MonitorStopped()
            ):
                return self._on_monitor_event(event, now)
        raise UnexpectedEvent(f"unknown event {event!r}")

    def _seen_before(self, event_id: str | None) -> bool:
        """Room events come from webhooks (and later the monitor): the same one may arrive twice."""
        if event_id is None:
            return False
        if event_id in self._seen:
            return True
        self._seen.append(event_id)
        return False

    # -- the room ------------------------------------------------------------------------------------------

    def _expect_room(self, phase: RoomPhase, event: Event) -> Room:
        if self.room.phase is not phase:
            raise UnexpectedEvent(f"{event!r} while the room is {self.room.phase}")
        return self.room

    def _on_room_created(self, now: datetime) -> list[Command]:
        room = self._expect_room(RoomPhase.CREATING, RoomCreated())
        if self.room_watch.lost_at is not None:
            return self._on_room_recreated(room, now)
        self.room = Room(RoomPhase.LIVE)
        if room.delete_wanted or self.ending:
            return self._delete_room()
        self.status = SessionStatus.WAITING
        if self.people.joined:  # someone was reported in the room before its create was confirmed
            self.live_since = now
            self._refresh_status()
        return self._start_monitor() + self._maybe_request_avatar(now) + self._steer_recording()

    def _on_room_create_failed(self, detail: str, now: datetime) -> list[Command]:
        room = self._expect_room(RoomPhase.CREATING, RoomCreateFailed(detail))
        self.room = Room(RoomPhase.MAYBE)  # a timed-out attempt may have created it: delete to be sure
        if room.delete_wanted:
            return self._delete_room()
        return self._end(EndReason.FAILED, detail, now)

    def _delete_room(self) -> list[Command]:
        """Delete the room, once: only after its create has landed, never twice."""
        match self.room.phase:
            case RoomPhase.LIVE | RoomPhase.MAYBE:
                self.room = Room(RoomPhase.DELETING)
                return [DeleteRoom(self.spec.room_name)]
            case RoomPhase.CREATING:
                self.room = replace(self.room, delete_wanted=True)
            case RoomPhase.NONE:
                self.room = Room(RoomPhase.GONE)
        return []

    # -- participants --------------------------------------------------------------------------------------

    def _is_avatar(self, identity: str) -> bool:
        return identity.startswith(avatar_identity_prefix(self.spec.session_id))

    def _on_joined(self, identity: str, now: datetime) -> list[Command]:
        self._clock_joined(identity, now)
        if self._is_avatar(identity):
            if identity == self.avatar_identity and not self.ending:
                self.avatar.present = True
            return []
        if self.spec.participant(identity) is None:
            return []  # not one of ours (the monitor, a stale client): presence only counts the roster
        people = self.people
        people.present.add(identity)
        people.admitted.add(identity)
        if identity not in people.joined:
            people.joined.append(identity)
        if self.ending:
            return []
        if people.reconnect_by.pop(identity, None) is not None:
            self.recoveries.append(f"{identity} reconnected")
        if self.status is SessionStatus.WAITING:
            self.live_since = now
        self._refresh_status()
        return self._maybe_request_avatar(now)

    def _on_left(self, identity: str, now: datetime) -> list[Command]:
        if self._is_avatar(identity):
            if identity == self.avatar_identity:
                self.avatar.present = False
            # Only the serving avatar leaving is a loss; an earlier one leaving is its own release.
            current = self.avatar.current
            if current is not None and identity == self.avatars[current].identity and not self.ending:
                self.avatar.present = False
                return self._on_current_lost(current, "the avatar left the room", now)
            return []
        if identity not in self.people.present:
            return []
        self.people.present.discard(identity)
        if not self.ending:
            self.people.reconnect_by[identity] = now + self.spec.reconnect_grace
            self._refresh_status()
        return []

    def _participants_lost(self, now: datetime) -> list[Command]:
        people = self.people
        missed = sorted(i for i, t in people.reconnect_by.items() if now >= t)
        for identity in missed:
            del people.reconnect_by[identity]
        if not missed:
            return []
        who = ", ".join(missed)
        if self.spec.when_participant_lost is WhenLost.END:
            return self._end(EndReason.PARTICIPANT_LOST, f"{who} did not return within the reconnect grace", now)
        if not people.present and not people.reconnect_by:
            return self._end(EndReason.PARTICIPANT_LOST, f"{who} did not return and nobody is left", now)
        self.recoveries.append(f"continued without {who}")
        self._refresh_status()
        return []

    # -- the avatar ----------------------------------------------------------------------------------------

    def _avatar(self, avatar_id: str, event: Event) -> AvatarSession:
        avatar = self.avatars.get(avatar_id)
        if avatar is None:
            raise UnexpectedEvent(f"{event!r}: no such avatar session was recorded")
        return avatar

    def avatar_session_length(self, now: datetime) -> timedelta:
        """`max_session_duration` for a new avatar session: until the session's hard cap, within the plan."""
        assert self.spec.avatar is not None
        return min(self.hard_deadline - now + ROTATION_MARGIN, self.spec.avatar.max_session_duration)

    def _maybe_request_avatar(self, now: datetime) -> list[Command]:
        """The first avatar, when its start policy says so, and only into a room that exists."""
        avatar = self.spec.avatar
        if avatar is None or self.room.phase is not RoomPhase.LIVE:
            return []
        if avatar.start is AvatarStart.ON_FIRST_JOIN and not self.people.joined:
            return []
        return self._request_avatar(now)

    def _request_avatar(self, now: datetime) -> list[Command]:
        if self.avatar.requested or self.ending:
            return []
        self.avatar.requested = True
        return self._create_avatar(now)

    def _create_avatar(self, now: datetime) -> list[Command]:
        assert self.spec.avatar is not None and not self.avatar.start_in_flight
        self.avatar.starts += 1
        identity = avatar_identity_for(self.spec.session_id, self.avatar.starts)
        self.clock.avatar_asked[identity] = now
        self.clock.framed_asked[identity] = now
        if self.clock.avatar_lost_at is not None and not self.avatar.rotating_from:
            self.clock.replacing[identity] = self.clock.avatar_lost_at  # it repairs that loss
        self.avatar.creating = identity
        return [
            CreateAvatarSession(
                CreateAvatarInput(
                    session_id=self.spec.session_id,
                    room=self.spec.room_name,
                    identity=identity,
                    avatar=self.spec.avatar,
                    max_session_duration_s=int(self.avatar_session_length(now).total_seconds()),
                )
            )
        ]

    def _on_avatar_created(self, avatar_id: str, token: str, now: datetime) -> list[Command]:
        identity = self.avatar.creating
        if identity is None or avatar_id in self.avatars:
            raise UnexpectedEvent(f"avatar session {avatar_id} created, but none was being created")
        self.avatar.creating = None
        self.avatars[avatar_id] = AvatarSession(avatar_id, identity)
        # Recorded before anything can bill, so support and the reaper can always find its owner.
        commands: list[Command] = [PublishAvatarSessions(tuple(self.avatars))]
        if self.ending:
            # Never started: stop it straight away (harmless, and it can never be started later).
            self.avatars[avatar_id] = AvatarSession(avatar_id, identity, phase=AvatarPhase.STOPPING).ended(
                self._session_ended_reason()
            )
            return [*commands, StopAvatarSession(avatar_id)]
        self.avatar.incoming = avatar_id
        return [*commands, StartAvatarSession(avatar_id, token)]

    def _on_avatar_started(self, avatar_id: str, now: datetime) -> list[Command]:
        avatar = self._avatar(avatar_id, AvatarStarted(avatar_id))
        if avatar.phase is not AvatarPhase.STARTING:
            raise UnexpectedEvent(f"avatar session {avatar_id} started while {avatar.phase}")
        self.avatars[avatar_id] = avatar = replace(avatar, phase=AvatarPhase.LIVE, billed_from=now)
        if avatar.stop_wanted:
            return self._stop_avatar(avatar_id, "not wanted once started")  # its reason was set with stop_wanted
        assert self.avatar.incoming == avatar_id, "only the incoming avatar session is started and wanted"
        self.avatar.incoming = None
        previous, self.avatar.current = self.avatar.rotating_from, avatar_id
        self.avatar.rotating_from = None
        self.avatar.problem = None
        assert self.spec.avatar is not None
        self.avatar.rotate_at = now + self.spec.avatar.max_session_duration - ROTATION_MARGIN
        self.avatars[avatar_id] = replace(avatar, keepalive=True)
        commands: list[Command] = [KeepAvatarAlive(avatar_id)]
        self._refresh_status()
        if previous is not None:
            # Rotation: the new avatar took over; the old one goes.
            self.recoveries.append(f"avatar rotated from {previous} to {avatar_id} before its duration cap")
            commands += self._stop_avatar(previous, f"rotated to {avatar_id} before its duration cap")
        return commands

    def _on_avatar_start_failed(self, avatar_id: str, detail: str, now: datetime) -> list[Command]:
        avatar = self._avatar(avatar_id, AvatarStartFailed(avatar_id, detail))
        if avatar.phase is not AvatarPhase.STARTING:
            raise UnexpectedEvent(f"avatar session {avatar_id} failed to start while {avatar.phase}")
        # The start may have reached LiveAvatar before failing: stop it to be sure it does not bill.
        self.avatars[avatar_id] = replace(avatar, phase=AvatarPhase.STOPPING).ended(f"start failed: {detail}")
        commands: list[Command] = [StopAvatarSession(avatar_id)]
        if self.avatar.incoming != avatar_id:
            return commands  # no longer wanted anyway (the session is ending)
        self.avatar.incoming = None
        return commands + self._on_incoming_lost(f"the avatar did not start: {detail}", now)

    def _on_avatar_ended(self, avatar_id: str, detail: str, now: datetime) -> list[Command]:
        avatar = self._avatar(avatar_id, AvatarEnded(avatar_id, detail))
        if not avatar.keepalive:
            raise UnexpectedEvent(f"avatar session {avatar_id} reported ended with no keep-alive running")
        avatar = replace(avatar, keepalive=False)
        vendor_ended = f"ended by LiveAvatar: {detail}"
        if avatar.phase is AvatarPhase.LIVE:
            # LiveAvatar ended it before we stopped it: its billing ended then, not when our stop returns.
            avatar = replace(avatar, billed_until=now).ended(vendor_ended, AvatarEndedBy.LIVEAVATAR)
        self.avatars[avatar_id] = avatar
        if self.ending or avatar.phase is not AvatarPhase.LIVE:
            return self._stop_avatar(avatar_id, vendor_ended)  # already stopping: its reason stands
        detail = f"the avatar session ended: {detail}"
        if avatar_id == self.avatar.current:
            return self._on_current_lost(avatar_id, detail, now)
        if avatar_id == self.avatar.rotating_from:
            # The outgoing avatar ended during a rotation: the incoming one takes over once it has started.
            self.avatar.rotating_from = None
        return self._stop_avatar(avatar_id, vendor_ended)

    def _on_current_lost(self, avatar_id: str, detail: str, now: datetime) -> list[Command]:
        commands = self._stop_avatar(avatar_id, f"lost: {detail}")
        if self.avatar.rotating_from == avatar_id:
            self.avatar.rotating_from = None  # the incoming one takes over once it has started
            self.avatar.current = None
            return commands
        return commands + self._recover(detail, now)

    def _on_incoming_lost(self, detail: str, now: datetime) -> list[Command]:
        """The avatar session being started (first, replacement or rotation) did not make it."""
        if self.ending:
            return []
        if self.avatar.rotating_from is not None:
            # A rotation's new avatar failed: the current one serves on; when it ends, it is replaced.
            self.avatar.rotating_from = None
            return []
        return self._recover(detail, now)

    def _recover(self, detail: str, now: datetime) -> list[Command]:
        """The serving avatar is gone: replace it after a backoff, or follow the fallback policy."""
        plan, spec = self.avatar, self.spec.avatar
        assert spec is not None
        plan.current = None
        plan.present = False
        plan.rotate_at = None
        plan.problem = detail
        self.clock.avatar_lost_at = self.clock.avatar_lost_at or now  # a failed replacement repairs the same loss
        if plan.replacements < spec.max_replacements:
            plan.retry_at = now + spec.replace_backoff * (2**plan.replacements)
        elif spec.when_lost is WhenLost.END:
            return self._end(EndReason.AVATAR_LOST, f"the avatar could not be kept: {detail}", now)
        else:
            plan.fallback = True
            self.recoveries.append(f"continuing without the avatar: {detail}")
        self._refresh_status()
        return []

    def _stop_avatar(self, avatar_id: str, reason: str) -> list[Command]:
        """Stop one avatar session, exactly once, and never before its start has settled. `reason` is recorded
        for its billing row, unless an earlier decision already gave one."""
        self.avatars[avatar_id] = avatar = self.avatars[avatar_id].ended(reason)
        if self.avatar.current == avatar_id:
            self.avatar.current = None
            self.avatar.present = False
        if avatar.phase is AvatarPhase.STARTING:
            self.avatars[avatar_id] = replace(avatar, stop_wanted=True)
            return []
        if avatar.phase is not AvatarPhase.LIVE:
            return []  # already stopping or stopped
        self.avatars[avatar_id] = replace(avatar, phase=AvatarPhase.STOPPING)
        commands: list[Command] = [CancelKeepAlive(avatar_id)] if avatar.keepalive else []
        return [*commands, StopAvatarSession(avatar_id)]

    def _plan_rotation(self, now: datetime) -> None:
        """After an extend: a rotation skipped because the session was about to end is needed again."""
        plan, spec = self.avatar, self.spec.avatar
        current = self.avatars.get(plan.current) if plan.current else None
        if spec is None or current is None or plan.rotate_at is not None or current.billed_from is None:
            return
        plan.rotate_at = max(now, current.billed_from + spec.max_session_duration - ROTATION_MARGIN)

    def _start_replacement(self, now: datetime, *, rotation: bool) -> list[Command]:
        if rotation:
            self.avatar.rotating_from = self.avatar.current
        else:
            self.avatar.replacements += 1
            self.recoveries.append(f"avatar replacement {self.avatar.replacements} after: {self.avatar.problem}")
        return self._create_avatar(now)

    # -- recording and consent -----------------------------------------------------------------------------
    #
    #   idle -> starting -> live -> stopping -> idle   (again when everyone consents again)
    #           starting -> unavailable                (the server refused: the session goes on unrecorded)
    #
    # The room is recorded only while everyone `spec.recording.participants` names consents, the room exists
    # and the session is not ending. Every consent event is kept, for the outcome.

    def check_consent(self, identity: str) -> None:
        """Raise a typed refusal if `identity` may not give or withdraw consent now (the update's validator)."""
        if self.spec.recording is None:
            raise NotRecorded(f"session {self.spec.session_id!r} is not recorded; there is no consent to give")
        if self.ending:
            raise self._ended_refusal("consent no longer matters")
        if identity not in self.spec.recording.participants:
            raise UnknownParticipant(
                f"{identity!r} is not asked for consent to record session {self.spec.session_id!r}; "
                f"those asked are: {', '.join(self.spec.recording.participants)}"
            )

    def _wants_recording(self) -> bool:
        spec = self.spec.recording
        return (
            spec is not None
            and self.ending is None
            and self.room.phase is RoomPhase.LIVE
            and self.recording.consented >= set(spec.participants)
        )

    def _on_recording_event(self, event: Event, now: datetime) -> list[Command]:
        rec = self.recording
        match event:
            case Consent(identity, granted):
                self.check_consent(identity)
                rec.consents.append(ConsentEvent(identity=identity, granted=granted, at=now))
                if granted:
                    rec.consented.add(identity)
                else:
                    rec.consented.discard(identity)
            case RecordingBegan(egress_id):
                self._expect_recording(RecordingPhase.STARTING, event)
                rec.phase, rec.egress_id = RecordingPhase.LIVE, egress_id
                rec.egress_ids.append(egress_id)
            case RecordingStartFailed(detail):
                self._expect_recording(RecordingPhase.STARTING, event)
                rec.phase, rec.detail = RecordingPhase.UNAVAILABLE, f"recording could not start: {detail}"
                return []
            case RecordingStopped(egress_id):
                self._expect_recording(RecordingPhase.STOPPING, event)
                rec.phase, rec.egress_id = RecordingPhase.IDLE, None
            case RecordingStopFailed(egress_id, detail):
                self._expect_recording(RecordingPhase.STOPPING, event)
                rec.phase, rec.egress_id = RecordingPhase.IDLE, None
                rec.detail = f"recording {egress_id} could not be stopped: {detail}"
                # Recording on without consent is not an option: deleting the room ends every egress in it.
                return self._end(EndReason.RECORDING_NOT_STOPPED, rec.detail, now)
        return self._steer_recording()

    def _expect_recording(self, phase: RecordingPhase, event: Event) -> None:
        if self.recording.phase is not phase:
            raise UnexpectedEvent(f"{event!r} while the recording is {self.recording.phase}")

    def _steer_recording(self) -> list[Command]:
        """Start or stop the egress so that the room is recorded exactly while it is wanted."""
        rec, wanted = self.recording, self._wants_recording()
        if wanted and rec.phase is RecordingPhase.IDLE:
            rec.phase = RecordingPhase.STARTING
            return [StartRecording(StartRecordingInput(session_id=self.spec.session_id, room=self.spec.room_name))]
        if not wanted and rec.phase is RecordingPhase.LIVE:
            assert rec.egress_id is not None
            rec.phase = RecordingPhase.STOPPING
            return [StopRecording(rec.egress_id)]
        return []  # starting: steered again once the start settles; stopping: once the stop does

    def recording_report(self) -> RecordingReport | None:
        spec, rec = self.spec.recording, self.recording
        if spec is None:
            return None
        status = {
            RecordingPhase.IDLE: RecordingStatus.WAITING_FOR_CONSENT,
            RecordingPhase.STARTING: RecordingStatus.STARTING,
            RecordingPhase.LIVE: RecordingStatus.RECORDING,
            RecordingPhase.STOPPING: RecordingStatus.STOPPING,
            RecordingPhase.UNAVAILABLE: RecordingStatus.UNAVAILABLE,
        }[rec.phase]
        return RecordingReport(
            status=status,
            consented=sorted(rec.consented),
            waiting_for=[p for p in spec.participants if p not in rec.consented],
            consents=list(rec.consents),
            egress_ids=list(rec.egress_ids),
            detail=rec.detail,
        )

    # -- the room monitor ----------------------------------------------------------------------------------
    #
    # A hidden participant on the media task queue that reports what webhooks cannot: tracks, connection quality,
    # a frozen avatar, a room that vanished, and who is really in the room after a gap. Its joins and leaves
    # are the same events as the webhooks'; whichever comes first counts, the other changes nothing.

    def enable_monitor(self) -> None:
        """This session runs a room monitor once its room is live (the shell calls this behind a patch)."""
        self.room_watch.enabled = True

    def enable_avatar_media_watch(self) -> None:
        """Its monitor also watches the avatar's audio (silent) and reports first frames (behind a patch)."""
        self.room_watch.avatar_media = True

    def _start_monitor(self) -> list[Command]:
        watch, spec = self.room_watch, self.spec
        if not watch.enabled or watch.running or self.ending:
            return []
        watch.running = True
        policy = spec.quality_policy
        return [
            StartMonitor(
                MonitorInput(
                    session_id=spec.session_id,
                    workflow_id=spec.workflow_id,
                    room=spec.room_name,
                    avatar_identity_prefix=avatar_identity_prefix(spec.session_id),
                    quality_sustain_s=policy.sustain.total_seconds(),
                    avatar_frozen_after_s=policy.avatar_frozen_after.total_seconds(),
                    avatar_silent_after_s=policy.avatar_silent_after.total_seconds() if watch.avatar_media else None,
                    avatar_first_frame=watch.avatar_media,
                )
            )
        ]

    def _stop_monitor(self) -> list[Command]:
        return [CancelMonitor()] if self.room_watch.running else []

    def _stale(self, identity: str, sid: str | None, at: datetime | None, *, joined: bool) -> bool:
        """True if this join or leave is older news than what we already know about `identity`, whichever
        source told us. A connection (`sid`) joins once and leaves once; between connections, time decides."""
        watch = self.room_watch
        last = watch.heard.get(identity)
        if sid is not None:
            gone = watch.gone_sids.setdefault(identity, set())
            if not joined:
                gone.add(sid)
                if last is not None and last.joined and last.sid is not None and last.sid != sid:
                    return True  # an earlier connection of theirs going, after a newer one came in
            elif sid in gone:
                return True  # a join of a connection that has already left
            if last is not None and last.sid != sid and at is not None and at < last.at:
                return True  # older news about another connection
        elif at is not None and last is not None and at < last.at:
            return True
        if at is not None:
            watch.heard[identity] = Heard(at, sid, joined)
        return False

    def _forget_connection(self, identity: str, now: datetime) -> None:
        """They left: their connection's tracks, quality and degradation go with it (its quality time is kept)."""
        self.room_watch.connection_lost_since.pop(identity, None)  # leaving has its own rule (reconnect grace)
        self.clock.add_level_time(identity, now)
        self.clock.level.pop(identity, None)
        watch = self.room_watch
        watch.tracks.pop(identity, None)
        watch.quality.pop(identity, None)
        watch.degraded.pop(identity, None)

    def _on_monitor_event(self, event: Event, now: datetime) -> list[Command]:
        match event:
            case MonitorStopped(detail):
                self.room_watch.running = False
                if detail and not self.ending:
                    self.recoveries.append(f"room monitor stopped: {detail}")
                return []
            case _ if self._seen_before(getattr(event, "event_id", None)):
                return []
            case TrackPublished(identity, track_sid, kind):
                if self._is_ours(identity):
                    self.room_watch.tracks.setdefault(identity, {})[track_sid] = kind
                return []
            case TrackUnpublished(identity, track_sid):
                self.room_watch.tracks.get(identity, {}).pop(track_sid, None)
                return []
            case QualityChanged(identity, quality, detail):
                return self._on_quality(identity, quality, detail, now)
            case AvatarFrozen(identity, detail):
                return self._on_serving_avatar_broken(identity, f"the avatar's video froze: {detail}", now)
            case AvatarSilent(identity, detail):
                return self._on_serving_avatar_broken(identity, f"the avatar went silent: {detail}", now)
            case AvatarFirstFrame(identity, at):
                self._clock_first_frame(identity, at, now)
                return []
            case RoomLost(detail):
                return self._on_room_lost(detail, now)
            case PresenceObserved(identities, at):
                return self._on_presence(set(identities), at, now)
        raise UnexpectedEvent(f"not a monitor event: {event!r}")

    def _on_serving_avatar_broken(self, identity: str, detail: str, now: datetime) -> list[Command]:
        """The serving avatar is in the room but useless (frozen video, no sound): it is lost like any other.
        News about another avatar (an outgoing one, a replaced one) changes nothing."""
        current = self.avatar.current
        if self.ending or current is None or self.avatars[current].identity != identity:
            return []
        return self._on_current_lost(current, detail, now)

    def _clock_first_frame(self, identity: str, at: datetime | None, now: datetime) -> None:
        """An avatar's first frame in the room: the time since it was asked for, and for a replacement the time
        since the loss it repairs. `at` is when the monitor saw the frame (the signal's delivery is not counted),
        bounded by what the session knows: not before it was asked for, not after now."""
        clock = self.clock
        asked = clock.framed_asked.pop(identity, None)
        if asked is None:
            return  # told before (a retried monitor), or not an avatar this session asked for
        seen = min(max(at or now, asked), now)
        clock.avatar_first_frame_s.append(round((seen - asked).total_seconds(), 3))
        lost_at = clock.replacing.pop(identity, None)
        if lost_at is not None:
            took = (seen - lost_at).total_seconds()
            clock.avatar_replacement_s.append(round(took, 3))
            clock.avatar_lost_at = None
            clock.replacing.clear()  # any other replacement of that loss no longer repairs it
            self.recoveries.append(f"avatar replaced: {identity}'s first frame {took:.1f} s after the loss")

    def _clock_joined(self, identity: str, now: datetime) -> None:
        """Connection metrics: a person's first grant to the room; a reconnect; an avatar asked for to the room."""
        clock = self.clock
        if self._is_avatar(identity):
            asked = clock.avatar_asked.pop(identity, None)
            if asked is not None:
                clock.avatar_join_s.append(round((now - asked).total_seconds(), 3))
            return
        if self.spec.participant(identity) is None or identity in self.people.present:
            return
        granted = clock.granted_at.pop(identity, None)
        if granted is not None and identity not in clock.connect_s:
            clock.connect_s[identity] = round((now - granted).total_seconds(), 3)
        if identity in self.people.reconnect_by:
            clock.reconnects[identity] = clock.reconnects.get(identity, 0) + 1

    def _follow_candidate_connection(self, identity: str, quality: ConnectionLevel, now: datetime) -> None:
        """The policy's clock for a candidate whose connection is lost (it runs only if the spec sets it)."""
        participant = self.spec.participant(identity)
        lost_for = self.spec.quality_policy.end_when_candidate_lost_for
        since = self.room_watch.connection_lost_since
        candidate = participant is not None and participant.role is Role.CANDIDATE
        if quality is not ConnectionLevel.LOST or lost_for is None or not candidate:
            since.pop(identity, None)
        else:
            since.setdefault(identity, now)

    def _connection_deadlines(self) -> list[Deadline]:
        lost_for = self.spec.quality_policy.end_when_candidate_lost_for
        if lost_for is None:
            return []
        lost = sorted(self.room_watch.connection_lost_since.items())
        return [Deadline(at + lost_for, f"connection lost: {who}") for who, at in lost]

    def _connections_lost(self, now: datetime) -> list[Command]:
        lost_for = self.spec.quality_policy.end_when_candidate_lost_for
        if lost_for is None:
            return []
        gone = sorted(who for who, at in self.room_watch.connection_lost_since.items() if now >= at + lost_for)
        if not gone:
            return []
        return self._end(
            EndReason.PARTICIPANT_LOST, f"{', '.join(gone)}'s connection stayed lost for {_seconds(lost_for)}", now
        )

    def _is_ours(self, identity: str) -> bool:
        return self.spec.participant(identity) is not None or self._is_avatar(identity)

    def _on_quality(self, identity: str, quality: ConnectionLevel, detail: str | None, now: datetime) -> list[Command]:
        """A human's sustained quality: a level the policy names degrades the session (who, why); better clears it."""
        watch = self.room_watch
        if self.ending or self.spec.participant(identity) is None or quality is ConnectionLevel.UNKNOWN:
            return []
        watch.quality[identity] = quality
        self._follow_candidate_connection(identity, quality, now)
        self.clock.add_level_time(identity, now)
        self.clock.level[identity] = (quality, now)
        if quality in self.spec.quality_policy.degrade_on and identity in self.people.present:
            if identity not in watch.degraded or watch.degraded[identity].quality is not quality:
                watch.degraded[identity] = Degradation(identity=identity, quality=quality, since=now, detail=detail)
        elif watch.degraded.pop(identity, None) is not None:
            self.recoveries.append(f"{identity}'s connection recovered ({quality.value})")
        self._refresh_status()
        return []

    def _on_room_lost(self, detail: str, now: datetime) -> list[Command]:
        """The room is gone while the session is live: re-create it, start a fresh avatar into it, and give
        everyone who was in it their reconnect grace (they rejoin with a fresh grant, or are lost as usual)."""
        watch, people = self.room_watch, self.people
        if self.ending or self.room.phase is not RoomPhase.LIVE:
            return []
        watch.lost_at = now
        self.room = Room(RoomPhase.CREATING)
        self.recoveries.append(f"room lost at {now:%H:%M:%S} UTC ({detail}): re-creating it")
        for identity in sorted(people.present):
            people.reconnect_by[identity] = now + self.spec.reconnect_grace
            self._forget_connection(identity, now)
        people.present.clear()
        commands: list[Command] = []
        current = self.avatar.current
        if current is not None:
            commands += self._stop_avatar(current, "lost: its room vanished (LiveKit restarted)")
            watch.avatar_after_room = True
            self.clock.avatar_lost_at = self.clock.avatar_lost_at or now
        self._refresh_status()
        return [*commands, CreateRoom(self._room_request())]

    def _on_room_recreated(self, room: Room, now: datetime) -> list[Command]:
        watch = self.room_watch
        assert watch.lost_at is not None
        self.room = Room(RoomPhase.LIVE)
        took = (now - watch.lost_at).total_seconds()
        watch.lost_at = None
        if room.delete_wanted or self.ending:
            return self._delete_room()
        self.recoveries.append(f"room re-created {took:.1f} s after it was lost")
        self.clock.room_recovery_s.append(round(took, 3))
        commands: list[Command] = []
        if watch.avatar_after_room and not self.avatar.start_in_flight and not self.avatar.fallback:
            watch.avatar_after_room = False
            commands += self._create_avatar(now)
        self._refresh_status()
        return commands

    def _on_presence(self, identities: set[str], at: datetime | None, now: datetime) -> list[Command]:
        """Reconcile with who is really in the room: whoever left or came unseen (a gap) is caught up."""
        if self.ending:
            return []
        commands: list[Command] = []
        for identity in sorted(self.people.present - identities):
            if not self._stale(identity, None, at, joined=False):
                self._forget_connection(identity, now)
                commands += self._on_left(identity, now)
        for identity in sorted(identities - self.people.present):
            if self.spec.participant(identity) is not None and not self._stale(identity, None, at, joined=True):
                commands += self._on_joined(identity, now)
        serving = self.avatar_identity if self.avatar.current else None
        if serving is not None and serving in identities:
            self.avatar.present = True
        elif serving is not None and self.avatar.present:
            commands += self._on_left(serving, now)
        return commands

    # -- timers --------------------------------------------------------------------------------------------

    def _on_timer(self, now: datetime) -> list[Command]:
        if self.ending:
            return []
        if now >= self.deadline:
            return self._end(EndReason.MAX_DURATION, None, now)
        if not self.people.joined and now >= self.no_show_deadline:
            return self._end(EndReason.NO_SHOW, "nobody joined before the no-show timeout", now)
        commands = self._participants_lost(now) + self._connections_lost(now)
        if self.ending:
            return commands
        plan = self.avatar
        if plan.retry_at is not None and now >= plan.retry_at:
            plan.retry_at = None
            commands += self._start_replacement(now, rotation=False)
        if plan.rotate_at is not None and now >= plan.rotate_at:
            plan.rotate_at = None
            # Only if the session will outlive the current avatar session.
            if self.deadline > now + ROTATION_MARGIN and not plan.start_in_flight:
                commands += self._start_replacement(now, rotation=True)
        return commands

    # -- status and the end --------------------------------------------------------------------------------

    def _refresh_status(self) -> None:
        """LIVE once someone joined; DEGRADED while the avatar is lost or someone is reconnecting."""
        if self.ending or not self.people.joined or self.status is SessionStatus.PROVISIONING:
            return  # nobody in the room yet, or no room yet
        plan = self.avatar
        avatar_down = (
            self.spec.avatar is not None
            and plan.requested
            and (plan.fallback or plan.retry_at is not None or (plan.current is None and plan.problem is not None))
        )
        troubled = avatar_down or self.people.reconnect_by or self.room_watch.troubled
        self.status = SessionStatus.DEGRADED if troubled else SessionStatus.LIVE

    def _end(self, reason: EndReason, detail: str | None, now: datetime) -> list[Command]:
        if self.ending:
            return []
        self.ending = Ending(reason, detail, now)
        self.status = SessionStatus.ENDING
        self.avatar.retry_at = self.avatar.rotate_at = None
        self.avatar.incoming = None  # an avatar still starting is stopped once its start settles
        self.people.reconnect_by.clear()
        return self._steer_recording() + self._release_all()

    def _release_all(self) -> list[Command]:
        stops: list[Command] = self._stop_monitor()  # it leaves the room before the room is deleted
        for avatar_id in list(self.avatars):
            stops += self._stop_avatar(avatar_id, self._session_ended_reason())
        # Every keep-alive is told to stop before any stop goes out.
        cancels = [c for c in stops if isinstance(c, CancelKeepAlive | CancelMonitor)]
        return cancels + [c for c in stops if not isinstance(c, CancelKeepAlive | CancelMonitor)] + self._delete_room()

    def _session_ended_reason(self) -> str:
        assert self.ending is not None
        return f"session ended: {self.ending.reason.value}"

    def _maybe_close(self, now: datetime) -> list[Command]:
        if not self.ending or self.released:
            return []
        # Nothing may still be on its way into existence: a create in flight would land after we are gone.
        if self.avatar.creating is not None:
            return []
        if self.room.phase not in (RoomPhase.NONE, RoomPhase.GONE):
            return []
        if self.recording.phase in (RecordingPhase.STARTING, RecordingPhase.STOPPING):
            return []  # an egress on its way up or down: its answer must find the session
        if any(a.phase is not AvatarPhase.STOPPED for a in self.avatars.values()):
            return []
        self.status = SessionStatus.FAILED if self.ending.reason is EndReason.FAILED else SessionStatus.ENDED
        self.avatar.present = False
        self.ended_at = now
        return []

    # -- what support searches by -------------------------------------------------------------------------

    def _publish_status(self) -> PublishStatus:
        """The status upsert, with everything published beside it (see `PublishStatus`)."""
        self.ever_degraded = self.ever_degraded or self.status is SessionStatus.DEGRADED
        return PublishStatus(
            self.status,
            ever_degraded=self.ever_degraded,
            end_reason=self.end_reason,
            avatar_billed_seconds=round(float(self.avatar_seconds), 3),
        )

    # -- what the outside reads ----------------------------------------------------------------------------

    def state(self) -> SessionState:
        plan, people = self.avatar, self.people
        return SessionState(
            session_id=self.spec.session_id,
            kind=self.spec.kind,
            status=self.status,
            room=self.spec.room_name,
            started_at=self.started_at,
            ends_at=self.deadline,
            present=sorted(people.present),
            admitted=sorted(people.admitted),
            avatar_session_id=self.avatar_session_id,
            avatar_identity=self.avatar_identity,
            avatar_present=plan.present,
            avatar_fallback=plan.fallback,
            reconnecting=sorted(people.reconnect_by),
            recoveries=list(self.recoveries),
            end_reason=self.end_reason,
            end_detail=(self.ending.detail if self.ending else None) or plan.problem,
            avatar_billing=self.avatar_billing(),
            recording=self.recording_report(),
            degraded=list(self.room_watch.degraded.values()),
            quality=dict(sorted(self.room_watch.quality.items())),
            tracks={who: sorted(t.values()) for who, t in sorted(self.room_watch.tracks.items()) if t},
            monitored=self.room_watch.running,
            handoff=self.clock.report(self.clock.last_now),
        )

    def outcome(self) -> SessionOutcome:
        assert self.ending is not None and self.ended_at is not None, "the outcome exists once the session has closed"
        return SessionOutcome(
            session_id=self.spec.session_id,
            status=self.status,
            end_reason=self.ending.reason,
            end_detail=self.ending.detail,
            started_at=self.started_at,
            ended_at=self.ended_at,
            live_seconds=self.live_seconds,
            avatar_sessions=list(self.avatars),
            avatar_seconds=self.avatar_seconds,
            avatar_fallback=self.avatar.fallback,
            recoveries=list(self.recoveries),
            participants_joined=list(self.people.joined),
            avatar_billing=self.avatar_billing(),
            recording=self.recording_report(),
            handoff=self.clock.report(self.ending.decided_at),
        )


def _seconds(d: timedelta) -> str:
    return f"{int(d.total_seconds())} s"
