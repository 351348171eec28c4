"""A session's story, read from its Temporal history: what support sees, as plain lines.

Used by `sessionflow show` and the demo. Each line is (seconds since start, text). A long session continues as
new: its story is the chain of its runs, first to last (`session_histories`), told as one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory
from temporalio.converter import DataConverter


@dataclass(frozen=True)
class Moment:
    at: float
    text: str


def _value(converter: DataConverter, payload: Payload) -> object:
    try:
        return converter.payload_converter.from_payload(payload)
    except Exception:
        return "?"


def _first(converter: DataConverter, payloads: Payloads | None) -> object:
    return _value(converter, payloads.payloads[0]) if payloads and payloads.payloads else None


def _summary(converter: DataConverter, event: HistoryEvent) -> str | None:
    if event.HasField("user_metadata") and event.user_metadata.HasField("summary"):
        value = _value(converter, event.user_metadata.summary)
        return str(value)
    return None


_UNSET = object()


def _time(event: HistoryEvent) -> datetime:
    return event.event_time.ToDatetime()


async def session_histories(client: Client, workflow_id: str) -> list[WorkflowHistory]:
    """The histories of every run of session workflow `workflow_id` (its latest run's, followed back through each
    run it continued from), first run first."""
    chain = [await client.get_workflow_handle(workflow_id).fetch_history()]
    while True:
        started = chain[0].events[0].workflow_execution_started_event_attributes
        if not started.continued_execution_run_id:
            return chain
        previous = client.get_workflow_handle(workflow_id, run_id=started.continued_execution_run_id)
        chain.insert(0, await previous.fetch_history())


def timeline(history: WorkflowHistory | Sequence[WorkflowHistory], converter: DataConverter) -> list[Moment]:
    """The moments of one session's history (or of the chain of its runs, first to last), in order."""
    runs = [history] if isinstance(history, WorkflowHistory) else list(history)
    moments: list[Moment] = []
    summaries: dict[int, str] = {}  # scheduled event id -> what that activity or timer does
    updates: dict[str, str] = {}  # update id -> name
    published: dict[str, object] = {}  # search attribute -> the value last upserted
    happenings: set[tuple[str, ...]] = set()  # room events shown so far (webhooks and the monitor tell the same)
    start: datetime | None = None

    def add(event: HistoryEvent, text: str) -> None:
        moments.append(Moment((_time(event) - start).total_seconds() if start else 0.0, text))

    for e in (event for run in runs for event in run.events):
        t = e.event_type
        if t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            summaries.clear()  # event ids start again in each run
            if start is None:
                start = _time(e)
                add(e, "session workflow started")
        elif t in (EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED, EventType.EVENT_TYPE_TIMER_STARTED):
            name = (
                e.activity_task_scheduled_event_attributes.activity_type.name
                if t == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                else "timer"
            )
            summaries[e.event_id] = _summary(converter, e) or name
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            add(e, f"done: {summaries.get(e.activity_task_completed_event_attributes.scheduled_event_id, '?')}")
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
            failed = e.activity_task_failed_event_attributes
            add(e, f"FAILED: {summaries.get(failed.scheduled_event_id, '?')}: {failed.failure.message}")
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
            add(e, f"timed out: {summaries.get(e.activity_task_timed_out_event_attributes.scheduled_event_id, '?')}")
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED:
            add(e, f"stopped: {summaries.get(e.activity_task_canceled_event_attributes.scheduled_event_id, '?')}")
        elif t == EventType.EVENT_TYPE_TIMER_FIRED:
            add(e, f"{summaries.get(e.timer_fired_event_attributes.started_event_id, 'timer')} fired")
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            accepted = e.workflow_execution_update_accepted_event_attributes
            name = accepted.accepted_request.input.name
            updates[accepted.protocol_instance_id] = name
            arg = _first(converter, accepted.accepted_request.input.args)
            add(e, f"{name} requested{_describe_arg(arg)}")
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
            completed = e.workflow_execution_update_completed_event_attributes
            name = updates.get(completed.meta.update_id, "update")
            if completed.outcome.HasField("failure"):
                add(e, f"{name} refused: {completed.outcome.failure.message}")
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            signaled = e.workflow_execution_signaled_event_attributes
            arg = _first(converter, signaled.input)
            if signaled.signal_name == "room_event" and isinstance(arg, dict):
                happening = _happening(arg)
                if happening in happenings:
                    continue  # the same happening told again (the other source, a retry): shown once
                happenings.add(happening)
                add(e, f"room_event{_describe_room_event(arg)}")
            else:
                add(e, f"{signaled.signal_name}{_describe_arg(arg)}")
        elif t == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            fields = e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
            for key, payload in sorted(fields.items()):  # a protobuf map iterates in no fixed order
                if key == "TemporalChangeVersion":
                    continue  # the SDK's record of a `workflow.patched` marker: nothing support needs to read
                value = _value(converter, payload)
                if published.get(key, _UNSET) != value:  # each status upsert repeats what did not change
                    published[key] = value
                    add(e, f"{'status' if key == 'SessionStatus' else key} -> {value}")
        elif t == EventType.EVENT_TYPE_MARKER_RECORDED:
            # A local activity (the join's token) leaves a marker, not activity events; a patch marker says nothing.
            if e.marker_recorded_event_attributes.marker_name == "core_local_activity":
                add(e, f"done: {_summary(converter, e) or 'local activity'}")
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED:
            add(e, "cancel requested")
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
            add(e, "session workflow completed")
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
            add(e, f"session continued as new after {e.event_id} history events (same room, avatar and people)")
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
            add(e, f"session workflow FAILED: {e.workflow_execution_failed_event_attributes.failure.message}")
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED:
            add(e, "session workflow cancelled")
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
            add(e, f"session workflow TERMINATED: {e.workflow_execution_terminated_event_attributes.reason}")
    return moments


def _describe_arg(arg: object) -> str:
    if isinstance(arg, dict):
        parts = [str(v) for k, v in arg.items() if k in ("identity", "kind", "reason", "by") and v]
        if isinstance(arg.get("granted"), bool):  # a consent update: which way it went
            parts.append("granted" if arg["granted"] else "withdrawn")
        return f" ({', '.join(parts)})" if parts else ""
    return ""


def _happening(event: dict[str, object]) -> tuple[str, ...]:
    """What a room event is about: a join or leave of one connection is one happening, whoever told it."""
    kind, identity, sid = str(event.get("kind")), str(event.get("identity")), event.get("sid")
    if kind in ("participant_joined", "participant_left") and sid:
        return (kind, identity, str(sid))
    if kind == "room_finished":
        return (kind,)  # a room finishes once
    return ("id", str(event.get("event_id")))


def _describe_room_event(event: dict[str, object]) -> str:
    parts = [str(event[k]) for k in ("kind", "identity", "quality", "track_kind", "detail") if event.get(k)]
    present = event.get("present")
    if isinstance(present, list):
        parts.append("in the room: " + (", ".join(str(p) for p in present) or "nobody"))
    source = " via the monitor" if event.get("source") == "monitor" else ""
    return f" ({', '.join(parts)}){source}" if parts else source


def render(moments: list[Moment]) -> str:
    return "\n".join(f"  {m.at:8.2f}s  {m.text}" for m in moments)
