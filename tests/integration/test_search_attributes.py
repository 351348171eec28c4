"""The search attributes support finds sessions by, read the way the Temporal UI reads them (describe and
visibility, through the SDK), after each phase of a real session, with and without a worker running."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
from temporalio.client import Client

from config.settings import Settings
from sandbox.media import join_room
from starters.client import SessionClient
from starters.report import find_sessions, session_filter
from tests.support.polling import eventually
from tests.support.specs import interview
from workers.worker import build_worker
from workflows.models import SessionOutcome, SessionStatus
from workflows.search_attributes import (
    AVATAR_BILLED_SECONDS,
    AVATAR_SESSION_ID,
    DEPLOYMENT,
    PARTICIPANT_IDS,
    SESSION_DEGRADED,
    SESSION_END_REASON,
    SESSION_ID,
    SESSION_KIND,
    SESSION_STATUS,
)

pytestmark = pytest.mark.stack


@asynccontextmanager
async def worker(temporal: Client, stack: Settings, task_queue: str) -> AsyncIterator[None]:
    async with build_worker(temporal, stack, task_queue=task_queue):
        yield


async def attributes(sessions: SessionClient, session_id: str) -> Mapping[str, Any]:
    """The session's search attributes as the UI's workflow page shows them (DescribeWorkflowExecution)."""
    described = await sessions.handle(session_id).describe()
    found: dict[str, Any] = {}
    for key in (SESSION_ID, SESSION_KIND, SESSION_STATUS, AVATAR_SESSION_ID, SESSION_END_REASON, SESSION_DEGRADED,
                PARTICIPANT_IDS, AVATAR_BILLED_SECONDS, DEPLOYMENT):
        value = described.typed_search_attributes.get(key)
        if value is not None:
            found[key.name] = value
    return found


def with_status(sessions: SessionClient, session_id: str, status: SessionStatus) -> Any:
    async def check() -> Mapping[str, Any] | None:
        found = await attributes(sessions, session_id)
        return found if found.get(SESSION_STATUS.name) == status.value else None

    return check


async def test_search_attributes_after_each_phase_with_and_without_a_worker(temporal: Client, stack: Settings) -> None:
    task_queue = f"sa-{uuid.uuid4().hex[:10]}"
    sessions = SessionClient(temporal, stack, task_queue=task_queue)
    spec = interview()
    roster_ids = sessions.participant_ids(["cand", "watcher"])
    assert all(i.startswith("p-") and "cand" not in i and "watcher" not in i for i in roster_ids)

    async with worker(temporal, stack, task_queue):
        grant = await sessions.join(spec, "cand")
        waiting = await eventually(
            with_status(sessions, spec.session_id, SessionStatus.WAITING), what="waiting published", timeout=20
        )
    assert waiting == {
        "SessionId": spec.session_id, "SessionKind": "interview", "SessionStatus": "waiting",
        "ParticipantIds": roster_ids, "Deployment": stack.deployment,
        "SessionDegraded": False, "AvatarBilledSeconds": 0.0,
    }
    async with join_room(grant.url, grant.token, publish_media=True):
        async with worker(temporal, stack, task_queue):
            live = await eventually(with_status(sessions, spec.session_id, SessionStatus.LIVE), what="live published", timeout=30)
            avatars = await eventually(
                lambda: _avatar_ids(sessions, spec.session_id), what="the avatar session recorded", timeout=30
            )
        assert live["SessionDegraded"] is False and SESSION_END_REASON.name not in live

        # No worker: the UI still describes the session by every attribute set so far.
        described = await attributes(sessions, spec.session_id)
        assert described["SessionStatus"] == "live" and described["ParticipantIds"] == roster_ids
        assert described["AvatarSessionId"] == avatars and described["Deployment"] == stack.deployment

        async with worker(temporal, stack, task_queue):
            outcome: SessionOutcome = await sessions.end(spec.session_id, "interview over")
            await asyncio.wait_for(sessions.handle(spec.session_id).result(), timeout=30)

    # Closed, no worker: the end reason and the final billed seconds are there for good.
    closed = await attributes(sessions, spec.session_id)
    assert closed["SessionStatus"] == "ended" and closed["SessionEndReason"] == "requested"
    assert closed["AvatarBilledSeconds"] == pytest.approx(outcome.avatar_seconds, abs=0.001) and outcome.avatar_seconds > 0
    assert closed["AvatarSessionId"] == avatars == outcome.avatar_sessions
    assert closed["SessionDegraded"] is False  # the candidate stayed and the avatar never faltered

    # `sessionflow list` finds it by the same attributes (visibility lags describe by a moment).
    key = stack.participant_id_key.get_secret_value().encode()
    mine = session_filter(None, None, 1000, end_reason="requested", participant="cand", participant_key=key)
    await eventually(lambda: _listed(temporal, mine, spec.session_id), what="list by end reason and participant", timeout=20)
    other = session_filter(None, None, 1000, participant="someone-else", participant_key=key)
    assert not await _listed(temporal, other, spec.session_id)


async def test_a_session_that_degraded_and_recovered_stays_findable_as_degraded(temporal: Client, stack: Settings) -> None:
    task_queue = f"sa-{uuid.uuid4().hex[:10]}"
    sessions = SessionClient(temporal, stack, task_queue=task_queue)
    spec = interview(avatar=None, reconnect_grace="PT2M")
    async with worker(temporal, stack, task_queue):
        grant = await sessions.join(spec, "cand")
        async with join_room(grant.url, grant.token, publish_media=False):
            await eventually(with_status(sessions, spec.session_id, SessionStatus.LIVE), what="live", timeout=30)
        degraded = await eventually(
            with_status(sessions, spec.session_id, SessionStatus.DEGRADED), what="degraded while reconnecting", timeout=30
        )
        assert degraded["SessionDegraded"] is True
        grant = await sessions.join(spec, "cand")
        async with join_room(grant.url, grant.token, publish_media=False):
            relive = await eventually(with_status(sessions, spec.session_id, SessionStatus.LIVE), what="live again", timeout=30)
            assert relive["SessionDegraded"] is True  # it had trouble: support finds it
            await sessions.end(spec.session_id, "done")
            await asyncio.wait_for(sessions.handle(spec.session_id).result(), timeout=30)
    closed = await attributes(sessions, spec.session_id)
    assert closed["SessionStatus"] == "ended"
    assert closed["SessionDegraded"] is True and closed["SessionEndReason"] == "requested"
    assert closed["AvatarBilledSeconds"] == 0.0

    degraded_ones = session_filter(None, "interview", 1000, degraded="yes")
    await eventually(lambda: _listed(temporal, degraded_ones, spec.session_id), what="list --degraded yes", timeout=20)
    assert not await _listed(temporal, session_filter(None, None, 1000, degraded="no"), spec.session_id)


async def _avatar_ids(sessions: SessionClient, session_id: str) -> list[str] | None:
    found = (await attributes(sessions, session_id)).get(AVATAR_SESSION_ID.name)
    return list(found) if found else None


async def _listed(temporal: Client, which: Any, session_id: str) -> bool:
    return session_id in [r.session_id for r in await find_sessions(temporal, which)]

