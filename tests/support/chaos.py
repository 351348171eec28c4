"""The chaos harness: a stack of our own, worker processes we can kill, and a judge of the world after each fault.

- :class:`ChaosStack` is a :class:`sandbox.stack.LocalStack` on shifted ports whose services get extra environment
  (short emulator timers, short reaper settings), so the suite never touches a stack on the default ports.
- :class:`WorkerPool` runs ``python -m workers`` subprocesses on the chaos task queue: start N, ``kill -9`` one
  (by Temporal worker identity, i.e. the one running a given activity), start a replacement, stop all.
- :class:`Scenario` drives the sessions of one test and then *checks the world until it settles*: LiveKit holds no
  room of the scenario's sessions, the emulator holds no active avatar session in those rooms (and none was ended by
  the vendor's own timers instead of by us), and every session closed the way the scenario expects. A background
  watcher timestamps, per session, when its last resource disappeared, for the "max release s" column.

Every wait is bounded and names what it waited for; ``Scenario.close`` always restores the stack (resumes paused
services, restarts killed ones, clears emulator faults, refills the worker pool) and force-releases whatever a
failed scenario left behind, so one failure does not bleed into the next scenario. Those teardown steps go on past a
failure of one of them, but every failure is recorded and ``close`` then fails naming what it could not restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from livekit import api, rtc
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.avatar import KEEPALIVE_EVERY
from config.settings import DEFAULT_AVATAR_ID, Settings
from sandbox.media import join_room
from sandbox.stack import REPO_ROOT, SERVICE_NAMES, LocalStack, StackPorts
from starters.client import SessionClient, TemporalUnavailable, Unavailable
from tests.support.polling import eventually
from tests.support.specs import interview
from workflows.models import AvatarStart, SessionOutcome, SessionSpec, SessionState

PORT_OFFSET = int(os.environ.get("SESSIONFLOW_CHAOS_PORT_OFFSET", "500"))
TASK_QUEUE = "chaos"
WORKERS = 2
# The keep-alive runs every KEEPALIVE_EVERY: the idle timeout must exceed it (plus a worker hand-over), or the
# emulator would expire healthy sessions. Short enough that the idle-expiry scenario stays around a minute.
IDLE_TIMEOUT_S = KEEPALIVE_EVERY.total_seconds() + 20
STACK_ENV = {
    "EMULATOR_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
    # Longer than any settle deadline: the vendor's own zombie reaper must not hide a leak of ours.
    "EMULATOR_ZOMBIE_REAP_S": "180",
    "EMULATOR_MAX_CONCURRENT_SESSIONS": "100",
    "SESSIONFLOW_REAPER_EVERY": "5",
    "SESSIONFLOW_REAPER_GRACE": "5",
    "SESSIONFLOW_LOG_FORMAT": "json",
}
# How LiveAvatar says "stopped by the API caller": anything else on a session we held was the vendor cleaning up.
RELEASED_BY_US = "USER_CLOSED"
POLL_S = 0.25
# Activities a session runs as local activities (workflow.patched("local-room-create")): no pending activity shows them.
LOCAL_ACTIVITIES = {"create_room"}
# What a service that is down, paused or restarting answers (LiveKit's server API is aiohttp, the emulator httpx).
LIVEKIT_DOWN = (aiohttp.ClientError, OSError, TimeoutError, api.ServerError)
EMULATOR_DOWN = (httpx.HTTPError,)
SUMMARY_FILE = REPO_ROOT / ".sessionflow" / "chaos-summary.md"


async def bounded(what: str, aw: Awaitable[Any], timeout: float) -> Any:
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)


# ---------------------------------------------------------------------------------------------------------------
# The stack and the workers


class ChaosStack(LocalStack):
    """A LocalStack whose services (and workers) also get ``extra_env``."""

    def __init__(self, *, extra_env: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.extra_env = dict(extra_env)

    def subprocess_env(self) -> dict[str, str]:
        return {**super().subprocess_env(), **self.extra_env}

    def settings(self) -> Settings:
        # Keyed by the variables' names (the fields' aliases), valued by their text, parsed as from the environment.
        values: dict[str, Any] = dict(self.env)
        return Settings(**values)

    @staticmethod
    def ports_for_chaos() -> StackPorts:
        return StackPorts().shifted(PORT_OFFSET)


@dataclass
class WorkerProc:
    n: int
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def identity(self) -> str:  # temporalio's default worker identity
        return f"{self.popen.pid}@{socket.gethostname()}"

    def alive(self) -> bool:
        return self.popen.poll() is None


class WorkerPool:
    """``python -m workers`` subprocesses on one task queue, each in its own process group."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        # Several workers on one host: none serves metrics (they would all want the stack's one metrics port).
        self.env = {**env, "SESSIONFLOW_TASK_QUEUE": TASK_QUEUE, "SESSIONFLOW_METRICS_PORT": "0"}
        self.log_dir = log_dir
        self.procs: list[WorkerProc] = []
        self.media: list[subprocess.Popen[bytes]] = []  # `python -m workers --media`: the room monitors
        self.kills = 0

    @property
    def alive(self) -> list[WorkerProc]:
        return [w for w in self.procs if w.alive()]

    async def start_one(self) -> WorkerProc:
        n = len(self.procs) + 1
        log_path = self.log_dir / f"worker-{n}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "workers"], cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        worker = WorkerProc(n, popen, log_path)
        self.procs.append(worker)

        async def started() -> bool:
            if not worker.alive():
                tail = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"worker {n} exited with {popen.returncode} while starting; log {log_path}:\n{tail}")
            return "worker started" in log_path.read_text(errors="replace")

        await eventually(started, what=f"worker {n} (pid {popen.pid}) to log 'worker started' ({log_path})", timeout=30)
        return worker

    async def ensure(self, count: int = WORKERS) -> None:
        while len(self.alive) < count:
            await self.start_one()

    def by_identity(self, identity: str) -> WorkerProc:
        for w in self.procs:
            if w.identity == identity:
                return w
        pytest.fail(f"no worker of the pool has identity {identity!r} (pool: {[w.identity for w in self.procs]})")

    async def kill9(self, worker: WorkerProc) -> None:
        """SIGKILL: no graceful shutdown, no activity cancellation, no goodbye to Temporal."""
        with contextlib.suppress(ProcessLookupError):  # it already died: the wait below still reaps it
            os.killpg(worker.popen.pid, signal.SIGKILL)
        await bounded(f"worker {worker.n} to die after SIGKILL", asyncio.to_thread(worker.popen.wait), 10)
        self.kills += 1

    async def start_media(self) -> subprocess.Popen[bytes]:
        """A media worker (room monitors) beside the pool, until `stop_media` (or `stop_all`)."""
        log_path = self.log_dir / f"media-{len(self.media) + 1}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "workers", "--media"], cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.media.append(popen)
        await eventually(lambda: "media worker started" in log_path.read_text(errors="replace"),
                         what=f"the media worker to start ({log_path})", timeout=30)
        return popen

    def stop_media(self) -> None:
        for popen in self.media:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()
        self.media.clear()

    def stop_all(self) -> None:
        """SIGTERM (graceful hand-over), then SIGKILL whatever is still there after 15 s."""
        self.stop_media()
        for w in self.alive:
            with contextlib.suppress(ProcessLookupError):  # exited since `alive` looked
                os.killpg(w.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for w in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):  # not gone after SIGTERM: the SIGKILL below
                w.popen.wait(max(deadline - time.monotonic(), 0.1))
            with contextlib.suppress(ProcessLookupError):  # its group is already gone
                os.killpg(w.popen.pid, signal.SIGKILL)
            w.popen.wait()


# ---------------------------------------------------------------------------------------------------------------
# The world: what LiveKit, the emulator and Temporal hold right now


@dataclass
class Snapshot:
    rooms: set[str] | None  # None: LiveKit did not answer
    avatars: list[dict[str, Any]] | None  # every emulator session (control view); None: no answer
    errors: list[str] = field(default_factory=list)  # why a service did not answer

    def active_avatars(self, room: str) -> list[dict[str, Any]]:
        return [a for a in self.avatars or [] if a["livekit_room"] == room and a["state"] == "active"]

    def holds(self, room: str) -> bool | None:
        """Does anything of session room ``room`` still exist? None when a service did not answer."""
        if self.rooms is None or self.avatars is None:
            return None
        return room in self.rooms or bool(self.active_avatars(room))


@dataclass
class ScenarioResult:
    nodeid: str
    name: str
    sessions: int = 0
    leaked_rooms: list[str] = field(default_factory=list)
    leaked_avatars: list[str] = field(default_factory=list)
    max_release_s: float | None = None
    release_s: dict[str, float | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    outcome: str = "?"  # set by the pytest report hook


RESULTS: list[ScenarioResult] = []
# The fields of a session's state that a failed wait shows.
_STATE_SHOWN = {"status", "avatar_session_id", "avatar_present", "avatar_fallback", "recoveries", "end_detail"}

_STATUS_NAMES: dict[WorkflowExecutionStatus | None, str] = {  # None: the server did not say
    WorkflowExecutionStatus.TERMINATED: "terminated",
    WorkflowExecutionStatus.CANCELED: "cancelled",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.TIMED_OUT: "timed_out",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "continued_as_new",
    WorkflowExecutionStatus.RUNNING: "running",
}


class Scenario:
    """One chaos scenario: its sessions, its participants, its faults, and the verdict on the world after."""

    def __init__(
        self, name: str, nodeid: str, stack: ChaosStack, workers: WorkerPool, client: SessionClient
    ) -> None:
        self.name, self.stack, self.workers, self.client = name, stack, workers, client
        self.settings = stack.settings()
        self.result = ScenarioResult(nodeid=nodeid, name=name)
        self.specs: dict[str, SessionSpec] = {}
        self.expected: dict[str, str] = {}  # session id -> "requested" | "terminated" | ...
        self.ended_at: dict[str, float] = {}  # when the end / terminate / fault was triggered
        self.released_at: dict[str, float] = {}  # when its room and avatars were first seen gone
        self.vendor_end_ok: dict[str, str] = {}  # avatar session id -> end reason the scenario itself caused
        self.rooms_seen: set[str] = set()  # sessions whose room the watcher saw in LiveKit at least once
        self._started = time.monotonic()
        self._settled = False
        self._exit = AsyncExitStack()
        self._tasks: list[asyncio.Task[Any]] = []
        self.http = httpx.AsyncClient(base_url=self.settings.liveavatar_api_url, timeout=5, trust_env=False)
        self.lk = api.LiveKitAPI(
            self.settings.livekit_http_url, self.settings.livekit_api_key,
            self.settings.livekit_api_secret.get_secret_value(),
        )
        self._watcher = asyncio.create_task(self._watch())

    # ---- sessions and participants

    def spec(self, *, immediately: bool = False, avatar: bool = True, **overrides: Any) -> SessionSpec:
        slug = "".join(c for c in self.name.lower() if c.isalnum())[:20]
        start = AvatarStart.IMMEDIATELY if immediately else AvatarStart.ON_FIRST_JOIN
        avatar_spec = {"avatar_id": DEFAULT_AVATAR_ID, "start": start.value}
        spec = interview(
            session_id=f"cx-{slug}-{uuid.uuid4().hex[:6]}", avatar=avatar_spec if avatar else None,
            deployment=self.settings.deployment, **overrides,
        )
        self.specs[spec.session_id] = spec
        self.result.sessions = len(self.specs)
        return spec

    async def start(self, spec: SessionSpec) -> None:
        await bounded(f"starting {spec.session_id}", self.client.start(spec), 20)

    async def join_human(self, spec: SessionSpec, *, publish_media: bool = True) -> rtc.Room:
        """Start the session if needed and put a real LiveKit participant ("cand") in its room until close()."""
        grant = await bounded(f"the join grant of {spec.session_id}", self.client.join(spec, "cand"), 60)
        return await bounded(
            f"'cand' to connect to {spec.room_name}",
            self._exit.enter_async_context(join_room(grant.url, grant.token, publish_media=publish_media)), 30,
        )

    async def state_when(
        self, spec: SessionSpec, what: str, ok: Callable[[SessionState], bool], timeout: float = 45
    ) -> SessionState:
        seen: list[SessionState] = []

        async def check() -> SessionState | None:
            state = await self.client.state(spec.session_id)
            seen[:] = [state]
            return state if ok(state) else None

        try:
            # No answer (an RPCError while the dev server restarts; the client's "safe to retry" errors for a query that
            # landed on a worker being killed) means "not yet", and is named if it was the last.
            return await eventually(check, what=f"{spec.session_id}: {what}", timeout=timeout, every=0.5,
                                    retry_on=(RPCError, Unavailable, TemporalUnavailable))
        except AssertionError as e:
            last = seen[-1].model_dump(include=_STATE_SHOWN) if seen else None
            raise AssertionError(f"{e}; last state seen: {last}") from None

    async def live_with_avatar(self, spec: SessionSpec, timeout: float = 45) -> SessionState:
        return await self.state_when(
            spec, "avatar in the room and no avatar problem",
            lambda s: s.avatar_present and s.avatar_session_id is not None and s.end_detail is None, timeout,
        )

    async def in_flight(self, spec: SessionSpec, activity: str, timeout: float = 30, *, not_on: str | None = None) -> str:
        """Wait until ``activity`` of the session is running on a worker (other than ``not_on``); its identity."""

        async def check() -> str | None:
            handle = self.client.handle(spec.session_id)
            desc = await handle.describe()
            for pa in desc.raw_description.pending_activities:
                if (
                    pa.activity_type.name == activity
                    and pa.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                    and pa.last_worker_identity != not_on
                ):
                    return pa.last_worker_identity
            if activity in LOCAL_ACTIVITIES:
                return await self._running_local(handle, not_on)
            return None

        where = f" on a worker other than {not_on}" if not_on else ""
        return await eventually(check, what=f"{spec.session_id}: {activity} running{where}", timeout=timeout, every=0.2)

    @staticmethod
    async def _running_local(handle: Any, not_on: str | None) -> str | None:
        """The worker running a local activity of the session that has not finished: one runs inside a workflow task
        (no pending activity to see), which the worker completes every ~8 s while it runs (the SDK's workflow task
        heartbeat, `force_create_new_workflow_task`) and keeps on its sticky queue. So: no local activity's marker
        since, and a workflow task completed by that worker, which holds the next one."""
        identity: str | None = None
        async for event in handle.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                identity = event.workflow_task_completed_event_attributes.identity
            elif event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED and (
                event.marker_recorded_event_attributes.marker_name == "core_local_activity"
            ):
                identity = None  # finished (the room created, or given up)
        return identity if identity and identity != not_on else None

    async def kill_worker_running(self, spec: SessionSpec, activity: str) -> str:
        """kill -9 the worker that runs ``activity`` of the session, then start a replacement. Its identity."""
        identity = await self.in_flight(spec, activity)
        await self.workers.kill9(self.workers.by_identity(identity))
        await self.workers.ensure()
        return identity

    def end_soon(self, spec: SessionSpec, reason: str = "chaos: end") -> asyncio.Task[SessionOutcome]:
        """Ask the session to end (the `end` update) in the background; the release clock starts now."""
        self.expected[spec.session_id] = "requested"
        self.ended_at.setdefault(spec.session_id, time.monotonic())
        task = asyncio.create_task(self.client.end(spec.session_id, reason))
        self._tasks.append(task)
        return task

    async def end(self, spec: SessionSpec, timeout: float = 60) -> SessionOutcome:
        return await self.ended(self.end_soon(spec), timeout)

    async def ended(self, ending: asyncio.Task[SessionOutcome], timeout: float = 60) -> SessionOutcome:
        """The result of an `end_soon`, bounded."""
        return await bounded("the end update to return", asyncio.shield(ending), timeout)

    async def terminate(self, spec: SessionSpec) -> None:
        """`temporal workflow terminate`: no workflow code runs, so no cleanup either."""
        self.expected[spec.session_id] = "terminated"
        self.ended_at.setdefault(spec.session_id, time.monotonic())
        await self.client.handle(spec.session_id).terminate(reason="chaos: terminate")

    # ---- faults

    async def emulator(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = await self.http.post(f"/_control/{path}", json=body or {})
        response.raise_for_status()
        return response.json()["data"]

    async def kill_service(self, name: str) -> None:
        await asyncio.to_thread(self.stack.kill, name)

    async def start_service(self, name: str) -> float:
        return await asyncio.to_thread(self.stack.start_again, name)

    def note(self, text: str) -> None:
        self.result.notes.append(text)

    # ---- the world

    async def snapshot(self) -> Snapshot:
        """What LiveKit and the emulator hold now. A service that is down (the fault under test, often) reads as None
        with the reason in ``errors``; any other exception is a harness or service bug and propagates."""
        rooms: set[str] | None = None
        avatars: list[dict[str, Any]] | None = None
        errors: list[str] = []
        try:
            async with asyncio.timeout(3):
                rooms = {r.name for r in (await self.lk.room.list_rooms(api.ListRoomsRequest())).rooms}
        except LIVEKIT_DOWN as e:
            errors.append(f"LiveKit ListRooms: {e!r}")
        try:
            response = await self.http.get("/_control/sessions")
            response.raise_for_status()
            avatars = response.json()["data"]["sessions"]
        except EMULATOR_DOWN as e:
            errors.append(f"emulator GET /_control/sessions: {e!r}")
        return Snapshot(rooms, avatars, errors)

    async def _watch(self) -> None:
        """Note every room seen (so a release is never judged on a room the harness could not see), and
        timestamp the moment each ended session's last resource is gone. If it dies, ``watcher_ok`` says why."""
        while True:
            if self.specs:
                snap = await self.snapshot()
                now = time.monotonic()
                for sid, spec in list(self.specs.items()):
                    if spec.room_name in (snap.rooms or set()):
                        self.rooms_seen.add(sid)
                    if sid in self.ended_at and sid not in self.released_at and snap.holds(spec.room_name) is False:
                        self.released_at[sid] = now
            await asyncio.sleep(POLL_S)  # the sampling period of a background recorder, not a wait for a condition

    def watcher_ok(self) -> bool:
        """True while the watcher runs; re-raises what killed it (its release times would silently stop)."""
        if self._watcher.done() and not self._watcher.cancelled():
            self._watcher.result()
            raise AssertionError("the harness's world watcher stopped")
        return True

    async def outcome(self, session_id: str) -> str:
        handle = self.client.handle(session_id)
        try:
            desc = await handle.describe()
        except RPCError as e:
            return f"unknown ({e.message})"
        if desc.status == WorkflowExecutionStatus.COMPLETED:
            return (await handle.result()).end_reason.value
        return _STATUS_NAMES.get(desc.status, str(desc.status))

    async def settle(self, timeout: float = 45) -> ScenarioResult:
        """Wait (bounded) until every session is released and closed, then judge: no leaked room, no leaked or
        vendor-expired avatar session, every session closed as expected. Fails with every problem found."""
        unended = sorted(set(self.specs) - set(self.ended_at))
        assert not unended, f"scenario bug: sessions never ended or terminated: {unended}"

        async def done() -> bool:
            if not self.watcher_ok() or set(self.released_at) != set(self.specs):
                return False
            outcomes = await asyncio.gather(*(self.outcome(sid) for sid in self.specs))
            return all(o != "running" for o in outcomes)

        try:
            await eventually(done, what="every session released and closed", timeout=timeout, every=0.5)
            timed_out = None
        except AssertionError as e:  # not a pass: the judge names what is left, and the timeout is added to its problems
            timed_out = str(e)
        await self._judge()
        self._settled = True
        problems = self.result.problems
        if timed_out and problems:
            problems.append(timed_out)
        elif timed_out:  # e.g. the watcher missed the release although the world is clean now: still a failure
            problems.append(f"{timed_out}; the world looks clean now, but no release was seen in time")
        assert not problems, f"{self.name}: " + "; ".join(problems)
        return self.result

    async def _judge(self) -> None:
        r = self.result
        snap = await self.snapshot()
        r.problems.clear()
        if snap.rooms is None or snap.avatars is None:
            r.problems.append(f"could not read the world: {'; '.join(snap.errors)}")
        for sid, spec in self.specs.items():
            got, want = await self.outcome(sid), self.expected.get(sid, "ended by the scenario (it failed first)")
            if got != want:
                r.problems.append(f"{sid} closed as {got!r}, expected {want!r}")
            if spec.room_name in (snap.rooms or set()):
                r.leaked_rooms.append(spec.room_name)
            for a in snap.avatars or []:
                if a["livekit_room"] != spec.room_name:
                    continue
                if a["state"] == "active" and got != "running":
                    r.leaked_avatars.append(f"{a['id']} (still active, billed, owner {got})")
                elif a["state"] == "ended" and a.get("end_reason") not in (RELEASED_BY_US, self.vendor_end_ok.get(a["id"])):
                    if a.get("duration", 0) > 0 or a.get("credits_consumed", 0) > 0:  # it was started: billed
                        r.leaked_avatars.append(
                            f"{a['id']} (billed, never stopped by us: the vendor ended it with {a.get('end_reason')})"
                        )
                    else:
                        r.notes.append(f"avatar session {a['id']} was created, never started (not billed), and "
                                       f"expired by the vendor ({a.get('end_reason')})")
            if sid not in self.rooms_seen:
                r.problems.append(f"the harness never saw room {spec.room_name} in LiveKit: its release proves nothing")
            released = self.released_at.get(sid)
            r.release_s[sid] = None if released is None else round(released - self.ended_at[sid], 2)
        if r.leaked_rooms:
            r.problems.append(f"leaked rooms: {r.leaked_rooms}")
        if r.leaked_avatars:
            r.problems.append(f"leaked avatar sessions: {r.leaked_avatars}")
        times = list(r.release_s.values())
        known = [t for t in times if t is not None]
        r.max_release_s = max(known) if known and len(known) == len(times) else None
        unreleased = [sid for sid, t in r.release_s.items() if t is None]
        if unreleased:
            r.problems.append(f"not released within the deadline: {unreleased}")

    # ---- always: put the world back

    async def close(self) -> None:
        """Put the world back for the next scenario. Each step runs even if an earlier one failed; every failure is
        recorded in the scenario's problems and, at the end, fails the test naming what could not be restored."""
        failures: list[str] = []

        async def step(what: str, aw: Awaitable[Any]) -> None:
            try:
                await aw
            except (Exception, pytest.fail.Exception) as e:
                failures.append(f"{what}: {e!r}")

        self.result.duration_s = round(time.monotonic() - self._started, 1)
        if not self._settled:  # the scenario failed before judging: record what it left (for the summary), then clean up
            for sid in self.specs:
                self.ended_at.setdefault(sid, time.monotonic())
            await step("restore the stack before judging a failed scenario", self.restore())
            await step("judge the world after a failed scenario", self._judge())
        RESULTS.append(self.result)
        self._watcher.cancel()
        await step("restore the stack", self.restore())
        for task in self._tasks:
            task.cancel()
        ended = await asyncio.gather(*self._tasks, return_exceptions=True)
        for result in ended:  # an `end` the scenario started but never awaited must not fail unseen
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                failures.append(f"an end update started by the scenario failed: {result!r}")
        watched = (await asyncio.gather(self._watcher, return_exceptions=True))[0]
        if isinstance(watched, BaseException) and not isinstance(watched, asyncio.CancelledError):
            failures.append(f"the world watcher died: {watched!r}")
        await step("force-release what the scenario left", self._force_release(failures))
        await step("the participants leave", asyncio.wait_for(self._exit.aclose(), 20))
        await self.lk.aclose()
        await self.http.aclose()
        if failures:
            self.result.problems.extend(f"teardown: {f}" for f in failures)
            raise AssertionError(f"{self.name}: teardown could not restore everything: " + "; ".join(failures))

    async def restore(self) -> None:
        for name in SERVICE_NAMES:
            running = any(s.name == name for s in self.stack.running)
            if running:
                self.stack.resume(name)
            else:
                await asyncio.to_thread(self.stack.start_again, name)
        await self.emulator("reset")
        await self.workers.ensure()

    async def _force_release(self, failures: list[str]) -> None:
        """Terminate what still runs, delete rooms and stop avatars the scenario left: the next one starts clean.
        Goes on past a failure, recording it in ``failures``."""
        for sid in self.specs:
            try:
                await self.client.handle(sid).terminate(reason="chaos: scenario teardown")
            except RPCError as e:
                if e.status is not RPCStatusCode.NOT_FOUND:  # not found: already closed, which is the point
                    failures.append(f"terminate {sid}: {e!r}")
        snap = await self.snapshot()
        if snap.errors:
            failures.append(f"could not see what to release: {'; '.join(snap.errors)}")
        for spec in self.specs.values():
            if spec.room_name in (snap.rooms or set()):
                try:
                    await self.lk.room.delete_room(api.DeleteRoomRequest(room=spec.room_name))
                except LIVEKIT_DOWN as e:
                    if not (isinstance(e, api.ServerError) and e.code == "not_found"):
                        failures.append(f"delete room {spec.room_name}: {e!r}")
            for a in snap.active_avatars(spec.room_name):
                try:
                    await self.emulator(f"sessions/{a['id']}/end", {"reason": RELEASED_BY_US})
                except EMULATOR_DOWN as e:
                    # 404: it ended meanwhile (its room was just deleted), which is what this step wants.
                    if not (isinstance(e, httpx.HTTPStatusError) and e.response.status_code == 404):
                        failures.append(f"end avatar session {a['id']}: {e!r}")


# ---------------------------------------------------------------------------------------------------------------
# The summary


def summary_table(results: list[ScenarioResult]) -> str:
    lines = [
        "| scenario | sessions | leaked rooms | leaked avatars | max release s | result |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        release = "—" if r.max_release_s is None else f"{r.max_release_s:.1f}"
        lines.append(
            f"| {r.name} | {r.sessions} | {len(r.leaked_rooms)} | {len(r.leaked_avatars)} | {release} | {r.outcome} |"
        )
    return "\n".join(lines)


def summary_details(results: list[ScenarioResult]) -> str:
    out: list[str] = []
    for r in results:
        out.append(f"- **{r.name}** ({r.duration_s:.0f} s, {r.outcome}); release s per session: "
                   + ", ".join(f"{sid}={t}" for sid, t in r.release_s.items()))
        out.extend(f"  - problem: {p}" for p in r.problems)
        out.extend(f"  - note: {n}" for n in r.notes)
    return "\n".join(out)
