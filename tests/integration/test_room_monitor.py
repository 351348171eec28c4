"""The room monitor on the real stack: a real participant joining, publishing, unpublishing and leaving shows in
the session's state within 2 s from the monitor alone (the gateway paused, so no webhook arrives), and again
from webhooks alone (no media worker); the late webhooks that arrive once the gateway resumes change nothing."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from livekit import api
from temporalio.client import Client

from config.settings import Settings
from sandbox.media import SyntheticMedia, join_room
from sandbox.stack import LocalStack
from starters.client import SessionClient
from starters.timeline import timeline
from tests.support.polling import eventually
from tests.support.specs import interview
from workers.worker import build_media_worker, build_worker
from workflows.models import SessionState, SessionStatus, monitor_identity_for

pytestmark = pytest.mark.stack

WITHIN_S = 2.0  # the bound: participant action to workflow state


@pytest.fixture(scope="module")
async def monitored(temporal: Client, stack: Settings) -> AsyncIterator[SessionClient]:
    """Sessions on a worker of this module's own, with a media worker of its own serving their monitors."""
    settings = stack.model_copy(update={"media_task_queue": f"media-{uuid.uuid4().hex[:10]}"})
    task_queue = f"it-{uuid.uuid4().hex[:10]}"
    async with build_worker(temporal, settings, task_queue=task_queue), build_media_worker(temporal, settings):
        yield SessionClient(temporal, settings, task_queue=task_queue)


@pytest.fixture(scope="module")
async def unmonitored(temporal: Client, stack: Settings) -> AsyncIterator[SessionClient]:
    """Sessions whose media task queue no worker serves: their monitor never runs, only webhooks arrive."""
    settings = stack.model_copy(update={"media_task_queue": f"nobody-{uuid.uuid4().hex[:10]}"})
    task_queue = f"it-{uuid.uuid4().hex[:10]}"
    async with build_worker(temporal, settings, task_queue=task_queue):
        yield SessionClient(temporal, settings, task_queue=task_queue)


@contextmanager
def gateway_paused() -> Iterator[None]:
    """No webhook reaches any session meanwhile (the gateway is frozen; LiveKit's deliveries wait or drop)."""
    stack = LocalStack.attach()
    if stack is None:
        pytest.fail("no stack state file: run under `python -m sandbox exec` (make test)", pytrace=False)
    stack.pause("gateway")
    try:
        yield
    finally:
        stack.resume("gateway")


async def _in_time(sessions: SessionClient, session_id: str, what: str, ok: Callable[[SessionState], bool]) -> float:
    """Seconds until the session's state satisfies `ok`; fails past WITHIN_S."""
    started = time.monotonic()

    async def check() -> SessionState | None:
        state = await sessions.state(session_id)
        return state if ok(state) else None

    await eventually(check, what=what, timeout=WITHIN_S, every=0.05)
    return time.monotonic() - started


async def _monitor_in(livekit: api.LiveKitAPI, room: str, session_id: str) -> bool:
    listed = await livekit.room.list_participants(api.ListParticipantsRequest(room=room))
    return any(p.identity == monitor_identity_for(session_id) for p in listed.participants)


async def _walk(sessions: SessionClient, livekit: api.LiveKitAPI, *, monitor: bool) -> tuple[str, dict[str, float]]:
    """Join, publish, unpublish, leave; each reflected within WITHIN_S. Returns the session id and the seconds
    each took."""
    spec = interview(avatar=None)
    grant = await sessions.join(spec, "cand")
    if monitor:
        in_room = lambda: _monitor_in(livekit, spec.room_name, spec.session_id)  # noqa: E731
        await eventually(in_room, what="the monitor in the room", timeout=20)
    took: dict[str, float] = {}
    # A real participant: camera and microphone from the moment they connect.
    async with join_room(grant.url, grant.token, publish_media=False) as room:
        media = SyntheticMedia()
        await media.start(room)
        took["joined"] = await _in_time(sessions, spec.session_id, "cand present", lambda s: s.present == ["cand"])
        if monitor:
            took["published"] = await _in_time(
                sessions, spec.session_id, "both tracks", lambda s: s.tracks == {"cand": ["audio", "video"]}
            )
            started = time.monotonic()
            await room.local_participant.unpublish_track(media.track_sids[0])  # the camera goes off
            took["unpublished"] = await _in_time(
                sessions, spec.session_id, "video unpublished", lambda s: s.tracks == {"cand": ["audio"]}
            ) + (time.monotonic() - started)
        await media.stop(unpublish=False)
    took["left"] = await _in_time(
        sessions, spec.session_id, "cand gone", lambda s: s.present == [] and s.reconnecting == ["cand"]
    )
    return spec.session_id, took


async def test_the_monitor_alone_reflects_a_participant_within_2_s_and_late_webhooks_change_nothing(
    monitored: SessionClient, livekit: api.LiveKitAPI
) -> None:
    with gateway_paused():
        spec_id, took = await _walk(monitored, livekit, monitor=True)
        state = await monitored.state(spec_id)
    # The webhooks LiveKit held back arrive now (joined, left: news older than the monitor's): nothing moves.
    await eventually(lambda: _gateway_answers(monitored.settings), what="the gateway answering again", timeout=20)
    after = await monitored.state(spec_id)
    assert after.present == state.present == [] and after.reconnecting == ["cand"]
    assert after.status is SessionStatus.DEGRADED
    print(f"monitor alone, seconds to state: {took}")
    await monitored.end(spec_id, "done")
    history = await monitored.handle(spec_id).fetch_history()
    joins = [m.text for m in timeline(history, monitored.client.data_converter) if "participant_joined" in m.text]
    assert joins, "the monitor's join is in the timeline"


async def test_webhooks_alone_reflect_a_participant_within_2_s(unmonitored: SessionClient, livekit: api.LiveKitAPI) -> None:
    spec_id, took = await _walk(unmonitored, livekit, monitor=False)
    state = await unmonitored.state(spec_id)
    assert state.tracks == {} and state.present == []
    print(f"webhooks alone, seconds to state: {took}")
    await unmonitored.end(spec_id, "done")


async def _gateway_answers(s: Settings) -> bool:
    async with httpx.AsyncClient(timeout=1) as http:
        try:
            return (await http.get(f"http://{s.gateway_host}:{s.gateway_port}/healthz")).status_code == 200
        except httpx.HTTPError:
            return False
