"""What support reads about sessions: one session told in full (`sessionflow show`), and sessions found by
status and kind (`sessionflow list`).

Reading and rendering are apart: `read_session` and `find_sessions` ask Temporal, `render_session` and
`render_sessions` turn what they found into text (pure, so the CLI prints it and tests read it). Closed and
running sessions read alike: a running one answers the `state` query, a closed one its recorded outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import TypeVar

from pydantic import TypeAdapter, ValidationError
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from starters.client import InvalidInput, SessionClient, SessionEnded, SessionNotFound
from starters.text import table
from starters.timeline import Moment, render, session_histories, timeline
from workers.codec import decode_history
from workflows.models import ROOM_PREFIX, AvatarBilling, EndReason, Handoff, Identity, SessionKind, SessionStatus
from workflows.search_attributes import (
    AVATAR_SESSION_ID,
    PARTICIPANT_IDS,
    SESSION_DEGRADED,
    SESSION_END_REASON,
    SESSION_ID,
    SESSION_KIND,
    SESSION_STATUS,
    participant_id,
)

MAX_LIST_LIMIT = 1000

# ---- one session ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionReport:
    """One session as support reads it, running or closed."""

    session_id: str
    kind: str | None
    workflow_status: str  # Temporal's: RUNNING, COMPLETED, FAILED, CANCELED, TERMINATED, TIMED_OUT
    status: str | None  # the session's own (SessionStatus), as last recorded
    started_at: datetime | None
    ended_at: datetime | None  # closed sessions
    moments: list[Moment]
    ui_url: str
    ends_at: datetime | None = None  # running sessions: the current deadline
    end_reason: str | None = None
    end_detail: str | None = None
    recoveries: list[str] = field(default_factory=list)
    billing: list[AvatarBilling] = field(default_factory=list)
    billing_note: str | None = None  # why the billing rows are missing, when they are
    handoff: Handoff | None = None  # connection metrics (None: a closed session with no outcome)
    read_at: datetime = field(default_factory=lambda: datetime.now(UTC))


async def read_session(sessions: SessionClient, session_id: str) -> SessionReport:
    """Everything `sessionflow show` prints about `session_id`. `InvalidInput` for a malformed id,
    `SessionNotFound` when there is no such session."""
    handle = sessions.handle(session_id)  # validates the id (InvalidInput)
    try:
        desc = await handle.describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise SessionNotFound(
                f"no session {session_id!r} in namespace {sessions.settings.temporal_namespace}: "
                "it was never started (or has been deleted)"
            ) from None
        raise
    attributes = desc.typed_search_attributes
    converter = sessions.client.data_converter  # payloads are encrypted in history (workers/codec.py)
    report = SessionReport(
        session_id=session_id,
        kind=attributes.get(SESSION_KIND),
        workflow_status=desc.status.name if desc.status else "UNKNOWN",
        status=attributes.get(SESSION_STATUS),
        started_at=desc.start_time,
        ended_at=desc.close_time,
        # Every run of the session, first to last: a long session continues as new, its story does not restart.
        moments=timeline(
            [await decode_history(h, converter.payload_codec) for h in await session_histories(sessions.client, handle.id)],
            converter,
        ),
        ui_url=sessions.ui_url(session_id),
    )
    if desc.status is WorkflowExecutionStatus.RUNNING:
        state = await sessions.state(session_id)
        return replace(
            report,
            status=state.status.value,
            started_at=state.started_at,
            ends_at=state.ends_at,
            end_reason=state.end_reason.value if state.end_reason else None,
            end_detail=state.end_detail,
            recoveries=state.recoveries,
            billing=state.avatar_billing,
            handoff=state.handoff,
        )
    try:
        outcome = await sessions.recorded_outcome(session_id)
    except SessionEnded as e:
        # Terminated (or closed before outcomes were recorded): the search attribute still names every avatar
        # session it started, for the reaper and for support.
        avatars = attributes.get(AVATAR_SESSION_ID) or []
        return replace(report, billing_note=f"{e}; avatar sessions it recorded: {', '.join(avatars) or 'none'}")
    note = None
    if outcome.avatar_sessions and not outcome.avatar_billing:
        note = (
            f"recorded before billing rows existed; avatar sessions: {', '.join(outcome.avatar_sessions)} "
            f"({outcome.avatar_seconds:.1f} s billed in all)"
        )
    return replace(
        report,
        status=outcome.status.value,
        started_at=outcome.started_at,
        ended_at=outcome.ended_at,
        end_reason=outcome.end_reason.value,
        end_detail=outcome.end_detail,
        recoveries=outcome.recoveries,
        billing=outcome.avatar_billing,
        billing_note=note,
        handoff=outcome.handoff,
    )


def render_session(report: SessionReport) -> str:
    lines = [f"session {report.session_id} ({report.kind or 'kind unknown'})"]
    header = [
        ("workflow", report.workflow_status),
        ("status", report.status or "unknown"),
        ("started", f"{_time(report.started_at)} UTC"),
        ("ended", f"{_time(report.ended_at)} UTC") if report.ended_at else ("ends at", f"{_time(report.ends_at)} UTC"),
    ]
    if report.end_reason:
        header.append(("end reason", report.end_reason + (f" ({report.end_detail})" if report.end_detail else "")))
    elif report.end_detail:
        header.append(("problem", report.end_detail))
    header += [("recovery", r) for r in report.recoveries]
    lines += [f"  {name + ':':<12}{value}" for name, value in header]
    lines.append(_rule("timeline (from the session's Temporal history)"))
    lines.append(render(report.moments))
    lines.append(_rule("avatar billing"))
    lines.append(render_billing(report.billing, report.read_at) if report.billing else "  no avatar sessions")
    if report.billing_note:
        lines.append(f"  {report.billing_note}")
    if report.handoff is not None:
        lines.append(_rule("connections"))
        lines.append(render_handoff(report.handoff))
    lines.append(f"Temporal UI: {report.ui_url}")
    return "\n".join(lines)


def render_handoff(handoff: Handoff) -> str:
    """Per participant: grant to in the room, reconnects, time at each quality level; avatars (in the room, first
    frame, replacement time); room recoveries."""
    lines = []
    for who, p in handoff.participants.items():
        connect = f"{p.connect_s:.2f} s" if p.connect_s is not None else "not measured"
        quality = ", ".join(f"{level.value} {seconds:.0f} s" for level, seconds in p.quality_s.items()) or "not reported"
        lines.append(f"  {who}: connected in {connect}, {p.reconnects} reconnect(s); quality: {quality}")
    if handoff.avatar_join_s:
        lines.append("  avatar in the room after: " + ", ".join(f"{s:.2f} s" for s in handoff.avatar_join_s))
    if handoff.avatar_first_frame_s:
        lines.append("  avatar first frame after: " + ", ".join(f"{s:.2f} s" for s in handoff.avatar_first_frame_s))
    if handoff.avatar_replacement_s:
        lines.append("  avatar replaced in: " + ", ".join(f"{s:.2f} s" for s in handoff.avatar_replacement_s)
                     + " (lost to the replacement's first frame)")
    if handoff.room_recovery_s:
        lines.append("  room re-created after: " + ", ".join(f"{s:.2f} s" for s in handoff.room_recovery_s))
    return "\n".join(lines) or "  nobody connected"


def render_billing(billing: Sequence[AvatarBilling], now: datetime) -> str:
    """One row per avatar session; one still billing shows the seconds so far."""
    rows, total, billing_now = [], 0.0, False
    for b in billing:
        if b.started_at is not None and b.ended_at is None:
            so_far = (now - b.started_at).total_seconds()
            total, billing_now = total + so_far, True
            seconds = f"{so_far:.1f} so far"
        else:
            total += b.seconds
            seconds = f"{b.seconds:.1f}"
        rows.append((
            b.avatar_session_id,
            b.identity,
            _time(b.started_at),
            _time(b.ended_at) if b.ended_at or b.started_at is None else "billing",
            seconds,
            b.end_reason or "-",
            b.ended_by.value if b.ended_by else "-",
        ))
    lines = table(("AVATAR SESSION", "IDENTITY", "START (UTC)", "END (UTC)", "SECONDS", "END REASON", "ENDED BY"), rows)
    still = " so far" if billing_now else ""
    return f"{lines}\n  total billed{still}: {total:.1f} s over {len(billing)} avatar session(s)"


# ---- finding sessions ----------------------------------------------------------------------------------------


# Sessions only: the reaper's sweeps (their own workflow type, on their own task queue) never show. The same text
# is the Temporal UI's saved view "sessions" (docs/support.md) and the base of every `sessionflow list`.
SESSIONS_QUERY = "WorkflowType = 'SessionWorkflow'"


@dataclass(frozen=True)
class SessionFilter:
    """Which sessions `sessionflow list` asks for. Built only by `session_filter`, from the enums' own values,
    so nothing a person types reaches the visibility query as text."""

    status: SessionStatus | None = None
    kind: SessionKind | None = None
    limit: int = 20
    end_reason: EndReason | None = None
    degraded: bool | None = None
    participant_id: str | None = None  # the opaque id (`participant_id`), never the identity

    def query(self) -> str:
        """The visibility query, the same text support types in the Temporal UI's search box."""
        clauses = [SESSIONS_QUERY]
        if self.status is not None:
            clauses.append(f"{SESSION_STATUS.name} = '{self.status.value}'")
        if self.kind is not None:
            clauses.append(f"{SESSION_KIND.name} = '{self.kind.value}'")
        if self.end_reason is not None:
            clauses.append(f"{SESSION_END_REASON.name} = '{self.end_reason.value}'")
        if self.degraded is not None:
            clauses.append(f"{SESSION_DEGRADED.name} = {str(self.degraded).lower()}")
        if self.participant_id is not None:
            clauses.append(f"{PARTICIPANT_IDS.name} = '{self.participant_id}'")
        return " AND ".join(clauses)


def session_filter(
    status: str | None,
    kind: str | None,
    limit: str | int,
    *,
    end_reason: str | None = None,
    degraded: str | None = None,
    participant: str | None = None,
    participant_key: bytes = b"",
) -> SessionFilter:
    """Validate `sessionflow list`'s options; `InvalidInput` names what was wrong and what is allowed.
    `participant` is an identity, searched by its opaque id under `participant_key` (as the starter set it)."""
    return SessionFilter(
        status=_one_of(SessionStatus, status, "status"),
        kind=_one_of(SessionKind, kind, "kind"),
        limit=_limit(limit),
        end_reason=_one_of(EndReason, end_reason, "end reason"),
        degraded=_yes_or_no(degraded),
        participant_id=None if participant is None else participant_id(_identity(participant), participant_key),
    )


_IDENTITY: TypeAdapter[str] = TypeAdapter(Identity)


def _identity(value: str) -> str:
    try:
        return _IDENTITY.validate_python(value, strict=True)
    except ValidationError:
        raise InvalidInput(
            f"--participant {value!r} is not a participant identity (1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit)"
        ) from None


def _yes_or_no(value: str | None) -> bool | None:
    if value is None:
        return None
    if value.lower() in ("yes", "true"):
        return True
    if value.lower() in ("no", "false"):
        return False
    raise InvalidInput(f"--degraded takes yes or no, not {value!r}")


E = TypeVar("E", bound=StrEnum)


def _one_of(enum: type[E], value: str | None, what: str) -> E | None:
    if value is None:
        return None
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise InvalidInput(f"unknown {what} {value!r}: use one of {allowed}") from None


def _limit(value: str | int) -> int:
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidInput(f"--limit must be a whole number from 1 to {MAX_LIST_LIMIT}, not {value!r}")
    return limit


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    kind: str | None
    status: str | None
    started_at: datetime | None
    end_reason: str | None = None  # `SessionEndReason` (None while running, or a session that predates it)


async def find_sessions(client: Client, which: SessionFilter) -> list[SessionRow]:
    """Sessions matching `which`, as Temporal's visibility store lists them (newest first)."""
    rows = []
    async for execution in client.list_workflows(which.query(), limit=which.limit):
        attributes = execution.typed_search_attributes
        session_id = attributes.get(SESSION_ID) or execution.id.removeprefix(ROOM_PREFIX)
        rows.append(SessionRow(
            session_id, attributes.get(SESSION_KIND), attributes.get(SESSION_STATUS), execution.start_time,
            attributes.get(SESSION_END_REASON),
        ))
    return rows


def render_sessions(rows: Sequence[SessionRow]) -> str:
    if not rows:
        return "no sessions match"
    return table(
        ("SESSION", "KIND", "STATUS", "END REASON", "STARTED (UTC)"),
        [(r.session_id, r.kind or "?", r.status or "?", r.end_reason or "-", _time(r.started_at)) for r in rows],
    )


# ---- text ----------------------------------------------------------------------------------------------------


def _time(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if at else "-"


def _rule(title: str) -> str:
    return f"──────── {title} ────────"
