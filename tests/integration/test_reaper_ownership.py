"""The reaper touches only what it can prove is ours (issue 9, item 3), on the real stack.

A LiveKit project and a LiveAvatar account may be shared with other apps and other deployments. Beside an
orphan of ours, the same LiveKit server and emulator hold a room of another app (another name), a room of
another deployment (`session-elsewhere-…`) and an avatar session another app started directly on the
emulator; a sweep with no grace at all must release the orphan and leave the other three running.

A room re-created after its session ended, by a participant whose token is still valid (LiveKit Cloud
auto-creates rooms on join), is an orphan of ours too: shown on a second LiveKit server with `auto_create` on
(the local stack's own has it off, so a stale token cannot resurrect a room there).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from livekit import api, rtc
from pydantic import SecretStr
from temporalio.client import Client

from activities.liveavatar_client import LiveAvatarClient
from activities.livekit import mint_token
from config.settings import DEFAULT_AVATAR_ID, Settings
from sandbox.media import join_room
from sandbox.stack import LocalStack, StackPorts, port_is_free
from starters.client import InvalidInput, SessionClient, SessionNotFound
from starters.report import SESSIONS_QUERY, find_sessions, session_filter
from tests.support.livekit import room_names
from tests.support.polling import eventually
from tests.support.specs import interview
from workers.worker import build_reaper_worker, build_worker
from workflows.models import MintTokenInput, workflow_id_for
from workflows.reaper import ReaperWorkflow
from workflows.reaper_models import ReapReport, ReapRequest

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
async def reaper_queue(temporal: Client, stack: Settings) -> AsyncIterator[str]:
    """A reaper worker of this module's own, on its own queue, as `sessionflow worker` runs one."""
    queue = f"it-reaper-{uuid.uuid4().hex[:8]}"
    async with build_reaper_worker(temporal, stack, task_queue=queue):
        yield queue


async def reap(temporal: Client, queue: str) -> ReapReport:
    """One sweep now, with no grace at all: only ownership keeps anything alive."""
    return await temporal.execute_workflow(
        ReaperWorkflow.run,
        ReapRequest(grace_seconds=0.0),
        id=f"it-reap-{uuid.uuid4().hex[:10]}",
        task_queue=queue,
    )


async def avatar_active(liveavatar: LiveAvatarClient, avatar_session_id: str) -> bool:
    return (await liveavatar.get_session(avatar_session_id)).is_ended is False and avatar_session_id in {
        s.id for s in (await liveavatar.list_sessions("active", page_size=100)).results
    }


async def test_the_reaper_leaves_other_apps_and_deployments_alone_and_releases_an_orphan_of_ours(
    temporal: Client, stack: Settings, sessions: SessionClient, livekit: api.LiveKitAPI, liveavatar: LiveAvatarClient,
    reaper_queue: str,
) -> None:
    tag = uuid.uuid4().hex[:8]
    other_app_room = f"another-app-{tag}"
    other_deployment_room = workflow_id_for(f"it-{tag}", "elsewhere")
    orphan = sessions.workflow_id(f"it-orphan-{tag}")  # our prefix, and no workflow owns it
    for room in (other_app_room, other_deployment_room, orphan):
        await livekit.room.create_room(api.CreateRoomRequest(name=room, empty_timeout=600))
    # Another app's avatar, started straight on the emulator into its own room: no workflow of ours recorded it.
    their_token, _ = mint_token(
        stack, MintTokenInput(room=other_app_room, identity=f"their-avatar-{tag}", role=None, ttl=timedelta(minutes=10))
    )
    theirs = await liveavatar.create_session_token(
        DEFAULT_AVATAR_ID, livekit_url=stack.livekit_url, livekit_room=other_app_room,
        livekit_client_token=their_token, max_session_duration=600,
    )
    try:
        await liveavatar.start_session(theirs.session_token)
        await eventually(lambda: avatar_active(liveavatar, theirs.session_id), what="their avatar to be active", timeout=30)

        report = await reap(temporal, reaper_queue)

        assert orphan in report.rooms_released
        assert await room_names(livekit, orphan) == []
        assert other_app_room not in report.rooms_released and other_deployment_room not in report.rooms_released
        assert set(await room_names(livekit, other_app_room, other_deployment_room)) == {other_app_room, other_deployment_room}
        assert theirs.session_id not in report.avatars_released
        assert await avatar_active(liveavatar, theirs.session_id)
        assert report.rooms_not_ours >= 2 and report.avatars_not_ours >= 1, report
        assert report.errors == []
    finally:
        await liveavatar.stop_session_confirmed(theirs.session_id)
        for room in (other_app_room, other_deployment_room):
            await livekit.room.delete_room(api.DeleteRoomRequest(room=room))


# ---- a room re-created after the end -------------------------------------------------------------------------


class AutoCreatingLiveKit(LocalStack):
    """The stack's LiveKit server, but with `auto_create` on, as on LiveKit Cloud."""

    def livekit_config(self, *, write: bool = True) -> Path:
        assert self.ports != StackPorts(), "on shifted ports only: the default config is the repository's own file"
        path = super().livekit_config(write=write)
        if write:
            text = path.read_text()
            assert text.count("auto_create: false") == 1, "sandbox/livekit.yaml changed: update this test"
            path.write_text(text.replace("auto_create: false", "auto_create: true"))
        return path


def free_offset() -> int:
    """An offset that puts every stack port on a free port (TCP and UDP)."""
    for offset in range(37_000, 50_000, 97):
        ports = StackPorts().shifted(offset)
        if all(port_is_free(p) and port_is_free(p, socket.SOCK_DGRAM) for p in vars(ports).values()):
            return offset
    pytest.fail("no free block of ports for a second LiveKit server")


@pytest.fixture
def auto_creating_livekit(stack: Settings, tmp_path: Path) -> Iterator[Settings]:
    """The stack's settings, pointed at a second LiveKit server that auto-creates rooms on join."""
    with AutoCreatingLiveKit(services=["livekit"], ports=StackPorts().shifted(free_offset()), state_dir=tmp_path) as lk:
        # That server has its own generated key pair (sandbox/secrets.py, in its own state dir).
        yield stack.model_copy(update={
            "livekit_url": f"ws://127.0.0.1:{lk.ports.livekit}",
            "livekit_api_key": lk.secrets.livekit_api_key,
            "livekit_api_secret": SecretStr(lk.secrets.livekit_api_secret),
        })


async def test_a_room_recreated_after_the_end_by_a_still_valid_token_is_found_and_deleted(
    temporal: Client, auto_creating_livekit: Settings
) -> None:
    settings = auto_creating_livekit
    queue = f"it-recreate-{uuid.uuid4().hex[:8]}"
    async with (
        build_worker(temporal, settings, task_queue=queue),
        build_reaper_worker(temporal, settings, task_queue=f"{queue}-reaper"),
        api.LiveKitAPI(settings.livekit_http_url, settings.livekit_api_key, settings.livekit_api_secret.get_secret_value()) as lk,
    ):
        sessions = SessionClient(temporal, settings, task_queue=queue)
        spec = interview(avatar=None)
        grant = await sessions.join(spec, "cand")
        await sessions.end(spec.session_id, "interview over")
        assert await room_names(lk, spec.room_name) == []

        # The participant's token outlives the session a little: joining with it brings the room back.
        async with join_room(settings.livekit_url, grant.token, publish_media=False) as joined:
            assert await room_names(lk, spec.room_name) == [spec.room_name]

            report = await reap(temporal, f"{queue}-reaper")

            assert spec.room_name in report.rooms_released, report
            await eventually(
                lambda: _gone(lk, spec.room_name), what="the re-created room to be deleted", timeout=15
            )
            await eventually(
                lambda: _disconnected(joined), what="the participant to be disconnected from it", timeout=15
            )


async def _gone(lk: api.LiveKitAPI, room: str) -> bool:
    return await room_names(lk, room) == []


async def _disconnected(room: rtc.Room) -> bool:
    return room.connection_state == rtc.ConnectionState.CONN_DISCONNECTED


async def test_a_spec_naming_another_deployment_is_refused_and_starts_nothing(temporal: Client, sessions: SessionClient) -> None:
    spec = interview(deployment="elsewhere")
    with pytest.raises(InvalidInput, match="deployment 'elsewhere'"):
        await sessions.join(spec, "cand")
    with pytest.raises(SessionNotFound):
        await sessions.state(spec.session_id)
    assert [w.id async for w in temporal.list_workflows(f'WorkflowId = "{spec.workflow_id}"')] == []


# ---- the reaper keeps out of the sessions' list (issue 10, item 3) ------------------------------------------


async def test_reaper_sweeps_stay_out_of_the_session_list_and_are_found_on_their_own_queue(
    temporal: Client, sessions: SessionClient, reaper_queue: str
) -> None:
    spec = interview(avatar=None)
    await sessions.start(spec)
    sweep = f"it-reap-{uuid.uuid4().hex[:10]}"
    await temporal.execute_workflow(
        ReaperWorkflow.run, ReapRequest(grace_seconds=3600, dry_run=True), id=sweep, task_queue=reaper_queue
    )
    try:
        # Support finds the sweeps on the reaper's queue (visibility lags a moment)...
        await eventually(
            lambda: _listed(temporal, f"TaskQueue = '{reaper_queue}'", sweep), what="the sweep in visibility", timeout=15
        )
        # ...and the sessions' list (`sessionflow list`, and the UI's saved query) shows sessions only.
        await eventually(lambda: _listed(temporal, SESSIONS_QUERY, spec.workflow_id), what="the session", timeout=15)
        assert not await _listed(temporal, SESSIONS_QUERY, sweep)
        assert not await _listed(temporal, f"TaskQueue = '{sessions.task_queue}'", sweep)
        rows = await find_sessions(temporal, session_filter(None, None, 1000))
        assert spec.session_id in {r.session_id for r in rows}
        assert not any(r.session_id == sweep or r.session_id.startswith("it-reap") for r in rows)
    finally:
        await sessions.end(spec.session_id)


async def _listed(temporal: Client, query: str, workflow_id: str) -> bool:
    return any([w.id == workflow_id async for w in temporal.list_workflows(query)])
