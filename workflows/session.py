"""SessionWorkflow: one durable workflow per live session.

An interpreter around `workflows.machine.SessionMachine`, which makes every decision. This class runs the
machine's commands (activities, search-attribute upserts, keep-alive cancels), turns what happened into
events and feeds them back, and keeps what support sees (current details, the `state` query) in step with
the machine. It decides nothing of its own.

Platform concerns are kept apart in `run`: the cleanup that a cancel cannot cut short, waiting for every
update handler before returning, and the rule that a bug fails the workflow task (visible in the UI, retried
after a fixed deploy) instead of hanging the session or failing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError, FailureError, is_cancelled_exception
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from workflows.machine import (
        AvatarCreated,
        AvatarCreateFailed,
        AvatarEnded,
        AvatarFirstFrame,
        AvatarFrozen,
        AvatarSilent,
        AvatarStarted,
        AvatarStartFailed,
        AvatarStopped,
        CancelKeepAlive,
        CancelMonitor,
        CancelRequested,
        CarriedSession,
        Command,
        Consent,
        CreateAvatarSession,
        CreateRoom,
        Deadline,
        DeleteRoom,
        EndRequested,
        Event,
        Extended,
        Failed,
        KeepAliveStopped,
        KeepAvatarAlive,
        MonitorStopped,
        ParticipantJoined,
        ParticipantLeft,
        PresenceObserved,
        PublishAvatarSessions,
        PublishStatus,
        QualityChanged,
        RecordingBegan,
        RecordingStartFailed,
        RecordingStopFailed,
        RecordingStopped,
        Refusal,
        RoomClosed,
        RoomCreated,
        RoomCreateFailed,
        RoomDeleted,
        RoomLost,
        SessionMachine,
        StartAvatarSession,
        StartMonitor,
        StartRecording,
        StopAvatarSession,
        StopRecording,
        TimerFired,
        TrackPublished,
        TrackUnpublished,
    )
    from workflows.metrics import SessionMetrics
    from workflows.models import (
        CONTINUE_AS_NEW_MIN_EVENTS,
        AvatarRef,
        ConsentRequest,
        EndReason,
        EndRequest,
        ExtendRequest,
        JoinGrant,
        JoinRequest,
        MonitorInput,
        RecordingStarted,
        RoomEvent,
        RoomEventKind,
        SessionOutcome,
        SessionSpec,
        SessionState,
        StartAvatarInput,
        StartRecordingInput,
    )
    from workflows.models import AvatarCreated as AvatarCreatedResult
    from workflows.search_attributes import (
        AVATAR_BILLED_SECONDS,
        AVATAR_SESSION_ID,
        SESSION_DEGRADED,
        SESSION_END_REASON,
        SESSION_STATUS,
    )

# Activity options. Cleanup retries forever: a session is not over until everything it holds is released.
QUICK = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=5), maximum_attempts=10)
FOREVER = RetryPolicy(initial_interval=timedelta(milliseconds=500), maximum_interval=timedelta(seconds=30), maximum_attempts=0)
# A recording start is tried twice: a server without egress (or one that refuses) leaves the session unrecorded.
RECORDING_START = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=2)
AVATAR_START = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10), maximum_attempts=3)
KEEPALIVE = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=15), maximum_attempts=0)
KEEPALIVE_HEARTBEAT = timedelta(seconds=10)

T = TypeVar("T")

# Patches: changes to what running sessions do. Each stays until no session that started before it runs.
PATCH_LATE_CANCEL_KEEPS_OUTCOME = "late-cancel-keeps-outcome"  # a cancel after the end no longer discards the outcome
PATCH_OUTCOME_MEMO = "outcome-memo"  # the outcome is kept in the memo, readable after any close
PATCH_LOCAL_TOKEN = "local-token"  # a join's token is minted by a local activity (one workflow task less)
PATCH_TOKEN_TTL_WITHIN_SESSION = "token-ttl-within-session"  # a participant's token expires by the hard cap + grace
# The status upsert also sets SessionDegraded, SessionEndReason and AvatarBilledSeconds.
PATCH_SUPPORT_SEARCH_ATTRIBUTES = "support-search-attributes"
PATCH_ROOM_MONITOR = "room-monitor"  # a room monitor (media task queue) reports tracks, quality, room loss
# The monitor also watches the avatar's audio (a silent avatar is replaced) and reports its first video frames.
PATCH_AVATAR_MEDIA_WATCH = "avatar-media-watch"
# The room is created by a local activity: a join (update-with-start) is answered in the session's first workflow task.
PATCH_LOCAL_ROOM_CREATE = "local-room-create"
PATCH_CONTINUE_AS_NEW = "continue-as-new"  # a long session continues as new, carrying its whole state

# The room monitor: its worker's death shows within this. Its task queue is the starter's choice (this memo key;
# an empty or missing one runs no monitor, e.g. time-skipping tests, where a long activity would stop the clock).
MONITOR_HEARTBEAT = timedelta(seconds=5)
MEDIA_QUEUE_MEMO = "media_task_queue"
# A session continues as new once its history has this many events (the starter's `continue_as_new_after_events`;
# missing or 0: only when the server suggests it, `limit.historyCount.suggestContinueAsNew` and the size limit).
CONTINUE_AS_NEW_MEMO = "continue_as_new_after"


class Bug(RuntimeError):
    """Workflow code raised something unexpected. Raised from the main coroutine, it fails the workflow task:
    the session pauses (visible in the UI as a task failure) and resumes once a fixed worker is deployed."""


@workflow.defn
class SessionWorkflow:
    @workflow.init
    def __init__(self, start: SessionSpec | CarriedSession) -> None:
        # A new session's spec, or (continue-as-new) the whole state of the run before, its spec included. One
        # argument either way: the SDK decodes by type hints only when their count matches the payloads'.
        self._carried = isinstance(start, CarriedSession)  # this run continued from an earlier one
        if isinstance(start, CarriedSession):
            self._machine = SessionMachine.carried(start)
        else:
            self._machine = SessionMachine(start, started_at=workflow.now())
        spec = self._spec = self._machine.spec
        self._keepalives: dict[str, asyncio.Task[None]] = {}  # avatar session id -> its keep-alive
        self._monitor: asyncio.Task[None] | None = None
        self._bug: BaseException | None = None
        self._metrics = SessionMetrics(spec.kind.value, self._machine)
        self._may_continue = False  # set in `_live`: sessions started before the patch never continue as new
        self._one_shots = 0  # one-shot activities in flight (room, avatar, recording): none at a switch

    # ---- the run: platform concerns --------------------------------------------------------------------------

    @workflow.run
    async def run(self, start: SessionSpec | CarriedSession) -> SessionOutcome:
        spec = self._spec
        try:
            await self._live()
            await self._until(lambda: self._machine.finished)
        except BaseException as e:
            # A cancel, or a real failure: release everything, then let it through so the workflow closes
            # CANCELED or FAILED. Anything else is a bug in this code: it fails only the workflow task, which
            # Temporal retries (after a fix), so no cleanup may run for it here.
            if not (isinstance(e, asyncio.CancelledError) or (isinstance(e, Exception) and workflow.is_failure_exception(e))):
                raise  # a bug, or the SDK tearing the instance down (GeneratorExit on eviction)
            cancelled = is_cancelled_exception(e)
            self._apply(CancelRequested(workflow.cancellation_reason()) if cancelled else Failed(_describe(e)))
            await self._cleanup_despite_cancel()
            # A cancel that came after the session had already ended (cleanup running) keeps its outcome.
            if not (
                cancelled
                and self._machine.end_reason is not EndReason.CANCELLED
                and workflow.patched(PATCH_LATE_CANCEL_KEEPS_OUTCOME)
            ):
                await self._close()
                raise
        await self._close()
        if self._machine.end_reason is EndReason.FAILED:
            ending = self._machine.ending
            assert ending is not None
            raise ApplicationError(
                f"session {spec.session_id} failed: {ending.detail}; its room and avatar were released",
                self._machine.outcome().model_dump(mode="json"),
                type="SessionFailed",
                non_retryable=True,
            )
        return self._machine.outcome()

    async def _live(self) -> None:
        """Run until the machine decides the session ends, waking it at each deadline it names; continue as
        new at the first quiet moment once the history is long."""
        if self._carried:
            # The room, the avatar sessions and their billing carry on as they were: only the watchers restart.
            self._may_continue = True
            self._execute(self._machine.resume())
        else:
            if workflow.patched(PATCH_ROOM_MONITOR) and self._media_task_queue():
                self._machine.enable_monitor()
                if workflow.patched(PATCH_AVATAR_MEDIA_WATCH):
                    self._machine.enable_avatar_media_watch()
            self._may_continue = workflow.patched(PATCH_CONTINUE_AS_NEW)
            self._execute(self._machine.begin())
        workflow.set_current_details(current_details(self._machine.state()))
        while not self._machine.ending:
            if self._ready_to_continue():
                self._continue_as_new()
            deadline = self._machine.next_deadline()
            assert deadline is not None
            timeout = max((deadline.at - workflow.now()).total_seconds(), 0.0)
            try:
                # Wake on the end, when the next deadline moved (an extend, a join), or at a moment to continue as
                # new; else when the deadline is due.
                await self._until(
                    self._ended_or_moved(deadline),
                    timeout=timedelta(seconds=timeout),
                    summary=deadline.name,
                )
            except TimeoutError:
                self._apply(TimerFired())

    def _ended_or_moved(self, deadline: Deadline) -> Callable[[], bool]:
        """The wait's condition for this `deadline` (bound here, not to the loop's variable)."""
        return lambda: self._machine.ending is not None or self._deadline_moved(deadline) or self._ready_to_continue()

    # ---- continue-as-new: a long session's history stays small ----------------------------------------------

    def _history_long(self) -> bool:
        """The server suggests continuing as new (history count or size), or the history passed the starter's
        threshold (memo `continue_as_new_after`)."""
        info = workflow.info()
        if info.is_continue_as_new_suggested():
            return True
        after = self._continue_as_new_after()
        return after > 0 and info.get_current_history_length() >= after

    @staticmethod
    def _continue_as_new_after() -> int:
        """The starter's threshold, never below CONTINUE_AS_NEW_MIN_EVENTS (0: none)."""
        value = workflow.memo_value(CONTINUE_AS_NEW_MEMO, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return 0
        return max(value, CONTINUE_AS_NEW_MIN_EVENTS)

    def _ready_to_continue(self) -> bool:
        """Time to continue as new, and a quiet moment to do it: no one-shot activity in flight (its answer would
        find no one), every update answered (an update still running would be lost with this run)."""
        return (
            self._may_continue
            and self._history_long()
            and self._one_shots == 0
            and self._machine.quiet
            and workflow.all_handlers_finished()
        )

    def _continue_as_new(self) -> NoReturn:
        """Close this run and start the next with the machine's whole state (the same workflow id, memo and
        search attributes). The keep-alives and the room monitor of this run are not cancelled: they find this
        run closed at their next heartbeat and stop without releasing anything (the session still runs, see
        `keep_avatar_alive`), while the next run starts its own. A signal that arrives meanwhile makes the server
        refuse this completion; the task runs again with the signal applied first, so nothing is lost."""
        carried = self._machine.carry()
        workflow.logger.info(
            "session continues as new",
            extra={"history_events": workflow.info().get_current_history_length(), "run": carried.runs},
        )
        workflow.continue_as_new(carried)

    def _deadline_moved(self, deadline: Deadline) -> bool:
        now = self._machine.next_deadline()
        return now is None or now.at != deadline.at

    async def _until(self, done: Callable[[], bool], *, timeout: timedelta | None = None, summary: str | None = None) -> None:
        """`workflow.wait_condition`, but a bug in any of the session's tasks surfaces here and fails the task."""
        await workflow.wait_condition(lambda: self._bug is not None or done(), timeout=timeout, timeout_summary=summary)
        if self._bug is not None:
            raise Bug(f"unexpected error in the session workflow: {self._bug!r}") from self._bug

    async def _cleanup_despite_cancel(self) -> None:
        """Wait until every resource is released. A cancel arriving meanwhile must not cut it short.

        The release activities run in their own tasks, which a workflow cancel does not touch; this wait is
        the only thing a cancel can interrupt, and we simply wait again before letting the cancel through.
        """
        try:
            await self._until(lambda: self._machine.finished)
        except asyncio.CancelledError:
            self._apply(CancelRequested(workflow.cancellation_reason()))
            await self._until(lambda: self._machine.finished)
            raise

    async def _close(self) -> None:
        """Let every update in flight get its answer, and keep the outcome where a closed session shows it."""
        try:
            await self._until(workflow.all_handlers_finished)
        except asyncio.CancelledError:
            # A cancel once everything is released: the handlers still get their answers, the outcome is kept.
            await self._until(workflow.all_handlers_finished)
            if not workflow.patched(PATCH_LATE_CANCEL_KEEPS_OUTCOME):
                raise
        if workflow.patched(PATCH_OUTCOME_MEMO):
            workflow.upsert_memo({"outcome": self._machine.outcome().model_dump(mode="json")})

    # ---- the interpreter: events in, commands out ------------------------------------------------------------

    def _apply(self, event: Event) -> None:
        self._execute(self._machine.handle(event, workflow.now()))
        # What the UI shows as current details, true after every event (not a command: nothing in history).
        workflow.set_current_details(current_details(self._machine.state()))

    def _execute(self, commands: list[Command]) -> None:
        self._metrics.saw(commands, self._machine)  # operators' figures (workflows/metrics.py); decides nothing
        for command in commands:
            match command:
                case PublishStatus():
                    workflow.upsert_search_attributes(_status_attributes(command))
                case PublishAvatarSessions(ids):
                    workflow.upsert_search_attributes([AVATAR_SESSION_ID.value_set(list(ids))])
                case CreateRoom(request):
                    # Same timeout and retries either way. As a local activity it runs inside the workflow task that
                    # asked for it (the first one: the join's update is answered there, with no round trip through
                    # the server); QUICK's backoffs (at most 5 s) stay under the local retry threshold (1 min), so
                    # every retry runs in the worker too, the workflow task kept open meanwhile. A worker lost in
                    # the middle re-runs it on the next (CreateRoom is idempotent by name); one that gives up leaves
                    # the room MAYBE, deleted as before.
                    self._spawn(self._run(
                        "create_room", request, f"create room {request.room}", RoomCreated, RoomCreateFailed,
                        start_to_close_timeout=timedelta(seconds=20), retry_policy=QUICK,
                        local=workflow.patched(PATCH_LOCAL_ROOM_CREATE),
                    ))
                case DeleteRoom(room):
                    self._spawn(self._run(
                        "delete_room", room, f"delete room {room}", RoomDeleted, None,
                        start_to_close_timeout=timedelta(seconds=20), retry_policy=FOREVER,
                    ))
                case CreateAvatarSession(request):
                    self._spawn(self._create_avatar(request))
                case StartAvatarSession(avatar_id, token):
                    self._spawn(self._run(
                        "start_avatar_session", StartAvatarInput(avatar_session_id=avatar_id, session_token=token),
                        f"start avatar {avatar_id} (billing starts)",
                        lambda: AvatarStarted(avatar_id), lambda detail: AvatarStartFailed(avatar_id, detail),
                        start_to_close_timeout=timedelta(seconds=60),
                        # Billing may have begun: a lost worker must be noticed in seconds, not after a minute.
                        heartbeat_timeout=timedelta(seconds=10), retry_policy=AVATAR_START,
                    ))
                case KeepAvatarAlive(avatar_id):
                    self._keepalives[avatar_id] = self._spawn(self._keep_alive(avatar_id))
                case CancelKeepAlive(avatar_id):
                    self._keepalives[avatar_id].cancel()
                case StartRecording(request):
                    self._spawn(self._start_recording(request))
                case StopRecording(egress_id):
                    self._spawn(self._run(
                        "stop_recording", egress_id, f"stop recording {egress_id}",
                        lambda: RecordingStopped(egress_id), lambda detail: RecordingStopFailed(egress_id, detail),
                        start_to_close_timeout=timedelta(seconds=20), retry_policy=QUICK,
                    ))
                case StopAvatarSession(avatar_id):
                    self._spawn(self._run(
                        "stop_avatar_session", AvatarRef(avatar_session_id=avatar_id), f"stop avatar {avatar_id}",
                        lambda: AvatarStopped(avatar_id), None,
                        start_to_close_timeout=timedelta(seconds=30), retry_policy=FOREVER,
                    ))
                case StartMonitor(request):
                    self._monitor = self._spawn(self._run_monitor(request))
                case CancelMonitor():
                    assert self._monitor is not None, "the machine cancels only a monitor it started"
                    self._monitor.cancel()

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        """Run `work` beside the main loop (a workflow cancel does not reach it; see `_cleanup_despite_cancel`).

        Anything it raises that is not turned into an event is a bug: kept, and raised by the main loop."""

        async def guarded() -> None:
            try:
                await work
            except BaseException as e:
                if self._bug is None:
                    self._bug = e

        return asyncio.get_running_loop().create_task(guarded())

    async def _run(
        self,
        activity: str,
        arg: object,
        summary: str,
        succeeded: Callable[[], Event],
        failed: Callable[[str], Event] | None,
        *,
        start_to_close_timeout: timedelta,
        retry_policy: RetryPolicy,
        heartbeat_timeout: timedelta | None = None,
        local: bool = False,
    ) -> None:
        """One activity for one command; its result goes back to the machine as an event. Cleanup steps
        (`failed` None) retry until they succeed: a failure reaching here is a bug. `local`: run it as a local
        activity (in this worker, inside the current workflow task; no heartbeat)."""
        self._one_shots += 1
        try:
            if local:
                await workflow.execute_local_activity(
                    activity,
                    arg,
                    summary=summary,
                    start_to_close_timeout=start_to_close_timeout,
                    retry_policy=retry_policy,
                )
            else:
                await workflow.execute_activity(
                    activity,
                    arg,
                    summary=summary,
                    start_to_close_timeout=start_to_close_timeout,
                    retry_policy=retry_policy,
                    heartbeat_timeout=heartbeat_timeout,  # None: the SDK's own default (no heartbeat)
                )
        except (ActivityError, FailureError) as e:
            # A local activity's failure may arrive as its own error (an `ApplicationError` of the activity, a
            # timeout), not wrapped in an `ActivityError`; anything else is not a failure of the call.
            if failed is None or not (isinstance(e, ActivityError) or local):
                raise
            self._one_shots -= 1
            self._apply(failed(_describe(e)))
            return
        self._one_shots -= 1
        self._apply(succeeded())

    async def _create_avatar(self, request: object) -> None:
        self._one_shots += 1
        try:
            created: AvatarCreatedResult = await workflow.execute_activity(
                "create_avatar_session",
                request,
                result_type=AvatarCreatedResult,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=QUICK,
                summary="create avatar session (token, not billed)",
            )
        except ActivityError as e:
            self._one_shots -= 1
            self._apply(AvatarCreateFailed(_describe(e)))
            return
        self._one_shots -= 1
        self._apply(AvatarCreated(created.avatar_session_id, created.session_token))

    async def _start_recording(self, request: StartRecordingInput) -> None:
        self._one_shots += 1
        try:
            started: RecordingStarted = await workflow.execute_activity(
                "start_recording",
                request,
                result_type=RecordingStarted,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RECORDING_START,
                summary=f"start recording room {request.room} (everyone consented)",
            )
        except ActivityError as e:
            # The activity's own message names the call and the server's answer; its causes only the plumbing.
            self._one_shots -= 1
            cause = e.cause
            self._apply(RecordingStartFailed(cause.message if isinstance(cause, ApplicationError) else _describe(e)))
            return
        self._one_shots -= 1
        self._apply(RecordingBegan(started.egress_id))

    async def _keep_alive(self, avatar_id: str) -> None:
        try:
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
        except asyncio.CancelledError:
            pass  # stopped on purpose (end, rotation, loss)
        except ActivityError as e:
            if not is_cancelled_exception(e):
                self._apply(AvatarEnded(avatar_id, _describe(e)))
                return
        finally:
            del self._keepalives[avatar_id]
        self._apply(KeepAliveStopped(avatar_id))

    @staticmethod
    def _media_task_queue() -> str:
        """Where the room monitor runs: the starter names it in the memo; none named, no monitor."""
        return str(workflow.memo_value(MEDIA_QUEUE_MEMO, ""))

    async def _run_monitor(self, request: MonitorInput) -> None:
        """The room monitor, on the media task queue, until cancelled. A dead media worker misses a heartbeat
        and the monitor is retried on another, resuming from its last heartbeat."""
        detail: str | None = None
        try:
            await workflow.execute_activity(
                "monitor_room",
                request,
                task_queue=self._media_task_queue(),
                start_to_close_timeout=self._spec.max_duration_cap + timedelta(minutes=10),
                heartbeat_timeout=MONITOR_HEARTBEAT,
                retry_policy=KEEPALIVE,
                # It only watches: the session never waits for it to leave (the room's deletion ends it anyway).
                cancellation_type=ActivityCancellationType.TRY_CANCEL,
                summary=f"monitor room {request.room}",
            )
            detail = "the monitor returned on its own"
        except asyncio.CancelledError:
            pass  # cancelled at the end
        except ActivityError as e:
            if not is_cancelled_exception(e):
                detail = _describe(e)
        self._apply(MonitorStopped(detail))

    # ---- updates, signals, queries ----------------------------------------------------------------------------

    @workflow.update
    async def join(self, request: JoinRequest) -> JoinGrant:
        """Admit a participant of the roster and hand back their grant, once the room exists."""
        await workflow.wait_condition(lambda: self._machine.join_decidable)
        # `now` starts the participant's connection clock; the token's lifetime is bounded by it only in sessions
        # that started after the bound existed.
        bounded = workflow.patched(PATCH_TOKEN_TTL_WITHIN_SESSION)
        token_request = self._ask(lambda: self._machine.admit(request.identity, workflow.now(), bounded_ttl=bounded))
        summary = f"token for {request.identity} ({token_request.role})"
        if workflow.patched(PATCH_LOCAL_TOKEN):
            # Signing a token is a few milliseconds of local work: as a local activity it runs inside this workflow
            # task, so the grant goes back without one more round trip through the server.
            local: JoinGrant = await workflow.execute_local_activity(
                "mint_participant_token",
                token_request,
                result_type=JoinGrant,
                start_to_close_timeout=timedelta(seconds=5),
                retry_policy=QUICK,
                summary=summary,
            )
            return local
        grant: JoinGrant = await workflow.execute_activity(
            "mint_participant_token",
            token_request,
            result_type=JoinGrant,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=QUICK,
            summary=summary,
        )
        return grant

    @join.validator
    def _validate_join(self, request: JoinRequest) -> None:
        _refuse_changed_spec(self._spec, request)
        self._ask(lambda: self._machine.check_join(request.identity))

    @workflow.update
    async def end(self, request: EndRequest) -> SessionOutcome:
        """End the session; returns its outcome once everything it held is released. Idempotent."""
        self._apply(EndRequested(request.reason))
        await workflow.wait_condition(lambda: self._machine.released)
        return self._machine.outcome()

    @workflow.update
    def extend(self, request: ExtendRequest) -> SessionState:
        """Push the session's end out, within its hard cap."""
        self._ask(lambda: self._apply(Extended(request.by)))
        return self._machine.state()

    @extend.validator
    def _validate_extend(self, request: ExtendRequest) -> None:
        self._ask(lambda: self._machine.check_extend(request.by))

    @workflow.update
    def consent(self, request: ConsentRequest) -> SessionState:
        """A participant grants or withdraws consent to record the session; the recording follows at once.

        No `workflow.patched` needed: only sessions whose spec has `recording` (a field no session started before
        it can hold) ever start or stop a recording, and sessions without it refuse this update in its validator.
        """
        self._ask(lambda: self._apply(Consent(request.identity, request.granted)))
        return self._machine.state()

    @consent.validator
    def _validate_consent(self, request: ConsentRequest) -> None:
        self._ask(lambda: self._machine.check_consent(request.identity))

    @workflow.signal
    def room_event(self, event: RoomEvent) -> None:
        """A room happening (LiveKit webhooks and the room monitor); the machine ignores duplicates and stale news."""
        match event.kind:
            case RoomEventKind.PARTICIPANT_JOINED if event.identity:
                self._apply(ParticipantJoined(event.identity, event.event_id, event.sid, event.at))
            case RoomEventKind.PARTICIPANT_LEFT if event.identity:
                self._apply(ParticipantLeft(event.identity, event.event_id, event.sid, event.at))
            case RoomEventKind.ROOM_FINISHED:
                self._apply(RoomClosed(event.event_id))
            case _:
                monitor_event = _monitor_event(event)
                if monitor_event is not None:
                    self._apply(monitor_event)

    @workflow.query
    def state(self) -> SessionState:
        return self._machine.state()

    @staticmethod
    def _ask(question: Callable[[], T]) -> T:
        """Run a machine call that may refuse; a refusal becomes the typed error the caller sees."""
        try:
            return question()
        except Refusal as r:
            _refuse(r)


def current_details(state: SessionState) -> str:
    """The session as support reads it in the Temporal UI, in Markdown."""
    lines = [
        f"**{state.status.value}** · room `{state.room}` · ends at {state.ends_at:%H:%M:%S} UTC",
        f"present: {', '.join(state.present) or 'nobody'}",
        f"avatar: {state.avatar_session_id or 'none'}{' (in the room)' if state.avatar_present else ''}",
    ]
    if state.reconnecting:
        lines.append(f"reconnecting: {', '.join(state.reconnecting)}")
    for why in state.degraded:
        detail = f" ({why.detail})" if why.detail else ""
        lines.append(f"connection {why.quality.value}: {why.identity} since {why.since:%H:%M:%S}{detail}")
    if state.avatar_fallback:
        lines.append("continuing without the avatar")
    if state.recoveries:
        lines.append("recoveries: " + "; ".join(state.recoveries[-5:]))
    if state.end_reason:
        lines.append(f"end: {state.end_reason.value}{f' ({state.end_detail})' if state.end_detail else ''}")
    elif state.end_detail:
        lines.append(f"problem: {state.end_detail}")
    return "\n\n".join(lines)


def _refuse_changed_spec(running: SessionSpec, request: JoinRequest) -> None:
    """A join that carries a spec must carry the running session's: the same session id with another roster,
    avatar or limits is a caller's mistake to be told about, not a change to apply or to ignore.

    Only the validator calls this: a rejected update leaves nothing in history, and validators do not run on
    replay, so adding this check changes no recorded history (no patch needed)."""
    if request.spec is not None and request.spec != running:
        changed = sorted(
            name for name in SessionSpec.model_fields if getattr(request.spec, name) != getattr(running, name)
        )
        raise ApplicationError(
            f"session {running.session_id!r} is running with a different spec (differs in: {', '.join(changed)}); "
            "join with the spec it was started with, or start a new session id",
            type="SpecChanged",
            non_retryable=True,
        )


def _status_attributes(command: PublishStatus) -> list[SearchAttributeUpdate[Any]]:
    """What a `PublishStatus` upserts. Sessions that started before the patch upsert only the status, as their
    histories recorded."""
    updates: list[SearchAttributeUpdate[Any]] = [SESSION_STATUS.value_set(command.status.value)]
    if workflow.patched(PATCH_SUPPORT_SEARCH_ATTRIBUTES):
        updates.append(SESSION_DEGRADED.value_set(command.ever_degraded))
        updates.append(AVATAR_BILLED_SECONDS.value_set(command.avatar_billed_seconds))
        if command.end_reason is not None:
            updates.append(SESSION_END_REASON.value_set(command.end_reason.value))
    return updates


def _monitor_event(event: RoomEvent) -> Event | None:
    """The machine event for one of the room monitor's signals (None: one that lacks what it needs)."""
    match event:
        case RoomEvent(kind=RoomEventKind.TRACK_PUBLISHED, identity=str(who), track_sid=str(track)):
            return TrackPublished(who, track, event.track_kind or "unknown", event.event_id)
        case RoomEvent(kind=RoomEventKind.TRACK_UNPUBLISHED, identity=str(who), track_sid=str(track)):
            return TrackUnpublished(who, track, event.event_id)
        case RoomEvent(kind=RoomEventKind.QUALITY_CHANGED, identity=str(who), quality=quality) if quality is not None:
            return QualityChanged(who, quality, event.detail, event.event_id)
        case RoomEvent(kind=RoomEventKind.AVATAR_FROZEN, identity=str(who)):
            return AvatarFrozen(who, event.detail or "no video frames", event.event_id)
        case RoomEvent(kind=RoomEventKind.AVATAR_SILENT, identity=str(who)):
            return AvatarSilent(who, event.detail or "no audio", event.event_id)
        case RoomEvent(kind=RoomEventKind.AVATAR_FIRST_FRAME, identity=str(who)):
            return AvatarFirstFrame(who, event.at, event.event_id)
        case RoomEvent(kind=RoomEventKind.ROOM_LOST):
            return RoomLost(event.detail or "the room vanished", event.event_id)
        case RoomEvent(kind=RoomEventKind.PRESENCE, present=list(present)):
            return PresenceObserved(tuple(present), event.at, event.event_id)
    return None


def _refuse(r: Refusal) -> NoReturn:
    raise ApplicationError(r.message, type=r.kind, non_retryable=True) from None


def _describe(e: BaseException) -> str:
    """The innermost message of an activity/child failure chain: what a person needs to read."""
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e) or type(e).__name__
