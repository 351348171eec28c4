"""A long session continues as new (issue 8, item 6), on the real Temporal dev server with stub activities.

The threshold is lowered through the starter's setting (`continue_as_new_after_events`, in the memo), so a few
dozen room events make the session switch runs. What a user relies on: no signal or update is lost across a
switch (the server refuses a switch's completion when a signal came meanwhile, and the task runs again with it),
a switch waits for a quiet moment (no one-shot activity in flight), nothing is created or started again, and
the session keeps its id, its deadline and its whole story.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.client import WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from config.settings import Settings
from starters.client import SessionClient
from starters.timeline import session_histories, timeline
from tests.support.polling import eventually
from tests.support.worlds import StubWorld
from workers.codec import decode_history
from workflows.models import RoomEvent, RoomEventKind, RoomEventSource, SessionSpec, SessionStatus
from workflows.search_attributes import SESSION_STATUS
from workflows.session import SessionWorkflow

AVATAR = "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a"
THRESHOLD = 40  # history events; the floor is CONTINUE_AS_NEW_MIN_EVENTS (32)


@pytest.fixture
async def sessions(dev_server: WorkflowEnvironment, world: StubWorld) -> AsyncIterator[SessionClient]:
    task_queue = f"can-{uuid.uuid4()}"
    settings = Settings(media_task_queue="", continue_as_new_after_events=THRESHOLD)
    async with Worker(
        dev_server.client,
        task_queue=task_queue,
        workflows=[SessionWorkflow],
        activities=world.all(),
        max_heartbeat_throttle_interval=timedelta(milliseconds=500),
    ):
        yield SessionClient(dev_server.client, settings, task_queue=task_queue)


def make_spec(**overrides: Any) -> SessionSpec:
    base: dict[str, Any] = {
        "session_id": f"can-{uuid.uuid4().hex[:12]}",
        "deployment": Settings().deployment,
        "kind": "interview",
        "participants": [{"identity": "cand", "role": "candidate"}, {"identity": "coach", "role": "coach"}],
        "avatar": {"avatar_id": AVATAR},
        "max_duration": timedelta(minutes=30),
        "max_duration_cap": timedelta(hours=2),
    }
    return SessionSpec.model_validate(base | overrides)


def track(n: int, who: str = "cand") -> RoomEvent:
    return RoomEvent(event_id=f"mon:published:TR_{n}", kind=RoomEventKind.TRACK_PUBLISHED, identity=who,
                     track_sid=f"TR_{n}", track_kind="audio", source=RoomEventSource.MONITOR)


async def signal_all(sessions: SessionClient, spec: SessionSpec, events: list[RoomEvent], *, at_once: int = 8) -> None:
    handle = sessions.handle(spec.session_id)
    for i in range(0, len(events), at_once):
        await asyncio.gather(*(handle.signal(SessionWorkflow.room_event, e) for e in events[i:i + at_once]))


async def chain(sessions: SessionClient, spec: SessionSpec) -> list[WorkflowHistory]:
    return await session_histories(sessions.client, spec.workflow_id)


async def live_with_avatar(sessions: SessionClient, spec: SessionSpec) -> None:
    await sessions.join(spec, "cand")
    await signal_all(sessions, spec, [RoomEvent(event_id="wh:cand:1", kind=RoomEventKind.PARTICIPANT_JOINED,
                                                identity="cand")])
    await eventually(lambda: _avatar_live(sessions, spec), what="the avatar to be live", timeout=30)


async def _avatar_live(sessions: SessionClient, spec: SessionSpec) -> bool:
    state = await sessions.state(spec.session_id)
    return state.status is SessionStatus.LIVE and state.avatar_session_id is not None and any(
        row.started_at for row in state.avatar_billing
    )


async def test_signals_and_updates_across_switches_are_all_applied_once_and_nothing_restarts(
    sessions: SessionClient, world: StubWorld
) -> None:
    spec = make_spec()
    await live_with_avatar(sessions, spec)
    before = await sessions.state(spec.session_id)
    # Room events in bursts and extends in between: several switches, each racing some of them.
    events = [track(n) for n in range(90)]
    extends = []
    for i in range(0, len(events), 15):
        await signal_all(sessions, spec, events[i:i + 15])
        extends.append(asyncio.ensure_future(sessions.extend(spec.session_id, timedelta(minutes=1))))
    answered = await asyncio.gather(*extends)
    assert all(state.session_id == spec.session_id for state in answered)
    state = await eventually(
        lambda: _with_tracks(sessions, spec, len(events)), what="every track report applied", timeout=30
    )
    runs = await chain(sessions, spec)
    lengths = [len(h.events) for h in runs]
    refused = sum(_refused_switches(h) for h in runs)
    print(f"\nhistory events per run: {lengths} (threshold {THRESHOLD}); switches refused by the server because a "
          f"signal or update came meanwhile (then done again with it): {refused}")
    assert len(runs) >= 3, f"the session never continued as new (history lengths {lengths})"
    assert all(n >= THRESHOLD for n in lengths[:-1]), f"a run continued before its history was long: {lengths}"
    # Nothing lost or doubled: every report once, every extend once, the same avatar billing since it started.
    assert state.tracks == {"cand": ["audio"] * len(events)}
    assert state.ends_at == before.ends_at + timedelta(minutes=len(extends))
    assert state.started_at == before.started_at and state.present == ["cand"]
    assert state.avatar_billing[0].started_at == before.avatar_billing[0].started_at
    # Nothing created or started again; only the keep-alive restarted with each run.
    names = world.names()
    assert names.count("create_room") == 1 and names.count("create_avatar_session") == 1
    assert names.count("start_avatar_session") == 1
    assert names.count("keep_avatar_alive") >= len(runs) - 1
    # Memo and search attributes went along: the status the last run published is the session's.
    description = await sessions.handle(spec.session_id).describe()
    assert description.typed_search_attributes.get(SESSION_STATUS) == "live"
    outcome = await sessions.end(spec.session_id, "done")
    assert outcome.started_at == before.started_at and outcome.avatar_sessions == [before.avatar_session_id]
    assert outcome.avatar_billing[0].seconds > 0 and outcome.participants_joined == ["cand"]
    names = world.names()
    assert names.count("delete_room") == 1 and names.count("stop_avatar_session") == 1
    await sessions.outcome(spec.session_id)  # the last run closed (the keep-alive acknowledged its cancel)
    # The story reads across the runs, each report once.
    converter = sessions.client.data_converter
    histories = [await decode_history(h, converter.payload_codec) for h in await chain(sessions, spec)]
    lines = [m.text for m in timeline(histories, converter)]
    assert lines[0] == "session workflow started" and lines[-1] == "session workflow completed"
    assert sum("continued as new" in line for line in lines) == len(histories) - 1
    assert sum(line.startswith("room_event (track_published") for line in lines) == len(events)
    assert sum(line.startswith("extend requested") for line in lines) == len(extends)


def _refused_switches(history: WorkflowHistory) -> int:
    """Workflow task completions the server refused because new events came in (a signal or an update during a
    switch): the task ran again with them, and the switch came later."""
    return sum(
        1 for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
        and e.workflow_task_failed_event_attributes.cause
        in (WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND,
            WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_UPDATE)
    )


async def _with_tracks(sessions: SessionClient, spec: SessionSpec, n: int) -> Any:
    state = await sessions.state(spec.session_id)
    return state if len(state.tracks.get("cand", [])) == n else None


async def test_no_switch_while_an_avatar_start_is_in_flight(sessions: SessionClient, world: StubWorld) -> None:
    world.start_avatar_gate = asyncio.Event()  # billing about to start: its answer must find this run
    spec = make_spec()
    await sessions.join(spec, "cand")
    await signal_all(sessions, spec, [RoomEvent(event_id="wh:cand:1", kind=RoomEventKind.PARTICIPANT_JOINED,
                                                identity="cand")])
    await eventually(lambda: "start_avatar_session" in world.names(), what="the avatar start to be held", timeout=30)
    events = [track(n) for n in range(60)]
    await signal_all(sessions, spec, events)
    await eventually(lambda: _with_tracks(sessions, spec, len(events)), what="the reports applied", timeout=30)
    # The session has handled events well past the threshold, and waited: the start is still in flight.
    [run] = await chain(sessions, spec)
    assert len(run.events) > THRESHOLD + 40
    world.start_avatar_gate.set()
    runs = await eventually(lambda: _continued(sessions, spec), what="the switch once the start settled", timeout=30)
    first = runs[0].events
    assert any(e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED for e in first[-12:])
    state = await eventually(lambda: _avatar_live(sessions, spec), what="the avatar live in the new run", timeout=30)
    assert state
    assert world.names().count("start_avatar_session") == 1 and world.names().count("create_avatar_session") == 1
    await sessions.end(spec.session_id, "done")


async def _continued(sessions: SessionClient, spec: SessionSpec) -> list[WorkflowHistory] | None:
    runs = await chain(sessions, spec)
    return runs if len(runs) > 1 else None


async def test_no_switch_while_an_update_is_running(sessions: SessionClient, world: StubWorld) -> None:
    world.create_room_gate = asyncio.Event()  # the join waits for the room
    spec = make_spec(avatar=None)
    join = asyncio.ensure_future(sessions.join(spec, "cand"))
    await eventually(lambda: "create_room" in world.names(), what="the room's create to be held", timeout=30)
    # Past the threshold while the join's handler waits for the room (and the create is in flight).
    await signal_all(sessions, spec, [track(n) for n in range(50)])
    await eventually(lambda: _history_over(sessions, spec, THRESHOLD + 20), what="a long history", timeout=30)
    world.create_room_gate.set()
    grant = await asyncio.wait_for(join, timeout=30)
    assert grant.identity == "cand" and grant.room == spec.room_name
    runs = await eventually(lambda: _continued(sessions, spec), what="the switch once the join was answered", timeout=30)
    completed = [e for e in runs[0].events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED]
    assert completed, "the join was answered in the run it came to"
    await sessions.end(spec.session_id, "done")


async def _history_over(sessions: SessionClient, spec: SessionSpec, n: int) -> bool:
    return len((await chain(sessions, spec))[-1].events) > n
