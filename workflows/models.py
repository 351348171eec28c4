"""The session's data: what a backend sends in, what the workflow hands back.

Everything here is validated strictly at the edge (extra fields forbidden, identities and session ids to a
strict charset and length), so bad input is rejected with a clear error before any workflow or room exists.
These models travel through Temporal with the pydantic data converter; they import nothing of ours.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_validator,
)

# session ids become workflow ids and LiveKit room names (`session-<id>`): keep them short and URL-safe.
SessionId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{2,63}$")]
# identities become LiveKit participant identities and show in the UI: no spaces, no personal data by design.
Identity = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
DisplayName = Annotated[str, StringConstraints(min_length=1, max_length=128)]

ROOM_PREFIX = "session-"
# A deployment's name (settings `SESSIONFLOW_DEPLOYMENT`): no '-', so one deployment's prefix never starts another's.
Deployment = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]{1,20}$")]
MAX_METADATA_BYTES = 4096
# The lowest history length at which a session may be told to continue as new (starter setting
# `continue_as_new_after_events`): a new run's own first events must never be enough to make it continue again.
CONTINUE_AS_NEW_MIN_EVENTS = 32
# Identities the engine itself uses in a room; a human participant may not take them.
RESERVED_IDENTITY_PREFIXES = ("avatar-", "monitor-")


def deployment_prefix(deployment: str) -> str:
    """Every workflow id and room name of `deployment` starts with this, and nothing of another's does."""
    return f"{ROOM_PREFIX}{deployment}-"


def workflow_id_for(session_id: str, deployment: str | None = None) -> str:
    """The workflow id, which is also the LiveKit room name: every resource we create carries it.

    `session-<deployment>-<id>`; without a deployment the older `session-<id>` (sessions started before
    deployments existed keep their names, and their histories replay unchanged)."""
    return f"{deployment_prefix(deployment)}{session_id}" if deployment else f"{ROOM_PREFIX}{session_id}"


def session_id_of(workflow_id: str, deployment: str) -> str:
    """The session id in `workflow_id` (`session-<deployment>-<id>`, or the older `session-<id>`)."""
    prefix = deployment_prefix(deployment)
    return workflow_id.removeprefix(prefix) if workflow_id.startswith(prefix) else workflow_id.removeprefix(ROOM_PREFIX)


def avatar_identity_for(session_id: str, n: int) -> str:
    """The LiveKit identity of the session's n-th avatar session. Each avatar session has its own, so one
    leaving the room is never mistaken for another (a replacement or rotation overlaps its predecessor)."""
    return f"{avatar_identity_prefix(session_id)}{n}"


def avatar_identity_prefix(session_id: str) -> str:
    """Every avatar identity of the session starts with this."""
    return f"avatar-{session_id}-"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StrictInput(Strict):
    """A model a caller sends in (HTTP API, CLI, Python client): no coercion at all, so `"3"` is not 3 and `true`
    is not a number. Enums take their values and durations have their own rule (`Duration`); the data converter
    validates workflow payloads in JSON mode, where both read what every earlier release wrote."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


_ISO_DURATION = TypeAdapter(timedelta, config=ConfigDict(strict=True))


def _duration(value: Any) -> Any:
    """A duration is a timedelta, a whole number of seconds, or an ISO 8601 duration string ("PT45M", what
    pydantic writes and every recorded history holds). Never a bool, a float or a number in a string."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("a duration is a whole number of seconds or an ISO 8601 duration such as \"PT45M\"")
    if isinstance(value, int):
        try:
            return timedelta(seconds=value)
        except OverflowError:
            raise ValueError(f"{value} seconds is out of range") from None
    return _ISO_DURATION.validate_json(json.dumps(value))


# The one duration type of the input models (see `_duration`); `strict=False` lets the already-parsed value through.
Duration = Annotated[
    timedelta,
    BeforeValidator(_duration),
    Field(strict=False),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "format": "duration"}, {"type": "integer"}],
            "description": 'an ISO 8601 duration ("PT45M") or a whole number of seconds',
        }
    ),
]


class SessionKind(StrEnum):
    INTERVIEW = "interview"
    COACHING = "coaching"


class Role(StrEnum):
    CANDIDATE = "candidate"
    COACH = "coach"
    INTERVIEWER = "interviewer"
    OBSERVER = "observer"


class SessionStatus(StrEnum):
    PROVISIONING = "provisioning"
    WAITING = "waiting"
    LIVE = "live"
    DEGRADED = "degraded"
    ENDING = "ending"
    ENDED = "ended"
    FAILED = "failed"


class EndReason(StrEnum):
    REQUESTED = "requested"  # the `end` update
    MAX_DURATION = "max_duration"
    NO_SHOW = "no_show"
    ROOM_CLOSED = "room_closed"  # LiveKit closed the room on its own (everyone left, or it was deleted)
    AVATAR_LOST = "avatar_lost"  # the avatar could not be kept or replaced, and the policy says end
    PARTICIPANT_LOST = "participant_lost"  # someone dropped and did not return within the grace window
    CANCELLED = "cancelled"
    FAILED = "failed"
    # Consent was withdrawn but the recording could not be stopped: the room is closed to stop it.
    RECORDING_NOT_STOPPED = "recording_not_stopped"


class Participant(StrictInput):
    identity: Identity
    role: Annotated[Role, Field(strict=False)]
    name: DisplayName | None = None

    @field_validator("identity")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v.startswith(RESERVED_IDENTITY_PREFIXES):
            raise ValueError(f"identity {v!r} uses a prefix reserved for the engine ({', '.join(RESERVED_IDENTITY_PREFIXES)})")
        return v


class ConnectionLevel(StrEnum):
    """LiveKit's connection quality of one participant, as the monitor receives it."""

    EXCELLENT = "excellent"
    GOOD = "good"
    POOR = "poor"
    LOST = "lost"
    UNKNOWN = "unknown"


class AvatarStart(StrEnum):
    ON_FIRST_JOIN = "on_first_join"  # saves credits: nobody to talk to, nothing billed
    IMMEDIATELY = "immediately"


class WhenLost(StrEnum):
    CONTINUE = "continue"  # go on without it (the avatar) / with who is left (participants)
    END = "end"  # end the session


class AvatarSpec(StrictInput):
    avatar_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    is_sandbox: bool = False
    start: Annotated[AvatarStart, Field(strict=False)] = AvatarStart.ON_FIRST_JOIN
    # A lost avatar (it left the room, its session ended, or it failed to start) is replaced this many times,
    # waiting replace_backoff, then twice that, ...; after that the session follows `when_lost`.
    max_replacements: Annotated[int, Field(ge=0, le=10)] = 2
    replace_backoff: Annotated[Duration, Field(ge=timedelta(0), le=timedelta(minutes=5))] = timedelta(seconds=2)
    when_lost: Annotated[WhenLost, Field(strict=False)] = WhenLost.CONTINUE
    # Your LiveAvatar plan's cap on one avatar session. A session longer than this gets a fresh avatar
    # session shortly before the cap, so the avatar never stops mid-sentence.
    max_session_duration: Annotated[Duration, Field(ge=timedelta(minutes=2), le=timedelta(hours=8))] = timedelta(hours=1)


class RecordingSpec(StrictInput):
    """Record the session (a LiveKit room composite egress), but only while every one of `participants` has
    consented (the `consent` update): it starts once the last of them grants, and stops when any withdraws."""

    participants: Annotated[list[Identity], Field(min_length=1, max_length=50)]


class QualityPolicy(StrictInput):
    """What a human participant's connection quality means for the session (the room monitor measures it)."""

    # A level must hold this long before it counts (a blip is not a problem).
    sustain: Annotated[Duration, Field(ge=timedelta(0), le=timedelta(minutes=5))] = timedelta(seconds=5)
    # These levels mark the session degraded, naming who and why; a better level clears it.
    degrade_on: Annotated[list[ConnectionLevel], Field(max_length=4)] = [ConnectionLevel.POOR, ConnectionLevel.LOST]
    # The avatar's video published but no frame for this long: the avatar is replaced (its usual recovery).
    avatar_frozen_after: Annotated[Duration, Field(ge=timedelta(seconds=2), le=timedelta(minutes=5))] = timedelta(seconds=6)
    # The avatar's audio carried no packets (a stalled or muted track), or it published no audio track, for this
    # long: the avatar is replaced. A quiet avatar that listens still sends a few packets a second (Opus DTX).
    avatar_silent_after: Annotated[Duration, Field(ge=timedelta(seconds=2), le=timedelta(minutes=5))] = timedelta(seconds=8)
    # A candidate whose connection stays lost this long ends the session (reason participant_lost); None: never.
    end_when_candidate_lost_for: Annotated[Duration, Field(ge=timedelta(seconds=5), le=timedelta(hours=1))] | None = None


# Per session kind when the spec names no policy: an interview degrades on poor quality, coaching only on lost.
DEFAULT_QUALITY: dict[SessionKind, QualityPolicy] = {
    SessionKind.INTERVIEW: QualityPolicy(),
    SessionKind.COACHING: QualityPolicy(sustain=timedelta(seconds=10), degrade_on=[ConnectionLevel.LOST]),
}


class SessionSpec(StrictInput):
    """Everything a session needs to know, fixed when it starts."""

    session_id: SessionId
    kind: Annotated[SessionKind, Field(strict=False)]
    # Set by SessionClient from its settings (a caller may leave it out); None only in sessions started before
    # deployments existed, whose rooms keep the older names.
    deployment: Deployment | None = None
    participants: Annotated[list[Participant], Field(min_length=1, max_length=50)]
    avatar: AvatarSpec | None = None
    max_duration: Annotated[Duration, Field(ge=timedelta(seconds=30), le=timedelta(hours=8))] = timedelta(hours=1)
    # `extend` may push the end out to at most this long after the start.
    max_duration_cap: Annotated[Duration, Field(ge=timedelta(seconds=30), le=timedelta(hours=12))] = timedelta(hours=2)
    no_show_timeout: Annotated[Duration, Field(ge=timedelta(seconds=5), le=timedelta(hours=1))] = timedelta(minutes=10)
    max_participants: Annotated[int, Field(ge=1, le=50)] | None = None
    # A participant who drops may rejoin (with a new `join`) within this window; after it, `when_participant_lost`
    # applies: END ends the session, CONTINUE goes on with who is left (and ends once nobody is left).
    reconnect_grace: Annotated[Duration, Field(ge=timedelta(0), le=timedelta(minutes=30))] = timedelta(seconds=60)
    when_participant_lost: Annotated[WhenLost, Field(strict=False)] = WhenLost.CONTINUE
    metadata: dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=1024)]] = {}
    # None: the session is never recorded (and `consent` is refused).
    recording: RecordingSpec | None = None
    quality: QualityPolicy | None = None  # None: the default of the session's kind (DEFAULT_QUALITY)

    @model_validator(mode="after")
    def _consistent(self) -> SessionSpec:
        identities = [p.identity for p in self.participants]
        dupes = sorted({i for i in identities if identities.count(i) > 1})
        if dupes:
            raise ValueError(f"participant identities must be unique; repeated: {', '.join(dupes)}")
        if self.recording is not None:
            asked = self.recording.participants
            strangers = sorted(set(asked) - set(identities))
            if strangers:
                raise ValueError(f"recording asks consent of identities not on the roster: {', '.join(strangers)}")
            if len(set(asked)) != len(asked):
                raise ValueError("recording.participants must be unique")
        if self.max_duration_cap < self.max_duration:
            raise ValueError("max_duration_cap must be at least max_duration")
        size = len(json.dumps(self.metadata, separators=(",", ":")).encode())
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
        return self

    @property
    def workflow_id(self) -> str:
        return workflow_id_for(self.session_id, self.deployment)

    @property
    def room_name(self) -> str:
        return workflow_id_for(self.session_id, self.deployment)

    @property
    def room_capacity(self) -> int:
        return self.max_participants or len(self.participants)

    def participant(self, identity: str) -> Participant | None:
        return next((p for p in self.participants if p.identity == identity), None)

    @property
    def quality_policy(self) -> QualityPolicy:
        return self.quality or DEFAULT_QUALITY[self.kind]


class JoinRequest(StrictInput):
    identity: Identity
    # The spec the caller started (or meant to start) the session with. A join carrying a spec that differs from
    # the running session's is refused (`SpecChanged`) instead of silently joining a session set up otherwise.
    # None: the caller only joins a running session (`join_running`), and every join recorded before this field.
    spec: SessionSpec | None = None


class JoinGrant(Strict):
    """What a participant needs to connect: hand `url` and `token` to the LiveKit client SDK."""

    url: str
    room: str
    identity: str
    role: Role
    token: str
    expires_at: datetime


class EndRequest(StrictInput):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=200)] = "ended by request"


class ExtendRequest(StrictInput):
    by: Annotated[Duration, Field(gt=timedelta(0), le=timedelta(hours=4))]


class ConsentRequest(StrictInput):
    """A participant grants (`granted`) or withdraws consent to record the session."""

    identity: Identity
    granted: StrictBool


class RoomEventKind(StrEnum):
    PARTICIPANT_JOINED = "participant_joined"
    PARTICIPANT_LEFT = "participant_left"
    ROOM_FINISHED = "room_finished"
    # From the room monitor only (webhooks carry no quality, frames or presence).
    TRACK_PUBLISHED = "track_published"
    TRACK_UNPUBLISHED = "track_unpublished"
    QUALITY_CHANGED = "quality_changed"  # a level that outlasted the monitor's debounce window
    AVATAR_FROZEN = "avatar_frozen"  # the avatar's video is published but no frame came for a while
    AVATAR_SILENT = "avatar_silent"  # the avatar's audio carried no packets (or was not published) for a while
    AVATAR_FIRST_FRAME = "avatar_first_frame"  # the first video frame of an avatar reached the room (`at`: when)
    ROOM_LOST = "room_lost"  # the room vanished without a webhook (LiveKit restarted)
    PRESENCE = "presence"  # who is really in the room, after any gap in what the monitor saw


class RoomEventSource(StrEnum):
    WEBHOOK = "webhook"
    MONITOR = "monitor"


EventText = Annotated[str, StringConstraints(max_length=200)]


class RoomEvent(Strict):
    """A room happening, from the LiveKit webhook receiver or the room monitor: one stream, deduplicated by id.

    `sid` (the participant's connection) and `at` (when it happened) let the session ignore an event that
    arrives after a later one about the same person (a webhook retried after the monitor saw them leave)."""

    event_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    kind: RoomEventKind
    identity: str | None = None
    source: RoomEventSource = RoomEventSource.WEBHOOK
    sid: Annotated[str, StringConstraints(max_length=64)] | None = None
    at: datetime | None = None
    track_sid: Annotated[str, StringConstraints(max_length=64)] | None = None
    track_kind: Annotated[str, StringConstraints(max_length=16)] | None = None
    quality: ConnectionLevel | None = None
    detail: EventText | None = None
    present: Annotated[list[str], Field(max_length=200)] | None = None  # PRESENCE: every identity in the room


# ---- activity inputs and outputs -------------------------------------------------------------------------


class CreateRoomInput(Strict):
    room: str
    workflow_id: str
    session_kind: SessionKind
    max_participants: int
    empty_timeout_s: int
    departure_timeout_s: int


class MintTokenInput(Strict):
    room: str
    identity: str
    name: str | None = None
    role: Role | None = None  # None: the avatar (agent kind, publish + data)
    ttl: timedelta


class CreateAvatarInput(Strict):
    session_id: str
    room: str
    identity: str
    avatar: AvatarSpec
    max_session_duration_s: int


class AvatarCreated(Strict):
    avatar_session_id: str
    session_token: str


class StartAvatarInput(Strict):
    avatar_session_id: str
    session_token: str


class AvatarRef(Strict):
    avatar_session_id: str


class Released(Strict):
    """What a cleanup activity released, as its result reads in the Temporal UI (instead of a bare `null`)."""

    resource: Literal["room", "avatar session"]
    id: str


class StartRecordingInput(Strict):
    session_id: str
    room: str


class RecordingStarted(Strict):
    egress_id: str


def monitor_identity_for(session_id: str) -> str:
    """The room monitor's identity: one per session, so a retried monitor replaces a leftover one."""
    return f"monitor-{session_id}"


class MonitorInput(Strict):
    """What the room monitor needs: which room, whose workflow to tell, what counts as a change."""

    session_id: str
    workflow_id: str
    room: str
    avatar_identity_prefix: str
    quality_sustain_s: float
    avatar_frozen_after_s: float
    # Defaults: what a monitor of a session started before these existed was asked (no audio watch, no first frame).
    avatar_silent_after_s: float | None = None  # None: the avatar's audio is not watched
    avatar_first_frame: bool = False  # report each avatar's first video frame (AVATAR_FIRST_FRAME)


# ---- what the outside reads ------------------------------------------------------------------------------


class AvatarEndedBy(StrEnum):
    SESSIONFLOW = "sessionflow"  # the session stopped it (its end, a loss, a rotation, a failed start)
    LIVEAVATAR = "liveavatar"  # LiveAvatar ended it first (the keep-alive saw it end)


class AvatarBilling(BaseModel):
    """One LiveAvatar session of a session, as it bills: what support reconciles against the invoice."""

    # Read by backends that may run an older or newer release than the worker: tolerate fields they do not know.
    model_config = ConfigDict(extra="ignore")

    avatar_session_id: str
    identity: str  # its LiveKit identity in the room
    started_at: datetime | None  # billing started (None: it never started, nothing was billed)
    ended_at: datetime | None  # billing ended (None: still billing, or it never started)
    seconds: float  # billed, from started_at to ended_at (0 until it has ended)
    end_reason: str | None  # why it was stopped or ended (None while it serves)
    ended_by: AvatarEndedBy | None


class RecordingStatus(StrEnum):
    WAITING_FOR_CONSENT = "waiting_for_consent"  # not recording: someone has not consented (or withdrew)
    STARTING = "starting"
    RECORDING = "recording"
    STOPPING = "stopping"
    UNAVAILABLE = "unavailable"  # the server refused or could not start it: the session goes on unrecorded


class ConsentEvent(BaseModel):
    """One `consent` update, as the session took it."""

    model_config = ConfigDict(extra="ignore")

    identity: str
    granted: bool
    at: datetime


class RecordingReport(BaseModel):
    """The session's recording: where it stands, every consent given or withdrawn, every egress started."""

    model_config = ConfigDict(extra="ignore")

    status: RecordingStatus
    consented: list[str]  # who consents now
    waiting_for: list[str]  # whose consent is still missing
    consents: list[ConsentEvent]
    egress_ids: list[str]
    detail: str | None  # why it is unavailable, or why a stop failed


class Degradation(BaseModel):
    """Why the session is degraded because of one participant's connection (from the room monitor)."""

    model_config = ConfigDict(extra="ignore")

    identity: str
    quality: ConnectionLevel
    since: datetime
    detail: str | None = None


class ParticipantHandoff(BaseModel):
    """How one participant's connection went (what a hand-off to support or a backend needs)."""

    model_config = ConfigDict(extra="ignore")

    connect_s: float | None = None  # their first grant issued, to them in the room
    reconnects: int = 0
    quality_s: dict[ConnectionLevel, float] = Field(default_factory=dict)  # seconds at each sustained level


class Handoff(BaseModel):
    """The session's connection metrics."""

    model_config = ConfigDict(extra="ignore")

    participants: dict[str, ParticipantHandoff] = Field(default_factory=dict)
    avatar_join_s: list[float] = Field(default_factory=list)  # each avatar session: asked for, to in the room
    # Each avatar session: asked for, to its first video frame seen in the room (by the room monitor).
    avatar_first_frame_s: list[float] = Field(default_factory=list)
    # Each replacement: the avatar lost (left, ended, frozen, silent, its room gone), to the replacement's first frame.
    avatar_replacement_s: list[float] = Field(default_factory=list)
    room_recovery_s: list[float] = Field(default_factory=list)  # each lost room: lost, to re-created


class SessionState(BaseModel):
    """The `state` query: what support sees when they ask "what is this session doing?"."""

    # Read by backends that may run an older or newer release than the worker: tolerate fields they do not know.
    model_config = ConfigDict(extra="ignore")

    session_id: str
    kind: SessionKind
    status: SessionStatus
    room: str
    started_at: datetime
    ends_at: datetime
    present: list[str]
    admitted: list[str]
    avatar_session_id: str | None
    avatar_identity: str | None  # the LiveKit identity of that avatar in the room
    avatar_present: bool
    avatar_fallback: bool  # the avatar could not be kept: the session goes on without it
    reconnecting: list[str]  # dropped participants still within their reconnect grace
    recoveries: list[str]
    end_reason: EndReason | None
    end_detail: str | None
    # Every avatar session so far. A default, so a state from a worker that predates it still parses.
    avatar_billing: list[AvatarBilling] = Field(default_factory=list)
    # None: the session is not recorded. A default, so a state from a worker that predates it still parses.
    recording: RecordingReport | None = None
    # From the room monitor (defaults, so a state from a worker that predates it still parses).
    degraded: list[Degradation] = Field(default_factory=list)  # who makes the session degraded, and why
    quality: dict[str, ConnectionLevel] = Field(default_factory=dict)  # last sustained level per participant
    tracks: dict[str, list[str]] = Field(default_factory=dict)  # published track kinds per participant
    monitored: bool = False  # a room monitor is running for this session
    handoff: Handoff = Field(default_factory=Handoff)


class SessionOutcome(BaseModel):
    """The workflow result."""

    # Read by backends that may run an older or newer release than the worker: tolerate fields they do not know.
    model_config = ConfigDict(extra="ignore")

    session_id: str
    status: SessionStatus
    end_reason: EndReason
    end_detail: str | None
    started_at: datetime
    ended_at: datetime
    live_seconds: float
    avatar_sessions: list[str]
    avatar_seconds: float  # the sum of avatar_billing's seconds
    avatar_fallback: bool
    recoveries: list[str]
    participants_joined: list[str]
    # One row per avatar session. A default, so outcomes recorded before it existed (memos, results) still parse.
    avatar_billing: list[AvatarBilling] = Field(default_factory=list)
    # The recording and every consent event (None: not recorded). A default, for outcomes recorded before it.
    recording: RecordingReport | None = None
    handoff: Handoff = Field(default_factory=Handoff)  # connection metrics (default: outcomes recorded before)
