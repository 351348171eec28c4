"""The reaper: release LiveKit rooms and LiveAvatar sessions of ours that no running session workflow owns.

Termination, timeouts and workflow-task bugs run no workflow code, so nothing releases what such a session
held (DESIGN.md, "What catches what the workflow cannot see"). The LiveKit project and the LiveAvatar account
may be shared with other apps and other deployments, so the reaper touches only what it can prove is ours:

- a room is ours when its name has this deployment's prefix (`session-<deployment>-`, settings
  `SESSIONFLOW_DEPLOYMENT`); it belongs to the workflow with that id (the room name *is* the workflow id).
  With our prefix and no workflow at all, it is still ours: a session's room re-created after the end by a
  still-valid token (LiveKit auto-creates rooms on join) looks exactly like that once history is gone;
- an avatar session is ours only when a workflow of this namespace recorded it in its `AvatarSessionId`
  search attribute; one nobody here recorded is another app's, and is never stopped.

Anything of ours whose owner is not RUNNING and that is older than the grace period is released. An owner
that cannot be looked up is never assumed gone: the item is reported as an error and the next sweep tries
again. The owner check (`owner_gone`) is shared with the keep-alive net in `activities.avatar`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.liveavatar_client import LiveAvatarClient, LiveAvatarRateLimited, SessionEntry
from activities.livekit import LiveKitActivities
from activities.metrics import count_reaped
from config.settings import Settings
from workflows.models import deployment_prefix
from workflows.reaper_models import ReapReport, ReapRequest

# The search attribute the session workflow records its avatar session id in (workflows.search_attributes.AVATAR_SESSION_ID;
# named here so activities stay free of workflow code; a unit test keeps the two equal).
AVATAR_SESSION_ID_ATTRIBUTE = "AvatarSessionId"
# Only canonical UUIDs ever reach a visibility query (LiveAvatar session ids are UUIDs, §3.5).
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

LIVEAVATAR_PAGE_SIZE = 100
LIVEAVATAR_MAX_PAGES = 100  # 10 000 active sessions; a listing that never ends must not hold the sweep forever
# LiveAvatar limits calls per caller x endpoint in fixed 1-second windows (reference/liveavatar-api.md §2); the
# reaper stays well under any plausible budget so that live sessions' calls are never starved by it.
LIVEAVATAR_CALLS_PER_WINDOW = 5
OWNER_LOOKUP_TIMEOUT = timedelta(seconds=10)
OWNER_LOOKUP_LIMIT = 10  # runs claiming one avatar session: normally one

OwnerStatus = WorkflowExecutionStatus | None


class SuspiciousId(ValueError):
    """An id from outside that does not look like one; it is never used in a query."""


def avatar_owner_query(avatar_session_id: str) -> str:
    """The visibility query for the workflows that recorded `avatar_session_id`.

    Injection-safe: only a canonical UUID (hex digits and hyphens, nothing else) is accepted and quoted;
    anything else raises `SuspiciousId`.
    """
    if not isinstance(avatar_session_id, str) or not _UUID.fullmatch(avatar_session_id):
        raise SuspiciousId(f"avatar session id {avatar_session_id!r} is not a UUID; it is not put in a visibility query")
    return f'{AVATAR_SESSION_ID_ATTRIBUTE} = "{avatar_session_id}"'


def owner_gone(statuses: Iterable[OwnerStatus]) -> bool:
    """True when none of the workflows that own a resource is RUNNING; no owner at all counts as gone."""
    return not any(status is WorkflowExecutionStatus.RUNNING for status in statuses)


async def session_workflow_statuses(client: Client, workflow_id: str) -> list[OwnerStatus]:
    """The status of the latest run of `workflow_id` (so a session that continued as new is RUNNING);
    empty when there is no such workflow. Other failures propagate: an unknown owner is not a gone owner."""
    try:
        description = await client.get_workflow_handle(workflow_id).describe(rpc_timeout=OWNER_LOOKUP_TIMEOUT)
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return []
        raise
    return [description.status]


async def avatar_owner_statuses(client: Client, avatar_session_id: str) -> list[OwnerStatus]:
    """The statuses of the workflows whose `AvatarSessionId` is `avatar_session_id` (raises `SuspiciousId`)."""
    query = avatar_owner_query(avatar_session_id)
    return [
        execution.status
        async for execution in client.list_workflows(query, limit=OWNER_LOOKUP_LIMIT, rpc_timeout=OWNER_LOOKUP_TIMEOUT)
    ]


class Verdict(StrEnum):
    OWNED = "owned"
    YOUNG = "young"  # unowned, but may still be on its way to being recorded by its workflow
    ORPHAN = "orphan"
    NOT_OURS = "not ours"  # no workflow of ours ever recorded it: another app's or another namespace's


def verdict(
    owners: Iterable[OwnerStatus], age_s: float | None, grace_s: float, *, needs_recorded_owner: bool = False
) -> Verdict:
    """What to do with one resource. Unknown age counts as old: an avatar we cannot date still bills.

    `needs_recorded_owner`: the resource is ours only if some workflow recorded it (avatar sessions); without
    it, the resource's name already proved it ours (rooms with our prefix) and no owner at all means gone.
    """
    owners = list(owners)
    if needs_recorded_owner and not owners:
        return Verdict.NOT_OURS
    if not owner_gone(owners):
        return Verdict.OWNED
    if age_s is not None and age_s < grace_s:
        return Verdict.YOUNG
    return Verdict.ORPHAN


class Pacer:
    """At most `per_window` calls in each fixed 1-second window, and none before a `Retry-After` has passed."""

    def __init__(self, per_window: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_window = per_window
        self._clock = clock
        self._window = 0
        self._used = 0
        self._not_before = 0.0

    async def wait(self) -> None:
        """Return when the next call may go out."""
        now = self._clock()
        if now < self._not_before:
            await asyncio.sleep(self._not_before - now)
            now = self._clock()
        window = int(now)
        if window != self._window:
            self._window, self._used = window, 0
        if self._used >= self._per_window:
            await asyncio.sleep(window + 1 - now)
            self._window, self._used = window + 1, 0
        self._used += 1

    def hold_off(self, seconds: float) -> None:
        """The server said 429: send nothing for `seconds`."""
        self._not_before = max(self._not_before, self._clock() + seconds)


@dataclass(frozen=True)
class _Candidate:
    """One room or avatar session the sweep looks at."""

    kind: str  # "room" | "avatar session": how logs and errors name it
    name: str
    age_s: float | None
    owners: Callable[[], Awaitable[list[OwnerStatus]]]
    release: Callable[[], Awaitable[object]]
    released: list[str]  # the report's list it goes into once released
    needs_recorded_owner: bool = False  # see `verdict`


class ReaperActivities:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._livekit = LiveKitActivities(settings)

    @activity.defn
    async def reap_orphans(self, req: ReapRequest) -> ReapReport:
        """Release every room and avatar session that no RUNNING workflow owns and that is older than
        `req.grace_seconds`; with `req.dry_run`, release nothing and report what would be released.

        Never fails for one bad item: each failure becomes a line in `errors` and the next sweep retries.
        Heartbeats between items, so a cancel or a lost worker is noticed.
        """
        report = ReapReport(dry_run=req.dry_run)
        client = activity.client()
        await self._reap_rooms(client, req, report)
        await self._reap_avatars(client, req, report)
        activity.logger.info(
            "reap finished",
            extra={
                "dry_run": req.dry_run,
                "rooms_seen": report.rooms_seen,
                "rooms_released": len(report.rooms_released),
                "avatars_seen": report.avatars_seen,
                "avatars_released": len(report.avatars_released),
                "rooms_not_ours": report.rooms_not_ours,
                "avatars_not_ours": report.avatars_not_ours,
                "skipped_young": len(report.skipped_young),
                "errors": len(report.errors),
            },
        )
        count_reaped(report)
        return report

    async def _reap_rooms(self, client: Client, req: ReapRequest, report: ReapReport) -> None:
        try:
            rooms = await self._livekit.list_rooms()
        except Exception as e:
            _failed(report, f"could not list LiveKit rooms: {e}")
            return
        now = time.time()
        ours = deployment_prefix(self._settings.deployment)
        for room in rooms:
            if not room.name.startswith(ours):
                report.rooms_not_ours += 1  # another app's, or another deployment's: never judged
                continue
            report.rooms_seen += 1
            await self._consider(
                _Candidate(
                    kind="room",
                    name=room.name,
                    age_s=now - room.creation_time if room.creation_time else None,
                    owners=partial(session_workflow_statuses, client, room.name),
                    release=partial(self._livekit.release_room, room.name),
                    released=report.rooms_released,
                ),
                req,
                report,
            )

    async def _reap_avatars(self, client: Client, req: ReapRequest, report: ReapReport) -> None:
        pacer = Pacer(LIVEAVATAR_CALLS_PER_WINDOW)
        async with LiveAvatarClient(
            self._settings.liveavatar_api_url,
            self._settings.liveavatar_api_key.get_secret_value(),
            timeout=self._settings.liveavatar_call_timeout_s,
        ) as liveavatar:
            try:
                entries = await _active_avatar_sessions(liveavatar, pacer)
            except Exception as e:
                _failed(report, f"could not list active LiveAvatar sessions: {e}")
                return

            async def stop(avatar_session_id: str) -> None:
                await pacer.wait()
                try:
                    await liveavatar.stop_session_confirmed(avatar_session_id)
                except LiveAvatarRateLimited as e:
                    pacer.hold_off(e.retry_after or 1.0)
                    raise

            now = datetime.now(UTC)
            for entry in entries:
                report.avatars_seen += 1
                try:
                    avatar_owner_query(entry.id)
                except SuspiciousId as e:
                    activity.logger.warning("suspicious avatar session id ignored", extra={"avatar_session_id": repr(entry.id)})
                    report.errors.append(f"ignored a suspicious avatar session: {e}")
                    continue
                await self._consider(
                    _Candidate(
                        kind="avatar session",
                        name=entry.id,
                        age_s=_age_s(entry, now),
                        owners=partial(avatar_owner_statuses, client, entry.id),
                        release=partial(stop, entry.id),
                        released=report.avatars_released,
                        needs_recorded_owner=True,
                    ),
                    req,
                    report,
                )

    async def _consider(self, candidate: _Candidate, req: ReapRequest, report: ReapReport) -> None:
        """Look up the owner of one resource and release it when it is an orphan past the grace period."""
        activity.heartbeat(f"{candidate.kind} {candidate.name}")
        try:
            found = verdict(
                await candidate.owners(), candidate.age_s, req.grace_seconds, needs_recorded_owner=candidate.needs_recorded_owner
            )
        except Exception as e:
            _failed(report, f"could not find the owner of {candidate.kind} {candidate.name}, so it was kept: {e}")
            return
        if found is Verdict.NOT_OURS:
            report.avatars_not_ours += 1
            return
        if found is Verdict.OWNED:
            return
        if found is Verdict.YOUNG:
            report.skipped_young.append(candidate.name)
            return
        if not req.dry_run:
            try:
                await candidate.release()
            except Exception as e:
                _failed(report, f"could not release orphaned {candidate.kind} {candidate.name}: {e}")
                return
        activity.logger.info(
            "orphan would be released" if req.dry_run else "orphan released",
            extra={"kind": candidate.kind, "resource": candidate.name, "age_s": candidate.age_s},
        )
        candidate.released.append(candidate.name)


async def _active_avatar_sessions(liveavatar: LiveAvatarClient, pacer: Pacer) -> list[SessionEntry]:
    """Every active avatar session, read completely before any is stopped (stopping shifts the pages)."""
    entries: dict[str, SessionEntry] = {}
    for page in range(1, LIVEAVATAR_MAX_PAGES + 1):
        await pacer.wait()
        activity.heartbeat(f"listing active avatar sessions, page {page}")
        try:
            listed = await liveavatar.list_sessions("active", page=page, page_size=LIVEAVATAR_PAGE_SIZE)
        except LiveAvatarRateLimited as e:
            pacer.hold_off(e.retry_after or 1.0)
            raise
        for entry in listed.results:
            entries.setdefault(entry.id, entry)
        if not listed.next or not listed.results:
            break
    return list(entries.values())


def _age_s(entry: SessionEntry, now: datetime) -> float | None:
    if entry.created_at is None:
        return None
    created = entry.created_at if entry.created_at.tzinfo else entry.created_at.replace(tzinfo=UTC)
    return (now - created).total_seconds()


def _failed(report: ReapReport, message: str) -> None:
    activity.logger.warning(message)
    report.errors.append(message)
