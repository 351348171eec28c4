"""The safety nets on the real stack: what a terminated session held is released without any workflow code.

- the reaper (`ReaperWorkflow` -> `reap_orphans`): rooms and avatar sessions no RUNNING workflow owns;
- the keep-alive net (`keep_avatar_alive`): its heartbeat finds the workflow gone and releases both itself.

Orphans for the reaper are made the way production makes them: the session's worker goes away (graceful
shutdown, which must not tear anything down) and then the session is terminated, so nothing is left to notice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import pytest
from livekit import api
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import (
    Client,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleHandle,
    ScheduleOverlapPolicy,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.liveavatar_client import LiveAvatarClient
from activities.reaper import avatar_owner_query
from config.settings import DEFAULT_AVATAR_ID, Settings
from starters.client import SessionClient
from tests.support.livekit import room_names
from tests.support.polling import eventually
from tests.support.specs import interview
from workers.schedules import REAPER_SCHEDULE_ID, ensure_reaper_schedule
from workers.worker import build_reaper_worker, build_worker
from workflows.reaper import ReaperWorkflow
from workflows.reaper_models import ReapReport, ReapRequest

pytestmark = pytest.mark.stack

RELEASE_DEADLINE_S = 15.0  # keep-alive heartbeat timeout is 10 s; the worker flushes heartbeats every <= 5 s


@dataclass(frozen=True)
class LiveSession:
    session_id: str
    room: str
    avatar_session_id: str


@pytest.fixture(scope="module")
async def reaper_queue(temporal: Client, stack: Settings) -> AsyncIterator[str]:
    """A reaper worker of this module's own, on its own queue, as `sessionflow worker` runs one."""
    queue = f"it-reaper-{uuid.uuid4().hex[:8]}"
    async with build_reaper_worker(temporal, stack, task_queue=queue):
        yield queue


async def reap(
    sessions: SessionClient, reaper_queue: str, *, grace_seconds: float = 0.0, dry_run: bool = False
) -> ReapReport:
    """One sweep now, on this module's reaper worker, exactly as the Schedule would run it."""
    return await sessions.client.execute_workflow(
        ReaperWorkflow.run,
        ReapRequest(grace_seconds=grace_seconds, dry_run=dry_run),
        id=f"it-reap-{uuid.uuid4().hex[:10]}",
        task_queue=reaper_queue,
    )


async def avatar_active(liveavatar: LiveAvatarClient, avatar_session_id: str) -> bool:
    active = await liveavatar.list_sessions("active", page_size=100)
    return avatar_session_id in {s.id for s in active.results} and not (await liveavatar.get_session(avatar_session_id)).is_ended


async def start_avatar_session(sessions: SessionClient, liveavatar: LiveAvatarClient) -> LiveSession:
    """A session whose avatar is live (billing), in its room, and findable by its `AvatarSessionId`."""
    spec = interview(avatar={"avatar_id": DEFAULT_AVATAR_ID, "start": "immediately"})
    await sessions.start(spec)

    async def avatar_id() -> str | None:
        state = await sessions.state(spec.session_id)
        return state.avatar_session_id if state.avatar_present else None

    avatar_session_id = await eventually(avatar_id, what="the avatar to be in the room", timeout=45)
    await eventually(
        lambda: avatar_active(liveavatar, avatar_session_id), what="LiveAvatar to list the avatar session as active", timeout=30
    )
    query = avatar_owner_query(avatar_session_id)
    await eventually(
        lambda: _any(w.id == spec.workflow_id async for w in sessions.client.list_workflows(query)),
        what="visibility to record the avatar's owner", timeout=30,
    )
    # The keep-alive net exists only once the keep-alive activity runs (a terminate before that is the reaper's).
    await eventually(lambda: _keep_alive_running(sessions, spec.session_id), what="the keep-alive activity to run", timeout=30)
    return LiveSession(spec.session_id, spec.room_name, avatar_session_id)


async def _keep_alive_running(sessions: SessionClient, session_id: str) -> bool:
    pending = (await sessions.handle(session_id).describe()).raw_description.pending_activities
    return any(
        a.activity_type.name == "keep_avatar_alive" and a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        for a in pending
    )


@asynccontextmanager
async def abandoned_session(
    temporal: Client, stack: Settings, livekit: api.LiveKitAPI, liveavatar: LiveAvatarClient
) -> AsyncIterator[tuple[LiveSession, float]]:
    """A live avatar session whose worker shut down and which was then terminated: an orphan only the reaper
    can find. Yields it with the monotonic time of the terminate."""
    own_queue = SessionClient(temporal, stack, task_queue=f"it-orphan-{uuid.uuid4().hex[:8]}")
    async with build_worker(temporal, stack, task_queue=own_queue.task_queue):
        session = await start_avatar_session(own_queue, liveavatar)
    # The keep-alive was cancelled with `worker_shutdown`: the session lives on, so nothing may be released.
    assert await room_names(livekit, session.room) == [session.room]
    assert await avatar_active(liveavatar, session.avatar_session_id)
    await own_queue.handle(session.session_id).terminate("test: a crash nobody cleaned up after")
    yield session, time.monotonic()


async def test_the_reaper_releases_a_terminated_sessions_room_and_avatar_and_keeps_a_running_ones(
    temporal: Client, stack: Settings, sessions: SessionClient, livekit: api.LiveKitAPI, liveavatar: LiveAvatarClient,
    reaper_queue: str,
) -> None:
    running = await start_avatar_session(sessions, liveavatar)
    async with abandoned_session(temporal, stack, livekit, liveavatar) as (orphan, terminated_at):
        report = await reap(sessions, reaper_queue)
        released_s = time.monotonic() - terminated_at

        assert orphan.room in report.rooms_released and orphan.avatar_session_id in report.avatars_released
        assert await room_names(livekit, orphan.room) == []
        entry = await liveavatar.get_session(orphan.avatar_session_id)
        assert entry.is_ended and not await avatar_active(liveavatar, orphan.avatar_session_id)
        print(f"reaper: terminate -> room and avatar released in {released_s:.2f} s (one sweep, run at once)")

    assert running.room not in report.rooms_released and running.avatar_session_id not in report.avatars_released
    assert report.rooms_seen >= 2 and report.avatars_seen >= 2 and not report.dry_run
    assert await room_names(livekit, running.room) == [running.room]
    assert await avatar_active(liveavatar, running.avatar_session_id)
    await sessions.end(running.session_id)


async def test_a_dry_run_reports_the_orphans_and_releases_nothing(
    temporal: Client, stack: Settings, sessions: SessionClient, livekit: api.LiveKitAPI, liveavatar: LiveAvatarClient,
    reaper_queue: str,
) -> None:
    async with abandoned_session(temporal, stack, livekit, liveavatar) as (orphan, _):
        report = await reap(sessions, reaper_queue, dry_run=True)
        assert report.dry_run
        assert orphan.room in report.rooms_released and orphan.avatar_session_id in report.avatars_released
        assert await room_names(livekit, orphan.room) == [orphan.room]
        assert await avatar_active(liveavatar, orphan.avatar_session_id)

        young = await reap(sessions, reaper_queue, grace_seconds=3600, dry_run=True)
        assert {orphan.room, orphan.avatar_session_id} <= set(young.skipped_young)
        assert orphan.room not in young.rooms_released and orphan.avatar_session_id not in young.avatars_released

        cleaned = await reap(sessions, reaper_queue)
        assert orphan.room in cleaned.rooms_released and orphan.avatar_session_id in cleaned.avatars_released
        assert await room_names(livekit, orphan.room) == []


async def test_the_keep_alive_net_releases_a_terminated_session_without_the_reaper(
    sessions: SessionClient, livekit: api.LiveKitAPI, liveavatar: LiveAvatarClient
) -> None:
    session = await start_avatar_session(sessions, liveavatar)
    await sessions.handle(session.session_id).terminate("test: an operator terminated it")
    terminated_at = time.monotonic()

    async def released() -> bool:
        room_gone = await room_names(livekit, session.room) == []
        return room_gone and (await liveavatar.get_session(session.avatar_session_id)).is_ended

    await eventually(released, what="the keep-alive net to release the room and the avatar", timeout=RELEASE_DEADLINE_S)
    print(f"keep-alive net: terminate -> room and avatar released in {time.monotonic() - terminated_at:.2f} s")
    assert not await avatar_active(liveavatar, session.avatar_session_id)


async def test_the_reaper_releases_a_session_room_that_no_workflow_ever_owned(
    sessions: SessionClient, livekit: api.LiveKitAPI, reaper_queue: str
) -> None:
    room = sessions.workflow_id(f"it-nowf-{uuid.uuid4().hex[:8]}")  # our deployment's prefix, no workflow
    await livekit.room.create_room(api.CreateRoomRequest(name=room, empty_timeout=600))
    foreign = f"not-ours-{uuid.uuid4().hex[:8]}"
    await livekit.room.create_room(api.CreateRoomRequest(name=foreign, empty_timeout=600))
    try:
        young = await reap(sessions, reaper_queue, grace_seconds=3600)
        assert room in young.skipped_young and room not in young.rooms_released
        assert await room_names(livekit, room) == [room]

        report = await reap(sessions, reaper_queue)
        assert room in report.rooms_released
        assert await room_names(livekit, room) == []
        # Only rooms with our prefix are ours to judge.
        assert foreign not in report.rooms_released and await room_names(livekit, foreign) == [foreign]
    finally:
        await livekit.room.delete_room(api.DeleteRoomRequest(room=foreign))


async def test_the_reaper_schedule_is_kept_at_the_current_spec_and_its_sweeps_run(
    temporal: Client, stack: Settings, sessions: SessionClient, reaper_queue: str
) -> None:
    queue = reaper_queue
    configured = stack.model_copy(update={"reaper_task_queue": queue})
    try:  # left by a worker process: start from nothing, to cover creation too
        await temporal.get_schedule_handle(REAPER_SCHEDULE_ID).delete()
    except RPCError as e:
        if e.status is not RPCStatusCode.NOT_FOUND:  # no schedule yet is fine; anything else is a real failure
            raise
    handle = await ensure_reaper_schedule(temporal, configured.model_copy(update={"reaper_every_s": 45.0}))
    try:
        await handle.pause(note="test: an operator paused it")
        # A second worker start with other settings updates the Schedule instead of failing, and keeps the pause;
        # a worker serving another sessions queue (a canary, a test) does not take the sweeps to its own queue.
        await ensure_reaper_schedule(
            temporal,
            configured.model_copy(update={"reaper_every_s": 20.0, "reaper_grace_s": 5.0, "task_queue": "a-canary-queue"}),
        )
        described = await handle.describe()
        assert [i.every for i in described.schedule.spec.intervals] == [timedelta(seconds=20)]
        assert described.schedule.policy.overlap is ScheduleOverlapPolicy.SKIP
        assert described.schedule.state.paused and described.schedule.state.note == "test: an operator paused it"
        action = described.schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow) and action.task_queue == queue

        await handle.unpause()
        await handle.trigger()
        run = await eventually(lambda: _latest_run(handle), what="the triggered sweep to start", timeout=30)
        report = await temporal.get_workflow_handle_for(ReaperWorkflow.run, run).result()
        assert not report.dry_run and report.errors == []
    finally:
        await handle.delete()


async def _latest_run(handle: ScheduleHandle) -> str | None:
    actions = (await handle.describe()).info.recent_actions
    if not actions:
        return None
    started = actions[-1].action
    assert isinstance(started, ScheduleActionExecutionStartWorkflow), started  # the reaper's schedule only starts workflows
    return started.workflow_id


async def _any(values: AsyncIterator[bool]) -> bool:
    async for value in values:
        if value:
            return True
    return False
