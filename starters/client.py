"""SessionClient: how a Python backend drives sessions.

    async with SessionClient.connect() as sessions:
        grant = await sessions.join(spec, "cand-1")        # starts the session on the first call
        ...hand grant.url and grant.token to the participant's LiveKit client...
        outcome = await sessions.end(spec.session_id, "interview over")

Every failure a caller can cause comes back as a `SessionError` subclass with a message a person can act on;
input is validated before anything reaches Temporal, so bad input changes nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError
from temporalio.client import (
    Client,
    RPCTimeoutOrCancelledError,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from config.settings import Settings, get_settings
from workers.temporal import TemporalUnavailable, connect
from workflows.models import (
    ConsentRequest,
    EndRequest,
    ExtendRequest,
    JoinGrant,
    JoinRequest,
    SessionId,
    SessionOutcome,
    SessionSpec,
    SessionState,
    SessionStatus,
    workflow_id_for,
)
from workflows.search_attributes import DEPLOYMENT, PARTICIPANT_IDS, SESSION_ID, SESSION_KIND, SESSION_STATUS, participant_id
from workflows.session import CONTINUE_AS_NEW_MEMO, MEDIA_QUEUE_MEMO, SessionWorkflow


class SessionError(Exception):
    """Something the caller asked for cannot be done; the message says what and what to do."""


class InvalidInput(SessionError):
    pass


class UnknownParticipant(SessionError):
    pass


class SessionEnded(SessionError):
    pass


class SessionCancelled(SessionEnded):
    """The session was cancelled (the abort path) before or while the request was handled."""


class RoomFull(SessionError):
    pass


class ExtendBeyondCap(SessionError):
    pass


class SessionNotFound(SessionError):
    pass


class NotRecorded(SessionError):
    """Consent was given or withdrawn for a session that is not recorded."""


class SpecChanged(SessionError):
    """A join for a running session carried a different spec than the session was started with."""


class Unavailable(SessionError):
    """The session's workflow did not answer in time (no worker runs it, or its workflow task keeps failing);
    nothing was decided, so it is safe to retry. Temporal itself out of reach is `TemporalUnavailable`."""


# The workflow's typed refusals (`workflows.machine.Refusal.kind`) and the errors callers see for them.
_REFUSALS: dict[str, type[SessionError]] = {
    "UnknownParticipant": UnknownParticipant,
    "SessionEnded": SessionEnded,
    "SessionCancelled": SessionCancelled,
    "RoomFull": RoomFull,
    "ExtendBeyondCap": ExtendBeyondCap,
    "NotRecorded": NotRecorded,
    "SpecChanged": SpecChanged,
}
# The server's "Timeout expired" for a query or update that no worker picked up (Temporal itself answered: not an
# outage, see `_OUTAGE`).
_NO_ANSWER = {RPCStatusCode.CANCELLED}
_SESSION_ID = TypeAdapter(SessionId)
_CLOSED = {
    WorkflowExecutionStatus.COMPLETED: "ended",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.CANCELED: "was cancelled",
    WorkflowExecutionStatus.TERMINATED: "was terminated by an operator",
    WorkflowExecutionStatus.TIMED_OUT: "timed out",
}

T = TypeVar("T")
# How long a request keeps being retried while the session's workflow task is being retried ("not ready").
NOT_READY_RETRY = timedelta(seconds=10)


# The longest pause between two attempts of a retried request.
MAX_RETRY_BACKOFF = timedelta(seconds=1)
# How long a client trusts its list of sessions running under their pre-deployment names (`session-<id>`, no
# `Deployment` search attribute). A join consults the list instead of asking Temporal about each session id, so
# the normal join (no such session) costs no extra round trip; the list is read again at most this often.
OLDER_NAMED_REFRESH = timedelta(seconds=30)
OLDER_NAMED_QUERY = "WorkflowType = 'SessionWorkflow' AND ExecutionStatus = 'Running' AND Deployment IS NULL"
# What Temporal answers while one of its services is down or restarting: the frontend is unreachable (UNAVAILABLE,
# "tcp connect error"), or it cannot reach a history or matching host in time (UNAVAILABLE, DEADLINE_EXCEEDED),
# or its own limiter sheds load for a moment (RESOURCE_EXHAUSTED). The SDK gives each call about 10 s of its own
# retries before raising these.
_OUTAGE = {RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.RESOURCE_EXHAUSTED}


class _NotReady(Exception):
    """The server's transient "workflow not ready" answer."""


def _unavailable(error: RPCError | RPCTimeoutOrCancelledError) -> bool:
    """Whether `error` says Temporal could not be reached in time, rather than that it refused the request.

    The SDK turns an update whose RPC timed out into `WorkflowUpdateRPCTimeoutOrCancelledError`, and also one whose
    caller was cancelled: only the first is an outage (a cancelled caller's request must not be retried).
    """
    if isinstance(error, RPCError):
        return error.status in _OUTAGE
    return isinstance(error.__cause__, RPCError) and error.__cause__.status in _OUTAGE


def _reason(error: BaseException) -> str:
    """The last thing Temporal (or the connection to it) said, for the message of `TemporalUnavailable`."""
    rpc = error if isinstance(error, RPCError) else error.__cause__
    if isinstance(rpc, RPCError):
        return f"last error: {rpc.status.name if rpc.status else 'unknown'} {rpc.message}"
    return f"last error: {error!r}"


def _update_id(name: str) -> str:
    """One id per request: the server deduplicates a retried update by it."""
    return f"{name}-{uuid.uuid4()}"
M = TypeVar("M", bound=BaseModel)


def check_session_id(session_id: str) -> str:
    """`session_id` if it is well formed, else `InvalidInput` saying what a session id looks like."""
    try:
        return _SESSION_ID.validate_python(session_id, strict=True)
    except ValidationError:
        raise InvalidInput(
            f"session id {session_id!r} is not valid: use 3-64 characters of a-z, 0-9, '-' and '_', "
            "starting with a letter or digit"
        ) from None


def check_spec(spec: SessionSpec | dict[str, Any]) -> SessionSpec:
    """`spec` as a SessionSpec, else `InvalidInput` saying what is wrong: what `join` checks before anything is sent."""
    return _validated(SessionSpec, spec)


def check_join(spec: SessionSpec, identity: str) -> JoinRequest:
    """The join request for `identity`, refused (`UnknownParticipant`) unless they are on the roster, so a wrong
    identity never starts a session."""
    request = _validated(JoinRequest, {"identity": identity, "spec": spec})
    if spec.participant(request.identity) is None:
        raise UnknownParticipant(
            f"{identity!r} is not on the roster of session {spec.session_id!r}; "
            "add them to the session's participants when starting it"
        )
    return request


def check_extend(by: timedelta) -> ExtendRequest:
    return _validated(ExtendRequest, {"by": by})


def _validated(model: type[M], data: object) -> M:
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidInput(f"invalid {model.__name__}: {summarize(e)}") from None


def summarize(error: ValidationError, *, limit: int = 5) -> str:
    """Pydantic's errors on one line, each as `where: what` (the input itself is left out: it may be large or
    hold what the caller would not want in a log)."""
    parts = [f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in error.errors(include_url=False)]
    more = f"; and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


class SessionClient:
    def __init__(self, client: Client, settings: Settings, *, task_queue: str | None = None) -> None:
        self.client = client
        self.settings = settings
        self.task_queue = task_queue or settings.task_queue
        # Sessions found running under their pre-deployment id `session-<id>` (started by an older version).
        self._older_named: set[str] = set()
        self._older_named_running: set[str] = set()  # workflow ids, as visibility last listed them
        self._older_named_read_at: float | None = None  # loop time of that listing

    @classmethod
    async def connect(
        cls, settings: Settings | None = None, *, task_queue: str | None = None, wait: float = 0.0
    ) -> SessionClient:
        """A client of the configured Temporal. A backend that may start while Temporal restarts passes
        `wait=settings.temporal_retry_deadline_s`; the default fails at once with what to start (the CLI's case)."""
        settings = settings or get_settings()
        return cls(await connect(settings, wait=wait), settings, task_queue=task_queue)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        return None

    def handle(self, session_id: str) -> WorkflowHandle[SessionWorkflow, SessionOutcome]:
        return self.client.get_workflow_handle_for(SessionWorkflow.run, self.workflow_id(check_session_id(session_id)))

    def workflow_id(self, session_id: str) -> str:
        """The workflow id (and room name) of `session_id` in this client's deployment, or its older
        `session-<id>` once a call found the session under that name (started before deployments existed)."""
        if session_id in self._older_named:
            return workflow_id_for(session_id)
        return workflow_id_for(session_id, self.settings.deployment)

    async def _found_under_older_name(self, session_id: str) -> bool:
        """Whether a session of that id was started, by a version before deployments, as `session-<id>`; if so,
        later calls of this client go there."""
        try:
            await self.client.get_workflow_handle(workflow_id_for(session_id)).describe()
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        self._older_named.add(session_id)
        return True

    async def _running_under_older_name(self, session_id: str) -> bool:
        """Whether `session_id` runs under its pre-deployment name, from a listing of every such session read at
        most every OLDER_NAMED_REFRESH (one visibility call then, none in between); a session found once stays
        found. Only versions before deployments start such sessions, so the list only shrinks once they are gone."""
        if session_id in self._older_named:
            return True
        loop = asyncio.get_running_loop()
        read_at = self._older_named_read_at
        if read_at is None or loop.time() - read_at >= OLDER_NAMED_REFRESH.total_seconds():
            # Through `_call`: Temporal away or restarting gets the same retries and errors as the join itself.
            running = await self._call(session_id, self._list_older_named)
            self._older_named_running, self._older_named_read_at = running, loop.time()
        return workflow_id_for(session_id) in self._older_named_running

    async def _list_older_named(self) -> set[str]:
        return {execution.id async for execution in self.client.list_workflows(OLDER_NAMED_QUERY)}

    def _in_deployment(self, spec: SessionSpec) -> SessionSpec:
        """`spec` carrying this client's deployment, which names its workflow and room; another is refused."""
        if spec.deployment is None:
            return spec.model_copy(update={"deployment": self.settings.deployment})
        if spec.deployment != self.settings.deployment:
            raise InvalidInput(
                f"session {spec.session_id!r} names deployment {spec.deployment!r}, but this client runs deployment "
                f"{self.settings.deployment!r} (SESSIONFLOW_DEPLOYMENT); leave `deployment` out of the spec"
            )
        return spec

    async def join(self, spec: SessionSpec | dict[str, Any], identity: str) -> JoinGrant:
        """Start the session if it is not running yet, admit `identity` and return their grant.

        One call, idempotent per session: the first creates the workflow (update-with-start), later ones join
        the running session. A session that has ended never restarts under the same id.
        """
        given = check_spec(spec)
        if given.deployment is None and await self._running_under_older_name(given.session_id):
            # Started by a version before deployments: join that session (its spec has no deployment), never
            # start a second one under this deployment's name.
            self._older_named.add(given.session_id)
            older = check_join(given, identity)
            update_id = _update_id("join")
            return await self._call(
                given.session_id,
                lambda: self.handle(given.session_id).execute_update(SessionWorkflow.join, older, id=update_id),
            )
        # The spec as it runs (with this client's deployment): a join carries it, so a changed one is refused.
        spec = self._in_deployment(given)
        request = check_join(spec, identity)
        update_id = _update_id("join")
        return await self._call(
            spec.session_id,
            # The grant's type comes from `SessionWorkflow.join`'s annotation, as for every typed update. A retry
            # needs a fresh start operation (each is used once); the update id stays, so it is idempotent.
            lambda: self.client.execute_update_with_start_workflow(
                SessionWorkflow.join,
                request,
                id=update_id,
                start_workflow_operation=WithStartWorkflowOperation(SessionWorkflow.run, spec, **self._start_options(spec)),
            ),
        )

    async def join_running(self, session_id: str, identity: str) -> JoinGrant:
        """Admit `identity` to a session that is already running (started earlier by `start` or `join`)."""
        request = _validated(JoinRequest, {"identity": identity})
        update_id = _update_id("join")
        return await self._call(
            session_id, lambda: self.handle(session_id).execute_update(SessionWorkflow.join, request, id=update_id)
        )

    async def start(self, spec: SessionSpec | dict[str, Any]) -> WorkflowHandle[SessionWorkflow, SessionOutcome]:
        """Start the session ahead of its first join (the room is created now); a running one is left as is."""
        spec = self._in_deployment(_validated(SessionSpec, spec))
        return await self._call(
            spec.session_id, lambda: self.client.start_workflow(SessionWorkflow.run, spec, **self._start_options(spec))
        )

    def _start_options(self, spec: SessionSpec) -> dict[str, Any]:
        return {
            "id": spec.workflow_id,
            "task_queue": self.task_queue,
            # A running session is joined, never duplicated; an ended one never restarts under its id.
            "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
            "id_reuse_policy": WorkflowIDReusePolicy.REJECT_DUPLICATE,
            "search_attributes": TypedSearchAttributes(
                [
                    SearchAttributePair(SESSION_ID, spec.session_id),
                    SearchAttributePair(SESSION_KIND, spec.kind.value),
                    SearchAttributePair(SESSION_STATUS, SessionStatus.PROVISIONING.value),
                    SearchAttributePair(PARTICIPANT_IDS, self.participant_ids(p.identity for p in spec.participants)),
                    SearchAttributePair(DEPLOYMENT, self.settings.deployment),
                ]
            ),
            # The room monitor's task queue (read by the workflow, which has no settings of its own).
            "memo": self._memo(),
            "static_summary": _summary(spec),
            "static_details": _details(spec),
        }

    def _memo(self) -> dict[str, Any]:
        """What the workflow reads of this starter's settings (it has none of its own): the room monitor's task
        queue, and when a long session continues as new (none given: when the server suggests it)."""
        memo: dict[str, Any] = {MEDIA_QUEUE_MEMO: self.settings.media_task_queue}
        if self.settings.continue_as_new_after_events:
            memo[CONTINUE_AS_NEW_MEMO] = self.settings.continue_as_new_after_events
        return memo

    async def end(self, session_id: str, reason: str = "ended by request") -> SessionOutcome:
        """End the session; returns its outcome once its room and avatar are released.

        Idempotent: on a session that has already closed, returns the outcome it recorded.
        """
        request = _validated(EndRequest, {"reason": reason})
        try:
            update_id = _update_id("end")
            return await self._call(
                session_id, lambda: self.handle(session_id).execute_update(SessionWorkflow.end, request, id=update_id)
            )
        except SessionEnded:
            return await self.recorded_outcome(session_id)

    async def extend(self, session_id: str, by: timedelta) -> SessionState:
        request = check_extend(by)
        update_id = _update_id("extend")
        return await self._call(
            session_id, lambda: self.handle(session_id).execute_update(SessionWorkflow.extend, request, id=update_id)
        )

    async def consent(self, session_id: str, identity: str, granted: bool) -> SessionState:
        """`identity` grants (or withdraws) consent to record the session; returns the state with the recording
        as it now stands. Recording starts once everyone the spec's `recording` names has consented, and stops
        as soon as anyone withdraws. Refused with `UnknownParticipant` for someone not asked, `NotRecorded` for a
        session that is not recorded, `SessionEnded` once it has ended."""
        request = _validated(ConsentRequest, {"identity": identity, "granted": granted})
        update_id = _update_id("consent")
        return await self._call(
            session_id, lambda: self.handle(session_id).execute_update(SessionWorkflow.consent, request, id=update_id)
        )

    async def state(self, session_id: str) -> SessionState:
        return await self._call(session_id, lambda: self.handle(session_id).query(SessionWorkflow.state))

    async def outcome(self, session_id: str) -> SessionOutcome:
        """Wait for the session to close and return its outcome (`SessionEnded` if it closed without one)."""
        try:
            return await self._call(session_id, lambda: self.handle(session_id).result())
        except WorkflowFailureError:
            return await self.recorded_outcome(session_id)

    async def recorded_outcome(self, session_id: str) -> SessionOutcome:
        """The outcome a closed session recorded, whatever way it closed; `SessionEnded` when it has none (it
        was terminated, or closed before outcomes were recorded), `SessionNotFound` when there is no such session."""
        description = await self._call(session_id, lambda: self.handle(session_id).describe())
        memo = await description.memo()
        if "outcome" in memo:
            return SessionOutcome.model_validate(memo["outcome"])
        if description.status is WorkflowExecutionStatus.COMPLETED:
            return await self._call(session_id, lambda: self.handle(session_id).result())
        closed = _CLOSED.get(description.status) if description.status else None
        raise SessionEnded(f"session {session_id!r} {closed or 'is still running'} and recorded no outcome")

    async def _call(self, session_id: str, call: Callable[[], Awaitable[T]]) -> T:
        """Make one Temporal call for `session_id`, turning what Temporal raised into the error a caller can act on.

        Two transient answers make the same call again (a fresh attempt, the same update id, so the server
        deduplicates it and nothing happens twice), with a doubling backoff:
        - "workflow not ready" while the session's workflow task is being retried (for example a completion that
          lost a race with a new signal), for up to NOT_READY_RETRY;
        - Temporal unreachable or not answering (one of its services restarting: `_unavailable`), until
          `temporal_retry_deadline_s` after the call began; then `TemporalUnavailable`, safe to retry. Each attempt
          has the SDK's own retries (about 10 s) inside, so the error comes up to that much after the deadline.
        """
        loop = asyncio.get_running_loop()
        not_ready_until: float | None = None
        unavailable_until = loop.time() + self.settings.temporal_retry_deadline_s
        delay = 0.05
        while True:
            try:
                return await self._translated(session_id, call())
            except SessionNotFound:
                if session_id in self._older_named or not await self._found_under_older_name(session_id):
                    raise
                continue  # the same call, now to the session's older name
            except _NotReady:
                not_ready_until = not_ready_until or loop.time() + NOT_READY_RETRY.total_seconds()
                if loop.time() >= not_ready_until:
                    raise Unavailable(
                        f"session {session_id!r} did not accept the request for {NOT_READY_RETRY.total_seconds():g} s "
                        "(its workflow task keeps failing: see the Temporal UI); it is safe to retry"
                    ) from None
            except (RPCError, RPCTimeoutOrCancelledError) as e:
                if not _unavailable(e):
                    raise
                if loop.time() >= unavailable_until:
                    raise TemporalUnavailable(
                        f"Temporal at {self.settings.temporal_address} did not answer the request for session "
                        f"{session_id!r} within {self.settings.temporal_retry_deadline_s:g} s ({_reason(e)}); "
                        "it may or may not have taken effect, and it is safe to retry as is"
                    ) from e
            await asyncio.sleep(delay)  # backoff before the same call again
            delay = min(delay * 2, MAX_RETRY_BACKOFF.total_seconds())

    async def _translated(self, session_id: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except WorkflowUpdateFailedError as e:
            cause = e.cause
            if isinstance(cause, ApplicationError) and cause.type in _REFUSALS:
                raise _REFUSALS[cause.type](cause.message) from e
            raise
        except WorkflowAlreadyStartedError as e:
            raise SessionEnded(f"session {session_id!r} has ended; start a new session id") from e
        except RPCError as e:
            if e.status is RPCStatusCode.FAILED_PRECONDITION and any(
                d.type_url.endswith("WorkflowNotReadyFailure") for d in e.grpc_status.details
            ):
                raise _NotReady() from e
            if e.status in _NO_ANSWER:
                raise Unavailable(
                    f"no answer for session {session_id!r} ({e.message}): is a worker (`sessionflow worker`) "
                    f"polling task queue {self.task_queue!r}? It is safe to retry"
                ) from e
            if e.status not in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
                raise
            # An update or query to a closed session: say it has ended, never "not found".
            raise await self._closed_or_missing(session_id) from e

    async def _closed_or_missing(self, session_id: str) -> SessionError:
        try:
            description = await self.handle(session_id).describe()
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                return SessionNotFound(f"no session {session_id!r}: it was never started (or has been deleted)")
            raise
        closed = _CLOSED.get(description.status) if description.status else None
        if closed is None:
            return Unavailable(f"session {session_id!r} is running but did not answer; it is safe to retry")
        kind = SessionCancelled if description.status is WorkflowExecutionStatus.CANCELED else SessionEnded
        return kind(f"session {session_id!r} {closed}; start a new session id")

    def participant_ids(self, identities: Iterable[str]) -> list[str]:
        """The opaque ids (`ParticipantIds`) of `identities`, under this deployment's key."""
        key = self.settings.participant_id_key.get_secret_value().encode()
        return [participant_id(identity, key) for identity in identities]

    def ui_url(self, session_id: str) -> str:
        return (
            f"{self.settings.temporal_ui_url}/namespaces/{self.settings.temporal_namespace}"
            f"/workflows/{self.workflow_id(session_id)}"
        )


def _summary(spec: SessionSpec) -> str:
    avatar = " with avatar" if spec.avatar else ""
    return f"{spec.kind.value} {spec.session_id}{avatar}, {len(spec.participants)} on the roster"


def _details(spec: SessionSpec) -> str:
    roster = "\n".join(f"- `{p.identity}` ({p.role.value})" for p in spec.participants)
    return (
        f"**{spec.kind.value}** session `{spec.session_id}`, room `{spec.room_name}`\n\n"
        f"max duration {spec.max_duration}, cap {spec.max_duration_cap}, no-show after {spec.no_show_timeout}\n\n"
        f"roster:\n{roster}"
    )
