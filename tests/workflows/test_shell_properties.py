"""Property tests through the real shell: the real `SessionWorkflow` on the time-skipping test server, with a
scripted outside world, driven through random interleavings of what can happen to a session.

Hypothesis draws a story: joins (updates, left running in the background), webhooks (joined, left, the
avatar leaving, the room finishing, duplicates), the room monitor's reports (tracks, quality levels, a frozen
or silent avatar, an avatar's first frame, who is in the room, the room lost and LiveKit forgetting it), answers
to the activities the session is waiting on (in any order: succeed, fail for good, fail and be retried, reach the
service then fail, an avatar ending on LiveAvatar's side), extend, end, cancel, terminate, and worker restarts
(the next worker replays the history). Then the session is ended if nothing ended it, the world answers
everything, and we check what a user relies on:

- every room and avatar session that came to exist is released, exactly once (one release command each,
  whatever its retries), and nothing is left at the services; a room is created again only after it was lost;
  the room monitor stops with the session;
- no avatar session is stopped before its start settled; no room is deleted before its create landed; no
  token is minted for a room that does not exist;
- every update gets an answer: a grant, an outcome, or a typed refusal, never a hang or an untyped error;
- the session closes with a recorded reason (its outcome, kept in the memo whatever way it closed);
- after a terminate, which runs no workflow code, every avatar session still billing is findable by the
  reaper (listed in `AvatarSessionId`) and the room is named after the workflow.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from config.settings import Settings
from starters.client import ExtendBeyondCap, RoomFull, SessionCancelled, SessionClient, SessionEnded
from tests.support.polling import eventually
from tests.support.worlds import OUTCOMES, ScriptedWorld
from workflows.models import (
    ConnectionLevel,
    JoinGrant,
    MonitorInput,
    RoomEvent,
    RoomEventKind,
    RoomEventSource,
    SessionOutcome,
    SessionSpec,
    SessionState,
)
from workflows.search_attributes import AVATAR_SESSION_ID
from workflows.session import SessionWorkflow

# `make test` runs this many stories; set SESSIONFLOW_SHELL_EXAMPLES higher to search longer.
EXAMPLES = int(os.environ.get("SESSIONFLOW_SHELL_EXAMPLES", "30"))
AVATAR = "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a"
ROSTER = [{"identity": "cand", "role": "candidate"}, {"identity": "coach", "role": "coach"}]


def spec_for(variant: str) -> SessionSpec:
    base: dict[str, Any] = {
        "session_id": f"p-{uuid.uuid4().hex[:12]}",
        "deployment": Settings().deployment,  # as SessionClient sets it: `room_name` is the real one
        "kind": "interview",
        "participants": ROSTER,
        "max_duration": timedelta(minutes=30),
        "no_show_timeout": timedelta(minutes=10),
    }
    variants: dict[str, dict[str, Any]] = {
        "no avatar": {"reconnect_grace": timedelta(0)},
        "avatar on first join": {"avatar": {"avatar_id": AVATAR, "replace_backoff": timedelta(0)}},
        "avatar at once, end when lost": {
            "avatar": {"avatar_id": AVATAR, "start": "immediately", "max_replacements": 1, "when_lost": "end",
                       "replace_backoff": timedelta(0)},
            "reconnect_grace": timedelta(0),
            "when_participant_lost": "end",
            "max_participants": 1,
        },
    }
    return SessionSpec.model_validate(base | variants[variant])


# How often each step comes up: mostly the world answering and people coming and going; ending steps rare.
STEPS = {"answer": 12, "join": 4, "joined": 4, "left": 2, "avatar_left": 1, "room_finished": 1, "duplicate": 1,
         "extend": 1, "restart_worker": 1, "end": 1, "cancel": 1, "terminate": 1, "monitor": 3, "room_lost": 1}
MONITOR_REPORTS = [RoomEventKind.TRACK_PUBLISHED, RoomEventKind.QUALITY_CHANGED, RoomEventKind.AVATAR_FROZEN,
                   RoomEventKind.AVATAR_SILENT, RoomEventKind.AVATAR_FIRST_FRAME, RoomEventKind.PRESENCE]
STEP = st.sampled_from([name for name, weight in STEPS.items() for _ in range(weight)])
# Refusals a caller may legitimately get; anything else from an update is a failure of the test.
TYPED_ANSWERS = (SessionEnded, SessionCancelled, RoomFull, ExtendBeyondCap)


@dataclass
class Story:
    """One session, the world around it, and what was asked of it."""

    env: WorkflowEnvironment
    world: ScriptedWorld
    spec: SessionSpec
    task_queue: str
    sessions: SessionClient
    handle: WorkflowHandle[SessionWorkflow, SessionOutcome] | None = None
    worker: Worker | None = None
    worker_run: asyncio.Task[None] | None = None
    updates: list[tuple[str, asyncio.Task[Any]]] = field(default_factory=list)
    events: list[RoomEvent] = field(default_factory=list)
    terminated: bool = False
    rooms_lost: int = 0
    monitors: set[str] = field(default_factory=set)  # room monitor runs (attempts) going on right now

    @activity.defn(name="monitor_room")
    async def monitor_room(self, inp: MonitorInput) -> None:
        """The room monitor, as a stub that heartbeats until cancelled; its reports are the story's steps."""
        run = f"{inp.room}#{activity.info().attempt}"
        self.monitors.add(run)
        try:
            while True:
                activity.heartbeat()
                await asyncio.sleep(0.1)
        finally:
            self.monitors.discard(run)

    def start_worker(self) -> None:
        self.worker = Worker(
            self.env.client,
            task_queue=self.task_queue,
            workflows=[SessionWorkflow],
            activities=self.world.all(),
            max_heartbeat_throttle_interval=timedelta(milliseconds=200),
            # No cache: every workflow task replays the whole history, so each step also checks that the shell
            # is deterministic (and a restarted worker has no sticky queue for the test server to time out).
            max_cached_workflows=0,
        )
        self.worker_run = asyncio.create_task(self.worker.run())

    async def stop_worker(self) -> None:
        assert self.worker is not None and self.worker_run is not None
        await self.worker.shutdown()
        await self.worker_run

    def ask(self, what: str, call: Awaitable[Any]) -> None:
        self.updates.append((what, asyncio.ensure_future(call)))

    async def signal(self, kind: RoomEventKind, identity: str | None) -> None:
        event = RoomEvent(event_id=f"ev-{uuid.uuid4().hex[:8]}", kind=kind, identity=identity)
        self.events.append(event)
        await self.send(event)

    async def send(self, event: RoomEvent) -> None:
        assert self.handle is not None
        try:
            await self.handle.signal(SessionWorkflow.room_event, event)
        except Exception as e:  # a signal to a closed session is refused; LiveKit's webhook would get a 404
            if not await self.closed():
                raise AssertionError(f"signal {event} refused by a running session: {e!r}") from e

    async def unless_closed(self, call: Awaitable[None]) -> bool:
        """Cancel or terminate: True if it reached the session, False if the session had already closed."""
        try:
            await call
        except RPCError as e:
            if e.status is RPCStatusCode.NOT_FOUND and await self.closed():
                return False
            raise
        return True

    async def closed(self) -> bool:
        assert self.handle is not None
        return (await self.handle.describe()).status is not WorkflowExecutionStatus.RUNNING


@asynccontextmanager
async def story(env: WorkflowEnvironment, variant: str) -> AsyncIterator[Story]:
    task_queue = f"prop-{uuid.uuid4()}"
    settings = Settings(media_task_queue=f"{task_queue}-media")
    s = Story(env, ScriptedWorld(), spec_for(variant), task_queue, SessionClient(env.client, settings, task_queue=task_queue))
    s.start_worker()
    media = Worker(env.client, task_queue=settings.media_task_queue, activities=[s.monitor_room],
                   max_heartbeat_throttle_interval=timedelta(milliseconds=200))
    try:
        async with media:
            yield s
    finally:
        s.world.settle_all()
        for _, task in s.updates:
            task.cancel()
        await asyncio.gather(*(task for _, task in s.updates), return_exceptions=True)
        await s.stop_worker()


async def step(s: Story, name: str, data: st.DataObject) -> None:
    assert s.handle is not None
    identity = data.draw(st.sampled_from(["cand", "coach"]), label="identity")
    # Everything this step draws is drawn before anything that depends on timing (whether the session is still
    # there, what the world holds): the story's shape must depend on the draws alone.
    drawn = draw_for(name, data)
    pause = data.draw(st.sampled_from([0, 0, 0.05]), label="pause")
    if s.terminated:
        return  # nothing reaches a terminated session
    match name:
        case "answer":
            # Indexes, not the calls themselves: what is waiting depends on timing, the draws must not.
            which, how = drawn
            calls = s.world.answerable()
            if calls:
                call = calls[which % len(calls)]
                outcomes = OUTCOMES[call.activity]
                s.world.answer(call, outcomes[how % len(outcomes)])
        case "join":
            s.ask(f"join {identity}", s.sessions.join_running(s.spec.session_id, identity))
        case "joined":
            await s.signal(RoomEventKind.PARTICIPANT_JOINED, identity)
        case "left":
            await s.signal(RoomEventKind.PARTICIPANT_LEFT, identity)
        case "avatar_left":
            [n] = drawn
            await s.signal(RoomEventKind.PARTICIPANT_LEFT, f"avatar-{s.spec.session_id}-{n}")
        case "room_finished":
            await s.signal(RoomEventKind.ROOM_FINISHED, None)
        case "duplicate":
            [which] = drawn
            if s.events:
                await s.send(s.events[which % len(s.events)])
        case "extend":
            [minutes] = drawn
            s.ask(f"extend {minutes} min", s.sessions.extend(s.spec.session_id, timedelta(minutes=minutes)))
        case "restart_worker":
            await s.stop_worker()
            s.start_worker()
        case "end":
            s.ask("end", s.sessions.end(s.spec.session_id, "the story ends"))
        case "cancel":
            await s.unless_closed(s.handle.cancel())
        case "terminate":
            s.terminated = await s.unless_closed(s.handle.terminate("an operator steps in"))
        case "monitor":
            await monitor_report(s, identity, *drawn)
        case "room_lost":
            # LiveKit restarted: it no longer has the room, and the monitor reports it gone. The real monitor runs
            # only once the session knows its room is live, and reports a loss whenever it finds the room missing;
            # the stub's report is a step of its own, so LiveKit loses the room here only when the session would
            # hear of it: its room live, and not already being re-created.
            live = await room_known_live(s)
            await s.send(RoomEvent(event_id=f"mon-{uuid.uuid4().hex[:8]}", kind=RoomEventKind.ROOM_LOST,
                                   source=RoomEventSource.MONITOR, detail="the room is missing"))
            if live and s.spec.room_name in s.world.rooms:
                s.world.rooms.discard(s.spec.room_name)
                s.rooms_lost += 1
    await asyncio.sleep(pause)  # let the session act (or not)


def draw_for(name: str, data: st.DataObject) -> list[Any]:
    """What step `name` needs drawn, always the same draws for the same step."""
    match name:
        case "answer":
            return [data.draw(st.integers(0, 7), label="call"), data.draw(st.integers(0, 11), label="outcome")]
        case "avatar_left":
            return [data.draw(st.integers(1, 3), label="avatar")]
        case "duplicate":
            return [data.draw(st.integers(0, 31), label="again")]
        case "extend":
            return [data.draw(st.integers(1, 120), label="minutes")]
        case "monitor":
            return [
                data.draw(st.sampled_from(MONITOR_REPORTS), label="report"),
                data.draw(st.sampled_from(list(ConnectionLevel)), label="quality"),
                data.draw(st.integers(1, 3), label="avatar"),
                data.draw(st.integers(0, 7), label="present"),  # a bit per member
            ]
    return []


async def room_known_live(s: Story) -> bool:
    """The session has seen its room created, and is not re-creating it (nor ending)."""
    try:
        state = await s.sessions.state(s.spec.session_id)
    except Exception:
        return False  # closed, or not answering: LiveKit keeps the room this time
    lost = sum("room lost at" in r for r in state.recoveries)
    recreated = sum("re-created" in r for r in state.recoveries)
    return (
        state.status.value in ("waiting", "live", "degraded")
        and lost == recreated
        and not s.world.in_flight("create_room", s.spec.room_name)
    )


async def monitor_report(
    s: Story, identity: str, kind: RoomEventKind, level: ConnectionLevel, avatar_n: int, members: int
) -> None:
    avatar = f"avatar-{s.spec.session_id}-{avatar_n}"
    present = [who for bit, who in enumerate(["cand", "coach", avatar]) if members >> bit & 1]
    reports: dict[RoomEventKind, dict[str, Any]] = {
        RoomEventKind.TRACK_PUBLISHED: {"identity": identity, "track_sid": f"TR_{identity}", "track_kind": "audio"},
        RoomEventKind.QUALITY_CHANGED: {"identity": identity, "quality": level},
        RoomEventKind.AVATAR_FROZEN: {"identity": avatar, "detail": "no video frame"},
        RoomEventKind.AVATAR_SILENT: {"identity": avatar, "detail": "its audio track carried no packets for 8 s"},
        RoomEventKind.AVATAR_FIRST_FRAME: {"identity": avatar, "at": datetime.now(UTC)},
        RoomEventKind.PRESENCE: {"present": present, "at": datetime.now(UTC)},
    }
    event = RoomEvent(event_id=f"mon-{uuid.uuid4().hex[:8]}", kind=kind, source=RoomEventSource.MONITOR, **reports[kind])
    s.events.append(event)
    await s.send(event)


async def drain(s: Story) -> WorkflowExecutionStatus:
    """End the session if nothing did, let the world answer everything, and wait for the workflow to close."""
    assert s.handle is not None
    if not s.terminated and not await s.closed():
        s.ask("end (drain)", s.sessions.end(s.spec.session_id, "the story is over"))
    s.world.settle_all()
    try:
        # 30 s: an activity task a restarted worker took as it shut down is retried only after its start-to-close
        # timeout (create_room's is 20 s), which a story once hit (150 examples: create_room pending, started).
        return await eventually(lambda: _closed_status(s), what=f"session {s.spec.session_id} to close", timeout=30)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{await diagnose(s)}") from None


async def diagnose(s: Story) -> str:
    """What the session was waiting on: its pending activities, the world's held calls, its last events."""
    assert s.handle is not None
    description = await s.handle.describe()
    pending = [(p.activity_type.name, p.state, p.attempt) for p in description.raw_description.pending_activities]
    events = [e.event_type for e in (await s.handle.fetch_history()).events]
    from temporalio.api.enums.v1 import EventType

    tail = [EventType.Name(t).removeprefix("EVENT_TYPE_") for t in events[-25:]]
    task_failures = [
        e.workflow_task_failed_event_attributes.failure.message
        for e in (await s.handle.fetch_history()).events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
    ]
    return (
        f"pending activities: {pending}\nheld by the world: {s.world.held}\nlast events: {tail}\n"
        f"workflow task failures: {task_failures[-2:]}\nworld: {s.world}"
    )


async def _closed_status(s: Story) -> WorkflowExecutionStatus | None:
    assert s.handle is not None
    status = (await s.handle.describe()).status
    return status if status is not WorkflowExecutionStatus.RUNNING else None


async def check(s: Story, status: WorkflowExecutionStatus) -> None:
    world, spec = s.world, s.spec
    assert world.violations == [], f"ordering promises broken: {world.violations}"
    # Every update got an answer: a result or a typed refusal.
    for what, task in s.updates:
        try:
            result = await asyncio.wait_for(asyncio.shield(task), timeout=10 if not s.terminated else 0.5)
        except TYPED_ANSWERS:
            continue
        except TimeoutError:
            if s.terminated:
                continue  # a terminated workflow answers nothing: that is what terminate means
            raise AssertionError(f"{what} got no answer") from None
        except Exception as e:
            if s.terminated:
                continue
            raise AssertionError(f"{what} was answered with an untyped error: {e!r}\n{await diagnose(s)}") from e
        assert isinstance(result, JoinGrant | SessionOutcome | SessionState), f"{what} answered {result!r}"
    if s.terminated and status is WorkflowExecutionStatus.TERMINATED:
        # No workflow code ran: the reaper must be able to find whatever is left.
        description = await s.handle.describe()  # type: ignore[union-attr]  # set by the test before any step
        recorded = set(description.typed_search_attributes.get(AVATAR_SESSION_ID) or [])
        billing = {a for a, state in world.avatars.items() if state == "started"}
        assert billing <= recorded, f"avatar sessions the reaper cannot find: {billing - recorded}"
        assert world.rooms <= {spec.room_name}
        return
    # The session closed with a recorded reason, and released everything, once each.
    outcome = await s.sessions.recorded_outcome(spec.session_id)
    assert outcome.end_reason is not None and outcome.ended_at >= outcome.started_at
    expected_status = {
        WorkflowExecutionStatus.CANCELED: {"cancelled"},
        WorkflowExecutionStatus.FAILED: {"failed"},
    }.get(status)
    if expected_status is not None:
        assert outcome.end_reason.value in expected_status, f"closed {status.name} with reason {outcome.end_reason}"
    else:
        assert status is WorkflowExecutionStatus.COMPLETED and outcome.end_reason.value != "failed"
    assert world.rooms == set(), f"rooms left behind: {world.rooms}"
    asked_for_room = world.first_calls[("create_room", spec.room_name)]
    assert asked_for_room <= 1 + s.rooms_lost, "the room was created again though it was never lost"
    deleted = world.first_calls[("delete_room", spec.room_name)]
    assert deleted == min(asked_for_room, 1), "the room was not released exactly once"
    await eventually(lambda: not s.monitors, what=f"the room monitor to stop with the session ({s.monitors})", timeout=10)
    assert {a: state for a, state in world.avatars.items() if state != "stopped"} == {}, "an avatar outlived the session"
    for avatar_id in world.avatars:
        assert world.first_calls[("stop_avatar_session", avatar_id)] == 1, f"avatar {avatar_id} not released exactly once"
    assert sorted(outcome.avatar_sessions) == sorted(world.avatars), "the outcome does not list every avatar session"


# A story's timing is not replayable: no example database, and no shrinking (a rerun would not fail the same
# way); the failing story is reported as drawn, with what the session was waiting on.
@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None, phases=[Phase.generate]
)
@given(variant=st.sampled_from(["no avatar", "avatar on first join", "avatar at once, end when lost"]), data=st.data())
async def test_any_story_releases_everything_once_and_answers_every_update(
    dev_server: WorkflowEnvironment, variant: str, data: st.DataObject
) -> None:
    async with story(dev_server, variant) as s:
        s.handle = await s.sessions.start(s.spec)
        for _ in range(data.draw(st.integers(0, 25), label="steps")):
            await step(s, data.draw(STEP, label="step"), data)
        status = await drain(s)
        await check(s, status)
