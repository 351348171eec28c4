"""SessionWorkflow: one durable workflow per live session.

The decisions live in `workflows.machine.SessionMachine`; this class is the shell around it. It turns the
machine's commands into activities and timers, feeds results, updates, signals and timers back in as events,
and keeps what support sees (the `SessionStatus` search attribute, current details, the `state` query) up to
date. Platform concerns, the shielded cleanup above all, are kept apart in `run`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, FailureError, is_cancelled_exception
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from workflows.machine import (
        AvatarLost,
        Held,
        AvatarRecorded,
        AvatarReleased,
        AvatarStarted,
        Command,
        CreateRoom,
        EndRequested,
        Event,
        Extended,
        JoinGranted,
        ParticipantJoined,
        ParticipantLeft,
        Refusal,
        ReleaseAvatar,
        ReleaseRoom,
        RoomClosed,
        RoomCreated,
        RoomCreateFailed,
        RoomReleased,
        SessionMachine,
        StartAvatar,
        StopAvatarWork,
        TimerFired,
    )
    from workflows.search_attributes import AVATAR_SESSION_ID, SESSION_STATUS
    from workflows.models import (
        AvatarCreated,
        AvatarRef,
        CreateAvatarInput,
        CreateRoomInput,
        EndReason,
        EndRequest,
        ExtendRequest,
        JoinGrant,
        JoinRequest,
        MintTokenInput,
        RoomEvent,
        RoomEventKind,
        SessionOutcome,
        SessionSpec,
        SessionState,
        SessionStatus,
        StartAvatarInput,
    )

PARTICIPANT_TOKEN_TTL = timedelta(minutes=15)  # LiveKit refreshes the token of a connected client
AVATAR_TOKEN_MARGIN = timedelta(minutes=10)
# LiveKit keeps the room this long after the last person leaves, on top of their reconnect grace.
DEPARTURE_MARGIN = timedelta(minutes=1)
SEEN_EVENT_IDS = 512  # room events are deduplicated over this many recent ids

# Activity options. Cleanup retries forever: a session is not over until everything it holds is released.
QUICK = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=5), maximum_attempts=10)
FOREVER = RetryPolicy(initial_interval=timedelta(milliseconds=500), maximum_interval=timedelta(seconds=30), maximum_attempts=0)
AVATAR_START = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10), maximum_attempts=3)
KEEPALIVE = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=15), maximum_attempts=0)
KEEPALIVE_HEARTBEAT = timedelta(seconds=10)


def _refusal_error(r: Refusal) -> ApplicationError:
    return ApplicationError(r.message, type=r.kind, non_retryable=True)


@workflow.defn
class SessionWorkflow:
    @workflow.init
    def __init__(self, spec: SessionSpec) -> None:
        self._spec = spec
        self._machine = SessionMachine(spec, started_at=workflow.now())
        self._seen_events: deque[str] = deque(maxlen=SEEN_EVENT_IDS)
        self._keepalives: dict[str, asyncio.Task[None]] = {}  # avatar session id -> its keep-alive
        self._starting: set[str] = set()  # avatar sessions whose start step is in flight
        self._stop_avatar_work = False

    # ---- the run: platform concerns --------------------------------------------------------------------------

    @workflow.run
    async def run(self, spec: SessionSpec) -> SessionOutcome:
        try:
            await self._live()
            await self._shielded_cleanup()
        except BaseException as e:
            # A cancel, or a real failure: release everything, then let it through so the workflow closes
            # CANCELED or FAILED. Anything else is a bug in this code: it fails only the workflow task, which
            # Temporal retries (after a fix), so no cleanup may run for it here.
            if not isinstance(e, (asyncio.CancelledError, FailureError)):
                raise
            cancelled = is_cancelled_exception(e)
            self._apply(
                EndRequested(
                    EndReason.CANCELLED if cancelled else EndReason.FAILED,
                    workflow.cancellation_reason() if cancelled else _describe(e),
                )
            )
            await self._shielded_cleanup()
            raise
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self._machine.end_reason is EndReason.FAILED:
            raise ApplicationError(
                f"session {spec.session_id} failed: {self._machine.end_detail}; its room and avatar were released",
                self._outcome().model_dump(mode="json"),
                type="SessionFailed",
                non_retryable=True,
            )
        return self._outcome()

    async def _live(self) -> None:
        self._execute(self._machine.begin())
        while not self._machine.ending:
            deadline = self._machine.next_deadline()
            assert deadline is not None
            timeout = max((deadline - workflow.now()).total_seconds(), 0.0)
            try:
                # Wake on the end, or when an `extend` moved the deadline; otherwise when the timer runs out.
                await workflow.wait_condition(
                    lambda: self._machine.ending or self._machine.next_deadline() != deadline,
                    timeout=timedelta(seconds=timeout),
                    timeout_summary="session timer",
                )
            except TimeoutError:
                self._apply(TimerFired())

    async def _shielded_cleanup(self) -> None:
        """Wait until every resource is released. A cancel arriving meanwhile must not cut it short.

        The release activities run in their own tasks, which a workflow cancel does not touch; this wait is
        the only thing a cancel can interrupt, and we simply wait again before letting the cancel through.
        """
        done = lambda: self._machine.closed and not self._keepalives  # noqa: E731
        try:
            await workflow.wait_condition(done)
        except asyncio.CancelledError:
            self._apply(EndRequested(EndReason.CANCELLED, workflow.cancellation_reason()))
            await workflow.wait_condition(done)
            raise

    # ---- turning events into decisions, and decisions into work ----------------------------------------------

    def _apply(self, event: Event) -> None:
        before = self._machine.status
        commands = self._machine.handle(event, workflow.now())
        if self._machine.status != before:
            self._publish_status()
        self._execute(commands)

    def _execute(self, commands: list[Command]) -> None:
        for command in commands:
            match command:
                case CreateRoom():
                    self._spawn(self._create_room())
                case StartAvatar(identity):
                    self._spawn(self._run_avatar(identity))
                case StopAvatarWork(None):
                    self._stop_avatar_work = True
                    for keepalive in self._keepalives.values():
                        keepalive.cancel()
                case StopAvatarWork(avatar_session_id):
                    if avatar_session_id in self._keepalives:
                        self._keepalives[avatar_session_id].cancel()
                case ReleaseAvatar(avatar_session_id):
                    self._spawn(self._release_avatar(avatar_session_id))
                case ReleaseRoom():
                    self._spawn(self._release_room())

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        """Run `coro` beside the main loop (a workflow cancel does not reach it; see `_shielded_cleanup`)."""
        asyncio.get_running_loop().create_task(self._guard(coro))

    async def _guard(self, coro) -> None:  # type: ignore[no-untyped-def]
        """Work that fails for good ends the session as failed (and then everything is released)."""
        try:
            await coro
        except FailureError as e:
            self._apply(EndRequested(EndReason.FAILED, _describe(e)))

    # ---- the work ---------------------------------------------------------------------------------------------

    async def _create_room(self) -> None:
        spec = self._spec
        try:
            await self._create_room_activity(spec)
        except FailureError:
            self._apply(RoomCreateFailed())
            raise
        self._apply(RoomCreated())

    async def _create_room_activity(self, spec: SessionSpec) -> None:
        await workflow.execute_activity(
            "create_room",
            CreateRoomInput(
                room=spec.room_name,
                workflow_id=spec.workflow_id,
                session_kind=spec.kind,
                max_participants=spec.room_capacity + 2,  # + the avatar and the room monitor
                empty_timeout_s=int((spec.no_show_timeout + timedelta(minutes=1)).total_seconds()),
                departure_timeout_s=int((spec.reconnect_grace + DEPARTURE_MARGIN).total_seconds()),
            ),
            start_to_close_timeout=timedelta(seconds=20),
            retry_policy=QUICK,
            # Wait for the activity to finish even when cancelled, so a cleanup never races a late create.
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"create room {spec.room_name}",
        )

    async def _run_avatar(self, identity: str) -> None:
        """One avatar session: step A (no billing) is recorded before step B (billing starts), then
        keep-alive until the session ends or the avatar is lost."""
        spec = self._spec
        assert spec.avatar is not None
        if self._stop_avatar_work:
            self._apply(AvatarLost(None, "not started: the session is ending"))
            return
        try:
            created: AvatarCreated = await workflow.execute_activity(
                "create_avatar_session",
                CreateAvatarInput(
                    session_id=spec.session_id,
                    room=spec.room_name,
                    identity=identity,
                    avatar=spec.avatar,
                    max_session_duration_s=int(self._machine.avatar_session_length(workflow.now()).total_seconds()),
                ),
                result_type=AvatarCreated,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=QUICK,
                summary="create avatar session (token, not billed)",
            )
        except FailureError as e:
            self._apply(AvatarLost(None, f"could not create the avatar session: {_describe(e)}"))
            return
        avatar_id = created.avatar_session_id
        self._starting.add(avatar_id)
        try:
            self._apply(AvatarRecorded(avatar_id))
            workflow.upsert_search_attributes([AVATAR_SESSION_ID.value_set(list(self._machine.avatars))])
            if self._stop_avatar_work:
                self._apply(AvatarLost(avatar_id, "not started: the session is ending"))
                return
            await workflow.execute_activity(
                "start_avatar_session",
                StartAvatarInput(avatar_session_id=avatar_id, session_token=created.session_token),
                start_to_close_timeout=timedelta(seconds=60),
                # Billing may have begun: a lost worker must be noticed in seconds, not after a minute.
                heartbeat_timeout=timedelta(seconds=10),
                retry_policy=AVATAR_START,
                summary=f"start avatar {avatar_id} (billing starts)",
            )
        except FailureError as e:
            self._apply(AvatarLost(avatar_id, f"the avatar did not start: {_describe(e)}"))
            return
        finally:
            self._starting.discard(avatar_id)
        self._apply(AvatarStarted(avatar_id))
        if self._stop_avatar_work or self._machine.avatars.get(avatar_id) is not Held.HELD:
            return
        keepalive = asyncio.get_running_loop().create_task(self._keep_avatar_alive(avatar_id))
        self._keepalives[avatar_id] = keepalive
        try:
            await keepalive
        except asyncio.CancelledError:
            return  # stopped on purpose (end, rotation, loss): the release takes it from here
        except FailureError as e:
            if not is_cancelled_exception(e):
                self._apply(AvatarLost(avatar_id, f"the avatar session ended: {_describe(e)}"))
        finally:
            del self._keepalives[avatar_id]

    async def _keep_avatar_alive(self, avatar_id: str) -> None:
        await workflow.execute_activity(
            "keep_avatar_alive",
            AvatarRef(avatar_session_id=avatar_id),
            start_to_close_timeout=self._spec.max_duration_cap + timedelta(minutes=10),
            heartbeat_timeout=KEEPALIVE_HEARTBEAT,
            retry_policy=KEEPALIVE,
            # The session waits for the keep-alive to acknowledge its cancel before closing, so a keep-alive
            # never outlives its session (and never mistakes a normal end for a vanished workflow).
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"keep avatar {avatar_id} alive",
        )

    async def _release_avatar(self, avatar_id: str) -> None:
        # Let an in-flight start finish first: stopping a session mid-start could leave it billing.
        await workflow.wait_condition(lambda: avatar_id not in self._starting)
        await workflow.execute_activity(
            "stop_avatar_session",
            AvatarRef(avatar_session_id=avatar_id),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=FOREVER,
            summary=f"stop avatar {avatar_id}",
        )
        self._apply(AvatarReleased(avatar_id))

    async def _release_room(self) -> None:
        # Delete only after any create has landed, so a late create can never follow our delete.
        await workflow.wait_condition(lambda: not self._machine.room_creating)
        await workflow.execute_activity(
            "delete_room",
            self._spec.room_name,
            start_to_close_timeout=timedelta(seconds=20),
            retry_policy=FOREVER,
            summary=f"delete room {self._spec.room_name}",
        )
        self._apply(RoomReleased())

    # ---- updates, signals, queries ----------------------------------------------------------------------------

    @workflow.update
    async def join(self, request: JoinRequest) -> JoinGrant:
        """Admit a participant of the roster and hand back their grant, once the room exists."""
        await workflow.wait_condition(lambda: self._machine.room_ready or self._machine.ending)
        try:
            self._machine.check_join(request.identity)
        except Refusal as r:
            raise _refusal_error(r) from None
        self._apply(JoinGranted(request.identity))
        participant = self._spec.participant(request.identity)
        assert participant is not None
        return await workflow.execute_activity(
            "mint_participant_token",
            MintTokenInput(
                room=self._spec.room_name,
                identity=participant.identity,
                name=participant.name,
                role=participant.role,
                ttl=PARTICIPANT_TOKEN_TTL,
            ),
            result_type=JoinGrant,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=QUICK,
            summary=f"token for {participant.identity} ({participant.role.value})",
        )

    @join.validator
    def _validate_join(self, request: JoinRequest) -> None:
        try:
            self._machine.check_join(request.identity)
        except Refusal as r:
            raise _refusal_error(r) from None

    @workflow.update
    async def end(self, request: EndRequest) -> SessionState:
        """End the session; returns once everything it held is released."""
        self._apply(EndRequested(EndReason.REQUESTED, request.reason))
        await workflow.wait_condition(lambda: self._machine.closed)
        return self._state()

    @workflow.update
    def extend(self, request: ExtendRequest) -> SessionState:
        """Push the session's end out, within its hard cap."""
        try:
            self._apply(Extended(request.by))
        except Refusal as r:
            raise _refusal_error(r) from None
        return self._state()

    @extend.validator
    def _validate_extend(self, request: ExtendRequest) -> None:
        try:
            self._machine.check_extend(request.by)
        except Refusal as r:
            raise _refusal_error(r) from None

    @workflow.signal
    def room_event(self, event: RoomEvent) -> None:
        """A room happening from the LiveKit webhook receiver; duplicates are ignored."""
        if event.event_id in self._seen_events:
            return
        self._seen_events.append(event.event_id)
        match event.kind:
            case RoomEventKind.PARTICIPANT_JOINED if event.identity:
                self._apply(ParticipantJoined(event.identity))
            case RoomEventKind.PARTICIPANT_LEFT if event.identity:
                self._apply(ParticipantLeft(event.identity))
            case RoomEventKind.ROOM_FINISHED:
                self._apply(RoomClosed())

    @workflow.query
    def state(self) -> SessionState:
        return self._state()

    # ---- what support sees -------------------------------------------------------------------------------------

    def _state(self) -> SessionState:
        m = self._machine
        return SessionState(
            session_id=self._spec.session_id,
            kind=self._spec.kind,
            status=m.status,
            room=self._spec.room_name,
            started_at=m.started_at,
            ends_at=m.deadline,
            present=sorted(m.present),
            admitted=sorted(m.admitted),
            avatar_session_id=m.avatar_session_id,
            avatar_identity=m.avatar_identity,
            avatar_present=m.avatar_present,
            avatar_fallback=m.avatar_fallback,
            reconnecting=sorted(m.reconnect_by),
            recoveries=list(m.recoveries),
            end_reason=m.end_reason,
            end_detail=m.end_detail or m.avatar_problem,
        )

    def _publish_status(self) -> None:
        m = self._machine
        workflow.upsert_search_attributes([SESSION_STATUS.value_set(m.status.value)])
        lines = [
            f"**{m.status.value}** · room `{self._spec.room_name}`",
            f"present: {', '.join(sorted(m.present)) or 'nobody'}",
            f"avatar: {m.avatar_session_id or 'none'}{' (in room)' if m.avatar_present else ''}",
        ]
        if m.reconnect_by:
            lines.append(f"reconnecting: {', '.join(sorted(m.reconnect_by))}")
        if m.avatar_problem:
            lines.append(f"avatar problem: {m.avatar_problem}{' (continuing without it)' if m.avatar_fallback else ''}")
        if m.recoveries:
            lines.append("recoveries: " + "; ".join(m.recoveries[-5:]))
        if m.end_reason:
            lines.append(f"end: {m.end_reason.value}{f' ({m.end_detail})' if m.end_detail else ''}")
        workflow.set_current_details("\n\n".join(lines))

    def _outcome(self) -> SessionOutcome:
        m = self._machine
        assert m.end_reason is not None and m.ended_at is not None
        return SessionOutcome(
            session_id=self._spec.session_id,
            status=m.status,
            end_reason=m.end_reason,
            end_detail=m.end_detail,
            started_at=m.started_at,
            ended_at=m.ended_at,
            live_seconds=m.live_seconds,
            avatar_sessions=list(m.avatars),
            avatar_seconds=m.avatar_seconds,
            avatar_fallback=m.avatar_fallback,
            recoveries=list(m.recoveries),
            participants_joined=list(m.joined),
        )


def _describe(e: BaseException) -> str:
    """The innermost message of an activity/child failure chain: what a person needs to read."""
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e) or type(e).__name__
