"""LiveAvatar side effects: create (no billing), start (billing starts), keep alive, stop.

The avatar joins our own LiveKit room in LITE mode with a token we mint (kind agent, publish + data). Every
failure is classified: auth and validation errors are final, rate limits wait for `Retry-After`, server errors
and unreachable service are retried by the activity's retry policy. Stopping is idempotent: an avatar session
that has already ended counts as stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TypeVar

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import never_final
from activities.liveavatar_client import (
    LiveAvatarAuthError,
    LiveAvatarClient,
    LiveAvatarConflict,
    LiveAvatarError,
    LiveAvatarInsufficientCredits,
    LiveAvatarNotFound,
    LiveAvatarRateLimited,
    LiveAvatarServerError,
    LiveAvatarValidationError,
)
from activities.livekit import LiveKitActivities, mint_token
from activities.reaper import owner_gone, session_workflow_statuses
from config.settings import Settings
from workflows.models import ROOM_PREFIX, AvatarCreated, AvatarRef, CreateAvatarInput, MintTokenInput, Released, StartAvatarInput

T = TypeVar("T")

# The avatar's LiveKit token outlives its avatar session by this much at most (the start comes a moment after
# the create): a longer one could bring the room back after the end (issue 9: it was 8 h 10 min).
AVATAR_TOKEN_GRACE = timedelta(minutes=2)
KEEPALIVE_EVERY = timedelta(seconds=30)  # LiveAvatar ends a session after 5 idle minutes; <= 60 s is the rule
HEARTBEAT_EVERY = timedelta(seconds=2)


def classify_liveavatar_error(exc: BaseException, what: str, *, final_500: bool = False) -> BaseException:
    """The error an activity raises for a failed LiveAvatar call.

    Final (non-retryable): bad credentials, invalid requests, no credits, and (with `final_500`, for start) a
    500, which there means a bad LiveKit config for the avatar. Retried: rate limits (after Retry-After),
    concurrency limits, other server errors, and an unreachable service.
    """
    if isinstance(exc, LiveAvatarRateLimited):
        delay = timedelta(seconds=exc.retry_after) if exc.retry_after else None
        return ApplicationError(f"LiveAvatar rate-limited {what}", type="LiveAvatarRateLimited", next_retry_delay=delay)
    if isinstance(exc, LiveAvatarAuthError):
        return ApplicationError(
            f"LiveAvatar refused the credentials to {what}: {exc} (check LIVEAVATAR_API_KEY)",
            type="LiveAvatarAuthError",
            non_retryable=True,
        )
    if isinstance(exc, LiveAvatarValidationError):
        return ApplicationError(f"LiveAvatar rejected the request to {what}: {exc}", type="LiveAvatarInvalid", non_retryable=True)
    if isinstance(exc, LiveAvatarInsufficientCredits):
        return ApplicationError(f"LiveAvatar has no credits to {what}: {exc}", type="LiveAvatarNoCredits", non_retryable=True)
    if isinstance(exc, LiveAvatarServerError):
        return ApplicationError(
            f"LiveAvatar failed to {what}: {exc}", type="LiveAvatarServerError", non_retryable=final_500 and exc.status == 500
        )
    if isinstance(exc, LiveAvatarError):
        return ApplicationError(f"LiveAvatar refused to {what}: {exc}", type=type(exc).__name__)
    if isinstance(exc, (httpx.TransportError, TimeoutError)):
        return ApplicationError(f"LiveAvatar unreachable while trying to {what}: {exc!r}", type="LiveAvatarUnavailable")
    return exc


async def _heartbeating(call: Awaitable[T]) -> T:
    """Await `call`, heartbeating every second meanwhile."""
    task = asyncio.ensure_future(call)
    try:
        while not task.done():
            activity.heartbeat()
            await asyncio.wait({task}, timeout=1.0)
        return task.result()
    finally:
        task.cancel()


class AvatarActivities:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[LiveAvatarClient]:
        async with LiveAvatarClient(
            base_url=self._settings.liveavatar_api_url,
            api_key=self._settings.liveavatar_api_key.get_secret_value(),
            timeout=self._settings.liveavatar_call_timeout_s,
        ) as client:
            yield client

    @activity.defn
    async def create_avatar_session(self, inp: CreateAvatarInput) -> AvatarCreated:
        """Step A: allocate a LiveAvatar session for our room. Nothing is billed until it is started."""
        token, _ = mint_token(
            self._settings,
            MintTokenInput(
                room=inp.room,
                identity=inp.identity,
                name="Avatar",
                role=None,
                ttl=timedelta(seconds=inp.max_session_duration_s) + AVATAR_TOKEN_GRACE,
            ),
        )
        async with self._client() as client:
            try:
                created = await client.create_session_token(
                    inp.avatar.avatar_id,
                    livekit_url=self._settings.livekit_url,
                    livekit_room=inp.room,
                    livekit_client_token=token,
                    max_session_duration=inp.max_session_duration_s,
                    is_sandbox=inp.avatar.is_sandbox,
                )
            except Exception as e:
                raise classify_liveavatar_error(e, "create an avatar session") from e
        activity.logger.info("avatar session created", extra={"avatar_session_id": created.session_id})
        return AvatarCreated(avatar_session_id=created.session_id, session_token=created.session_token)

    @activity.defn
    async def start_avatar_session(self, inp: StartAvatarInput) -> None:
        """Step B: start the avatar; it joins the room. Billing starts here.

        A 500 here usually means a bad LiveKit config for the avatar (reference/liveavatar-api.md §3.2): final.
        Heartbeats while the call runs, so a worker that dies mid-start is noticed within the heartbeat
        timeout and the retry (which finds the session already started) comes at once, not after the
        start-to-close timeout, while the avatar is already billing.
        """
        async with self._client() as client:
            try:
                await _heartbeating(client.start_session(inp.session_token))
            except LiveAvatarConflict:
                # Already started: an earlier attempt got through but its answer was lost. Same outcome.
                activity.logger.info("avatar was already started", extra={"avatar_session_id": inp.avatar_session_id})
            except Exception as e:
                raise classify_liveavatar_error(e, f"start avatar {inp.avatar_session_id}", final_500=True) from e
        activity.logger.info("avatar started", extra={"avatar_session_id": inp.avatar_session_id})

    @activity.defn
    async def keep_avatar_alive(self, ref: AvatarRef) -> None:
        """Keep the avatar session from idling out, until cancelled; fail when LiveAvatar says it has ended.

        Heartbeats often, so a cancel (session ending) or a lost worker is noticed within seconds. When the
        heartbeat finds the workflow gone (terminated: no cleanup of its own runs), it stops the avatar and
        deletes the room before giving up; never on worker shutdown.
        """
        async with self._client() as client:
            try:
                while True:
                    try:
                        await client.keep_alive(ref.avatar_session_id)
                        entry = await client.get_session(ref.avatar_session_id)
                    except LiveAvatarNotFound as e:
                        raise ApplicationError(
                            f"avatar session {ref.avatar_session_id} is gone: {e}", type="AvatarSessionEnded", non_retryable=True
                        ) from e
                    except Exception as e:
                        raise classify_liveavatar_error(e, f"keep avatar {ref.avatar_session_id} alive") from e
                    if entry.is_ended:
                        raise ApplicationError(
                            f"avatar session {ref.avatar_session_id} ended ({entry.end_reason})",
                            type="AvatarSessionEnded",
                            non_retryable=True,
                        )
                    for _ in range(int(KEEPALIVE_EVERY / HEARTBEAT_EVERY)):
                        activity.heartbeat()
                        await asyncio.sleep(HEARTBEAT_EVERY.total_seconds())
            except asyncio.CancelledError:
                details = activity.cancellation_details()
                # `not_found`: the workflow is gone (terminated, timed out) and no cleanup of its own will run.
                # Never on `worker_shutdown`: the session lives on and another worker picks this up.
                if details is not None and details.not_found and not details.worker_shutdown:
                    await self._release_for_gone_workflow(client, ref.avatar_session_id)
                raise

    async def _release_for_gone_workflow(self, client: LiveAvatarClient, avatar_session_id: str) -> None:
        """The keep-alive net: stop the avatar session and delete the room (named after the workflow id) of a
        session workflow that is gone, unless a run of it is still RUNNING (it continued as new).

        Best effort, each step on its own: what fails here is logged, and the reaper releases it later.
        """
        room = activity.info().workflow_id or ""
        context = {"avatar_session_id": avatar_session_id, "room": room}
        try:
            if not room.startswith(ROOM_PREFIX):
                return
            if not owner_gone(await session_workflow_statuses(activity.client(), room)):
                # This run closed but the session runs on (it continued as new; its new run keeps the avatar alive).
                activity.logger.info("keep-alive net: the session runs on in another run, released nothing", extra=context)
                return
        except Exception as e:
            activity.logger.warning(
                f"keep-alive net: could not confirm the workflow is gone, released nothing: {e}", extra=context
            )
            return
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("stop the avatar session", lambda: client.stop_session_confirmed(avatar_session_id)),
            ("delete the room", lambda: LiveKitActivities(self._settings).release_room(room)),
        ]
        for what, step in steps:
            try:
                await step()
            except Exception as e:
                activity.logger.warning(f"keep-alive net: could not {what}; the reaper will: {e}", extra=context)
            else:
                activity.logger.info("keep-alive net: released for a workflow that is gone", extra={**context, "step": what})

    @activity.defn
    async def stop_avatar_session(self, ref: AvatarRef) -> Released:
        """Stop the avatar session (API key + session id). Already ended or unknown counts as stopped.

        A cleanup step: it never gives up (see `never_final`).
        """
        async with self._client() as client:
            try:
                await client.stop_session_confirmed(ref.avatar_session_id)
            except Exception as e:
                raise never_final(classify_liveavatar_error(e, f"stop avatar {ref.avatar_session_id}")) from e
        activity.logger.info("avatar stopped", extra={"avatar_session_id": ref.avatar_session_id})
        return Released(resource="avatar session", id=ref.avatar_session_id)
