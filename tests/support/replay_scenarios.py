"""The sessions whose histories make the replay corpus: one per path a running session can take.

Each scenario drives the real `SessionWorkflow` on the time-skipping test server, with the outside world
played by `tests.support.worlds` (so no token or key of any real service ends up in a history), and returns
the workflow handle once the session has closed. `tests/replay/record.py` writes their histories (`make record-histories`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowHandle, WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from config.settings import Settings
from starters.client import SessionClient, SessionEnded
from tests.support.binaries import dev_server
from tests.support.polling import eventually
from tests.support.worlds import Outcome, ScriptedWorld, StubWorld
from workflows.models import (
    ConnectionLevel,
    MonitorInput,
    RecordingStarted,
    RecordingStatus,
    RoomEvent,
    RoomEventKind,
    RoomEventSource,
    SessionOutcome,
    SessionSpec,
    StartRecordingInput,
)
from workflows.session import SessionWorkflow

AVATAR = "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a"
Handle = WorkflowHandle[SessionWorkflow, SessionOutcome]


def spec(name: str, **overrides: Any) -> SessionSpec:
    base: dict[str, Any] = {
        "session_id": f"{name.replace('_', '-')}-{uuid.uuid4().hex[:6]}",
        "kind": "interview",
        "participants": [{"identity": "cand", "role": "candidate"}, {"identity": "panel", "role": "observer"}],
        "max_duration": timedelta(minutes=30),
        "no_show_timeout": timedelta(minutes=5),
    }
    return SessionSpec.model_validate(base | overrides)


@dataclass
class Rig:
    """A worker on a fresh task queue around one world, and the client a backend would use."""

    env: WorkflowEnvironment
    world: StubWorld | ScriptedWorld
    task_queue: str = field(default_factory=lambda: f"replay-{uuid.uuid4()}")
    worker: Worker | None = None
    running: asyncio.Task[None] | None = None
    media_task_queue: str = ""  # none: no room monitor (a long-running activity stops the time-skipping clock)
    continue_as_new_after: int = 0  # history events (0: only when the server suggests it)

    @property
    def sessions(self) -> SessionClient:
        settings = Settings(media_task_queue=self.media_task_queue, continue_as_new_after_events=self.continue_as_new_after)
        return SessionClient(self.env.client, settings, task_queue=self.task_queue)

    def start_worker(self) -> None:
        self.worker = Worker(
            self.env.client, task_queue=self.task_queue, workflows=[SessionWorkflow], activities=self.world.all(),
            max_heartbeat_throttle_interval=timedelta(milliseconds=500),
            max_cached_workflows=0,  # no sticky queue: the test server never hands a dead worker's tasks on
        )
        self.running = asyncio.create_task(self.worker.run())

    async def stop_worker(self) -> None:
        assert self.worker is not None and self.running is not None
        await self.worker.shutdown()
        await self.running

    async def signal(self, handle: Handle, kind: RoomEventKind, identity: str | None = None) -> None:
        await handle.signal(SessionWorkflow.room_event, RoomEvent(event_id=uuid.uuid4().hex, kind=kind, identity=identity))

    async def state_is(self, s: SessionSpec, ok: Callable[[Any], bool], what: str) -> None:
        async def check() -> bool:
            return ok(await self.sessions.state(s.session_id))

        await eventually(check, what=what, timeout=30)


@asynccontextmanager
async def rig(env: WorkflowEnvironment, world: StubWorld | ScriptedWorld) -> AsyncIterator[Rig]:
    r = Rig(env, world)
    r.start_worker()
    try:
        yield r
    finally:
        if isinstance(world, ScriptedWorld):
            world.settle_all()
        await r.stop_worker()


async def held(world: ScriptedWorld, activity: str) -> None:
    """Wait until the world holds a call of `activity`."""
    await eventually(lambda: any(c.activity == activity for c in world.answerable()), what=f"a {activity} call", timeout=20)


async def answer(world: ScriptedWorld, activity: str, outcome: Outcome) -> None:
    await held(world, activity)
    world.answer(next(c for c in world.answerable() if c.activity == activity), outcome)


async def avatar_starting(r: Rig, world: ScriptedWorld, name: str) -> tuple[SessionSpec, Handle]:
    """A session whose avatar (started with the room) is in the middle of its start: the start call is held."""
    s = spec(name, avatar={"avatar_id": AVATAR, "start": "immediately"})
    handle = await r.sessions.start(s)
    await answer(world, "create_room", Outcome.OK)
    await answer(world, "create_avatar_session", Outcome.OK)
    await held(world, "start_avatar_session")
    return s, handle


async def interview_happy_path(env: WorkflowEnvironment) -> Handle:
    async with rig(env, StubWorld()) as r:
        s = spec("interview", avatar={"avatar_id": AVATAR})
        handle = await r.sessions.start(s)
        await r.sessions.join_running(s.session_id, "cand")
        await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, "cand")
        await r.state_is(s, lambda st: st.avatar_session_id is not None, "the avatar to be recorded")
        await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, f"avatar-{s.session_id}-1")
        await r.sessions.join_running(s.session_id, "panel")
        await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, "panel")
        await r.sessions.end(s.session_id, "interview over")
        await handle.result()
        return handle


async def coaching_happy_path(env: WorkflowEnvironment) -> Handle:
    async with rig(env, StubWorld()) as r:
        s = spec("coaching", kind="coaching",
                 participants=[{"identity": "coach", "role": "coach"}, {"identity": "client", "role": "candidate"}])
        handle = await r.sessions.start(s)
        for who in ("coach", "client"):
            await r.sessions.join_running(s.session_id, who)
            await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, who)
        await r.signal(handle, RoomEventKind.PARTICIPANT_LEFT, "client")  # a network blip: back within the grace
        await r.sessions.join_running(s.session_id, "client")
        await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, "client")
        await r.sessions.end(s.session_id, "coaching over")
        await handle.result()
        return handle


async def join_with_start(env: WorkflowEnvironment) -> Handle:
    """The join as a backend sends it: update-with-start, answered in the session's first workflow task (the room
    created and the token minted by local activities, `workflow.patched("local-room-create")`), then a second join."""
    async with rig(env, StubWorld()) as r:
        s = spec("join-with-start", avatar={"avatar_id": AVATAR})
        await r.sessions.join(s, "cand")
        handle = r.sessions.handle(s.session_id)
        await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, "cand")
        await r.state_is(s, lambda st: st.avatar_session_id is not None, "the avatar to be recorded")
        await r.sessions.join(s, "panel")
        await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, "panel")
        await r.sessions.end(s.session_id, "interview over")
        await handle.result()
        return handle


async def avatar_crash_and_replacement(env: WorkflowEnvironment) -> Handle:
    world = ScriptedWorld(settle=True)
    async with rig(env, world) as r:
        s = spec("crash", avatar={"avatar_id": AVATAR, "replace_backoff": "PT1S"})
        handle = await r.sessions.start(s)
        await r.sessions.join_running(s.session_id, "cand")
        await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, "cand")
        await answer(world, "keep_avatar_alive", Outcome.ENDED)  # the avatar crashed on LiveAvatar's side
        await r.state_is(s, lambda st: any("replacement 1" in x for x in st.recoveries) and st.status == "live",
                         "the replacement avatar")
        await r.sessions.end(s.session_id, "interview over")
        await handle.result()
        return handle


async def avatar_rotation(env: WorkflowEnvironment) -> Handle:
    world = StubWorld(keepalive_returns=True)  # the test server skips no time while an activity runs
    async with rig(env, world) as r:
        s = spec("rotation", max_duration=timedelta(minutes=10),
                 avatar={"avatar_id": AVATAR, "start": "immediately", "max_session_duration": "PT5M"})
        handle = await r.sessions.start(s)
        await r.sessions.join_running(s.session_id, "cand")
        await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, "cand")
        await handle.result()  # skips time: a rotation at 4 min, then the max duration
        return handle


async def participant_lost(env: WorkflowEnvironment) -> Handle:
    async with rig(env, StubWorld()) as r:
        s = spec("lost", participants=[{"identity": "cand", "role": "candidate"}, {"identity": "coach", "role": "coach"}],
                 reconnect_grace="PT1M", when_participant_lost="continue")
        handle = await r.sessions.start(s)
        for who in ("cand", "coach"):
            await r.sessions.join_running(s.session_id, who)
            await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, who)
        await r.signal(handle, RoomEventKind.PARTICIPANT_LEFT, "cand")
        await env.sleep(timedelta(seconds=90))  # the grace runs out: the coach carries on alone
        await r.state_is(s, lambda st: "continued without cand" in st.recoveries, "the session to continue without cand")
        await r.signal(handle, RoomEventKind.PARTICIPANT_LEFT, "coach")
        await handle.result()  # nobody is left once the coach's grace runs out too
        return handle


async def no_show(env: WorkflowEnvironment) -> Handle:
    async with rig(env, StubWorld()) as r:
        s = spec("noshow")
        handle = await r.sessions.start(s)
        await r.sessions.join_running(s.session_id, "cand")  # a grant, but nobody connects
        await handle.result()
        return handle


async def max_duration(env: WorkflowEnvironment) -> Handle:
    async with rig(env, StubWorld()) as r:
        s = spec("maxdur")
        handle = await r.sessions.start(s)
        await r.sessions.join_running(s.session_id, "cand")
        await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, "cand")
        await handle.result()
        return handle


async def extend(env: WorkflowEnvironment) -> Handle:
    async with rig(env, StubWorld()) as r:
        s = spec("extend", max_duration_cap=timedelta(minutes=45))
        handle = await r.sessions.start(s)
        await r.sessions.join_running(s.session_id, "cand")
        await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, "cand")
        await r.sessions.extend(s.session_id, timedelta(minutes=10))
        await handle.result()
        return handle


async def end_during_avatar_start(env: WorkflowEnvironment) -> Handle:
    world = ScriptedWorld()
    async with rig(env, world) as r:
        s, handle = await avatar_starting(r, world, "endstart")
        ending = asyncio.ensure_future(r.sessions.end(s.session_id, "ended while the avatar was starting"))
        await r.state_is(s, lambda st: st.status == "ending", "the end to be decided")
        await answer(world, "start_avatar_session", Outcome.OK)  # only now may the stop go out
        world.settle_all()
        await ending
        await handle.result()
        return handle


async def cancel(env: WorkflowEnvironment) -> Handle:
    world = ScriptedWorld(settle=True)
    async with rig(env, world) as r:
        s = spec("cancel", avatar={"avatar_id": AVATAR, "start": "immediately"})
        handle = await r.sessions.start(s)
        await held(world, "keep_avatar_alive")
        await handle.cancel()
        await _closed(handle)
        return handle


async def terminate_live(env: WorkflowEnvironment) -> Handle:
    world = ScriptedWorld(settle=True)
    async with rig(env, world) as r:
        s = spec("terminate", avatar={"avatar_id": AVATAR, "start": "immediately"})
        handle = await r.sessions.start(s)
        await held(world, "keep_avatar_alive")
        await handle.terminate("an operator stepped in; the reaper releases what it held")
        await _closed(handle)
        return handle


async def worker_killed_mid_start(env: WorkflowEnvironment) -> Handle:
    world = ScriptedWorld()
    async with rig(env, world) as r:
        s, handle = await avatar_starting(r, world, "killstart")
        await r.stop_worker()  # the worker goes away in the middle of the start
        r.start_worker()
        await answer(world, "start_avatar_session", Outcome.OK)  # the retry, on the new worker
        world.settle = True
        await held(world, "keep_avatar_alive")
        await r.sessions.end(s.session_id, "interview over")
        await handle.result()
        return handle


async def livekit_down(env: WorkflowEnvironment) -> Handle:
    world = ScriptedWorld()
    async with rig(env, world) as r:
        s = spec("lkdown")
        handle = await r.sessions.start(s)
        for _ in range(3):
            await answer(world, "create_room", Outcome.RETRY)  # LiveKit unreachable: Temporal retries
        await answer(world, "create_room", Outcome.OK)
        await r.sessions.join_running(s.session_id, "cand")
        await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, "cand")
        ending = asyncio.ensure_future(r.sessions.end(s.session_id, "interview over"))
        for _ in range(2):
            await answer(world, "delete_room", Outcome.RETRY)  # down again during the cleanup
        await answer(world, "delete_room", Outcome.OK)
        await ending
        await handle.result()
        return handle


async def room_create_fails(env: WorkflowEnvironment) -> Handle:
    world = ScriptedWorld()
    async with rig(env, world) as r:
        s = spec("roomfail")
        handle = await r.sessions.start(s)
        joining = asyncio.ensure_future(r.sessions.join_running(s.session_id, "cand"))
        await answer(world, "create_room", Outcome.FAIL)  # a wrong API key: final
        world.settle_all()
        with contextlib.suppress(SessionEnded):
            await joining  # the join waiting for the room is refused: the session has ended (failed)
        await _closed(handle)
        return handle


async def cancel_after_end(env: WorkflowEnvironment) -> Handle:
    world = ScriptedWorld()
    async with rig(env, world) as r:
        s = spec("latecancel")
        handle = await r.sessions.start(s)
        await answer(world, "create_room", Outcome.OK)
        ending = asyncio.ensure_future(r.sessions.end(s.session_id, "interview over"))
        await held(world, "delete_room")
        await handle.cancel()  # arrives while the cleanup runs: the outcome is kept
        await answer(world, "delete_room", Outcome.OK)
        await ending
        await handle.result()
        return handle


# ---- recording with consent (CORPUS_VERSION v5) ---------------------------------------------------------------


@dataclass
class RecordingWorld(StubWorld):
    """The stub world with an egress service: each start gets the next egress id, or is refused."""

    refuse_recording: bool = False

    @activity.defn(name="start_recording")
    async def start_recording(self, inp: StartRecordingInput) -> RecordingStarted:
        self.calls.append(("start_recording", inp.room))
        if self.refuse_recording:
            raise ApplicationError("LiveKit refused to start recording: 503 unavailable", type="LiveKit_unavailable")
        return RecordingStarted(egress_id=f"EG_{sum(1 for name in self.names() if name == 'start_recording')}")

    @activity.defn(name="stop_recording")
    async def stop_recording(self, egress_id: str) -> None:
        self.calls.append(("stop_recording", egress_id))

    def all(self) -> list[Callable[..., Any]]:
        return [*super().all(), self.start_recording, self.stop_recording]


async def _recording(r: Rig, s: SessionSpec, status: RecordingStatus) -> None:
    await r.state_is(s, lambda st: st.recording is not None and st.recording.status is status, f"recording {status}")


async def consent_recording(env: WorkflowEnvironment) -> Handle:
    async with rig(env, RecordingWorld()) as r:
        s = spec("consent", recording={"participants": ["cand", "panel"]})
        handle = await r.sessions.start(s)
        await r.sessions.join_running(s.session_id, "cand")
        await r.signal(handle, RoomEventKind.PARTICIPANT_JOINED, "cand")
        await r.sessions.consent(s.session_id, "cand", True)
        await r.sessions.consent(s.session_id, "panel", True)
        await _recording(r, s, RecordingStatus.RECORDING)
        await r.sessions.consent(s.session_id, "panel", False)  # withdrawn: stopped
        await _recording(r, s, RecordingStatus.WAITING_FOR_CONSENT)
        await r.sessions.consent(s.session_id, "panel", True)
        await _recording(r, s, RecordingStatus.RECORDING)
        await r.sessions.end(s.session_id, "interview over")  # stops it before closing
        await handle.result()
        return handle


async def consent_recording_refused(env: WorkflowEnvironment) -> Handle:
    async with rig(env, RecordingWorld(refuse_recording=True)) as r:
        s = spec("norecord", recording={"participants": ["cand"]})
        handle = await r.sessions.start(s)
        await r.sessions.join_running(s.session_id, "cand")
        await r.sessions.consent(s.session_id, "cand", True)
        await _recording(r, s, RecordingStatus.UNAVAILABLE)  # the session goes on unrecorded
        await r.sessions.end(s.session_id, "interview over")
        await handle.result()
        return handle


async def _closed(handle: Handle) -> None:
    async def closed() -> bool:
        return (await handle.describe()).status.name != "RUNNING"  # type: ignore[union-attr]  # describe always has a status

    await eventually(closed, what="the session to close", timeout=30)


# ---- the room monitor (v4): the monitor's own activity is a stub on a media queue; its reports are signals --------


@activity.defn(name="monitor_room")
async def stub_monitor(inp: MonitorInput) -> None:
    """Stands in for the room monitor: heartbeats until cancelled (what it reports, the scenario signals)."""
    while True:
        activity.heartbeat()
        await asyncio.sleep(0.2)


@asynccontextmanager
async def monitored_rig(env: WorkflowEnvironment, world: StubWorld | ScriptedWorld) -> AsyncIterator[Rig]:
    media_queue = f"media-{uuid.uuid4()}"
    async with Worker(env.client, task_queue=media_queue, activities=[stub_monitor]), rig(env, world) as r:
        r.media_task_queue = media_queue
        yield r


async def tell(handle: Handle, kind: RoomEventKind, identity: str | None = None, **fields: Any) -> None:
    """A report of the room monitor."""
    event = RoomEvent(event_id=f"mon:{uuid.uuid4().hex}", kind=kind, identity=identity, source=RoomEventSource.MONITOR,
                      at=datetime.now(UTC), **fields)
    await handle.signal(SessionWorkflow.room_event, event)


async def monitor_quality_and_tracks(env: WorkflowEnvironment) -> Handle:
    """Joins told by both sources, tracks, a sustained poor connection (degraded) and its recovery, presence."""
    async with monitored_rig(env, StubWorld()) as r:
        s = spec("monitor-quality")
        handle = await r.sessions.start(s)
        await r.state_is(s, lambda st: st.monitored, "the monitor to start")
        await r.sessions.join_running(s.session_id, "cand")
        await tell(handle, RoomEventKind.PARTICIPANT_JOINED, "cand", sid="PA_1")
        await handle.signal(SessionWorkflow.room_event, RoomEvent(
            event_id="EV_join", kind=RoomEventKind.PARTICIPANT_JOINED, identity="cand", sid="PA_1",
            at=datetime.now(UTC) - timedelta(seconds=1)))  # the webhook of the same join: nothing new
        await tell(handle, RoomEventKind.TRACK_PUBLISHED, "cand", track_sid="TR_a", track_kind="audio")
        await tell(handle, RoomEventKind.QUALITY_CHANGED, "cand", quality=ConnectionLevel.POOR, detail="loss 12.0%")
        await r.state_is(s, lambda st: st.status == "degraded" and st.degraded, "degraded by cand's connection")
        await tell(handle, RoomEventKind.QUALITY_CHANGED, "cand", quality=ConnectionLevel.GOOD)
        await r.state_is(s, lambda st: st.status == "live", "recovered")
        await tell(handle, RoomEventKind.PRESENCE, present=["cand"])
        await tell(handle, RoomEventKind.TRACK_UNPUBLISHED, "cand", track_sid="TR_a")
        await r.sessions.end(s.session_id, "interview over")
        await handle.result()
        return handle


async def monitor_room_lost(env: WorkflowEnvironment) -> Handle:
    """LiveKit restarted: the room is re-created, a fresh avatar started into it, the candidate rejoins."""
    async with monitored_rig(env, StubWorld()) as r:
        s = spec("room-lost", avatar={"avatar_id": AVATAR})
        handle = await r.sessions.start(s)
        await r.sessions.join_running(s.session_id, "cand")
        await tell(handle, RoomEventKind.PARTICIPANT_JOINED, "cand", sid="PA_1")
        await r.state_is(s, lambda st: st.avatar_session_id is not None and st.status == "live", "the avatar live")
        await tell(handle, RoomEventKind.ROOM_LOST, detail="the room is missing on LiveKit")
        await r.state_is(s, lambda st: any("re-created" in x for x in st.recoveries), "the room re-created")
        await r.sessions.join_running(s.session_id, "cand")
        await tell(handle, RoomEventKind.PARTICIPANT_JOINED, "cand", sid="PA_2")
        await r.state_is(s, lambda st: len(st.avatar_billing) == 2 and st.status == "live", "a fresh avatar, live")
        await r.sessions.end(s.session_id, "interview over")
        await handle.result()
        return handle


async def monitor_avatar_frozen(env: WorkflowEnvironment) -> Handle:
    """The avatar's video froze: it is replaced as any lost avatar."""
    async with monitored_rig(env, ScriptedWorld(settle=True)) as r:
        s = spec("frozen", avatar={"avatar_id": AVATAR, "replace_backoff": "PT1S"})
        handle = await r.sessions.start(s)
        await r.sessions.join_running(s.session_id, "cand")
        await tell(handle, RoomEventKind.PARTICIPANT_JOINED, "cand", sid="PA_1")
        await r.state_is(s, lambda st: st.avatar_identity is not None and st.status == "live", "the avatar live")
        state = await r.sessions.state(s.session_id)
        await tell(handle, RoomEventKind.AVATAR_FROZEN, state.avatar_identity, detail="no video frame for 6 s")
        await r.state_is(s, lambda st: any("replacement 1" in x for x in st.recoveries) and st.status == "live",
                         "the replacement avatar")
        await r.sessions.end(s.session_id, "interview over")
        await handle.result()
        return handle


async def monitor_avatar_silent(env: WorkflowEnvironment) -> Handle:
    """The avatar went silent (workflow.patched("avatar-media-watch")): replaced as any lost avatar; each avatar's
    first frame times it, and the replacement's first frame ends the replacement time."""
    async with monitored_rig(env, ScriptedWorld(settle=True)) as r:
        s = spec("silent", avatar={"avatar_id": AVATAR, "replace_backoff": "PT1S"})
        handle = await r.sessions.start(s)
        await r.sessions.join_running(s.session_id, "cand")
        await tell(handle, RoomEventKind.PARTICIPANT_JOINED, "cand", sid="PA_1")
        await r.state_is(s, lambda st: st.avatar_identity is not None and st.status == "live", "the avatar live")
        first = (await r.sessions.state(s.session_id)).avatar_identity
        await tell(handle, RoomEventKind.AVATAR_FIRST_FRAME, first, track_sid="TR_v1", track_kind="video")
        await tell(handle, RoomEventKind.AVATAR_SILENT, first, detail="its audio track carried no packets for 8 s")
        await r.state_is(s, lambda st: st.avatar_identity not in (None, first) and st.status == "live",
                         "the replacement avatar")
        second = (await r.sessions.state(s.session_id)).avatar_identity
        await tell(handle, RoomEventKind.AVATAR_FIRST_FRAME, second, track_sid="TR_v2", track_kind="video")
        await r.state_is(s, lambda st: len(st.handoff.avatar_replacement_s) == 1, "the replacement timed")
        await r.sessions.end(s.session_id, "interview over")
        await handle.result()
        return handle
# ---- continue-as-new (v7): a long session switches runs carrying its state ---------------------------------------


async def _continuing_session(env: WorkflowEnvironment) -> tuple[Handle, list[str]]:
    """A monitored avatar session with a lowered threshold: room reports push it over, it continues as new, and
    then people come and go, the session is extended and ended in the new run. Returns the handle and its runs."""
    async with monitored_rig(env, StubWorld()) as r:
        r.continue_as_new_after = 40
        s = spec("continue-as-new", avatar={"avatar_id": AVATAR})
        handle = await r.sessions.start(s)
        await r.sessions.join_running(s.session_id, "cand")
        await tell(handle, RoomEventKind.PARTICIPANT_JOINED, "cand", sid="PA_1")
        await r.state_is(s, lambda st: st.status == "live" and any(b.started_at for b in st.avatar_billing),
                         "the avatar live")
        for n in range(30):
            await tell(handle, RoomEventKind.TRACK_PUBLISHED, "cand", track_sid=f"TR_{n}", track_kind="audio")
        await eventually(lambda: _runs(env.client, handle.id), what="the session to continue as new", timeout=30)
        await r.state_is(s, lambda st: len(st.tracks.get("cand", [])) == 30, "every report in the new run")
        await r.sessions.join_running(s.session_id, "panel")
        await tell(handle, RoomEventKind.PARTICIPANT_JOINED, "panel", sid="PA_2")
        await tell(handle, RoomEventKind.QUALITY_CHANGED, "cand", quality=ConnectionLevel.POOR, detail="loss 12.0%")
        await r.sessions.extend(s.session_id, timedelta(minutes=5))
        await r.sessions.end(s.session_id, "interview over")
        await handle.result()
        runs = await _runs(env.client, handle.id)
        assert runs is not None
        return handle, runs


async def _runs(client: Client, workflow_id: str) -> list[str] | None:
    """The run ids of the session so far, first to last, once there is more than one."""
    run_id = (await client.get_workflow_handle(workflow_id).describe()).run_id
    runs = [run_id]
    while True:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        run_id = history.events[0].workflow_execution_started_event_attributes.continued_execution_run_id
        if not run_id:
            return runs if len(runs) > 1 else None
        runs.insert(0, run_id)


async def continue_as_new(env: WorkflowEnvironment) -> Handle:
    """The first run of a session that continued as new: its history ends with the switch."""
    return await _one_run(env, first=True)


async def continued_as_new(env: WorkflowEnvironment) -> Handle:
    """The last run of a session that continued as new: it starts from the carried state and ends the session."""
    return await _one_run(env, first=False)


async def _one_run(like: WorkflowEnvironment, *, first: bool) -> Handle:
    """One run's history, fetched before its dev server goes (the handle returned reads it from memory)."""
    # The Java test server does not run a continued run's workflow tasks (its queries time out): record on the real one.
    async with dev_server(like.client.data_converter) as env:
        handle, runs = await _continuing_session(env)
        history = await env.client.get_workflow_handle(handle.id, run_id=runs[0 if first else -1]).fetch_history()
    return _RecordedRun(history)  # type: ignore[return-value]  # duck-typed: the recorder only fetches its history


@dataclass
class _RecordedRun:
    """Stands in for a handle whose server has gone: `fetch_history` gives the history kept."""

    history: WorkflowHistory

    async def fetch_history(self) -> WorkflowHistory:
        return self.history


SCENARIOS: dict[str, Callable[[WorkflowEnvironment], Awaitable[Handle]]] = {
    f.__name__: f
    for f in (
        interview_happy_path, coaching_happy_path, avatar_crash_and_replacement, avatar_rotation, participant_lost,
        no_show, max_duration, extend, end_during_avatar_start, cancel, terminate_live, worker_killed_mid_start,
        livekit_down, room_create_fails, cancel_after_end, consent_recording, consent_recording_refused,
        monitor_quality_and_tracks, monitor_room_lost, monitor_avatar_frozen, monitor_avatar_silent, join_with_start,
        continue_as_new, continued_as_new,
    )
}
