"""Integration tests on the real local stack: the Temporal dev server, the LiveKit server, the LiveAvatar
emulator and the gateway, as `make test` starts them (`python -m sandbox exec -- pytest`). Each test module
gets a worker of its own on a fresh task queue, running in this process.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from livekit import api
from temporalio.client import Client

from activities.liveavatar_client import LiveAvatarClient
from config.settings import Settings
from starters.client import SessionClient
from workers.temporal import connect
from workers.worker import build_worker

NOT_RUNNING = (
    "the local stack is not running ({what}). Run the tests with `make test`, which starts it, "
    "or start it with `python -m sandbox up` (needs `make install` and Go >= 1.26 to build the LiveKit server)"
)


def _require(ok: bool, what: str) -> None:
    if not ok:
        pytest.fail(NOT_RUNNING.format(what=what), pytrace=False)


@pytest.fixture(scope="session")
async def stack(settings: Settings) -> Settings:
    """The stack's settings, after checking that every service answers."""
    async with httpx.AsyncClient(timeout=3) as http:
        for what, url in (
            (f"LiveKit at {settings.livekit_http_url}", f"{settings.livekit_http_url}/"),
            (f"LiveAvatar emulator at {settings.liveavatar_api_url}", f"{settings.liveavatar_api_url}/v1/users/credits"),
            (
                f"gateway at {settings.gateway_host}:{settings.gateway_port}",
                f"http://{settings.gateway_host}:{settings.gateway_port}/healthz",
            ),
        ):
            try:
                await http.get(url)
            except httpx.HTTPError:
                _require(False, f"nothing answers for the {what}")
    return settings


@pytest.fixture(scope="session")
async def temporal(stack: Settings) -> Client:
    try:
        return await asyncio.wait_for(connect(stack), 10)
    except Exception as e:
        _require(False, f"no Temporal dev server at {stack.temporal_address}: {e}")
        raise


@pytest.fixture(scope="module")
async def sessions(temporal: Client, stack: Settings) -> AsyncIterator[SessionClient]:
    """A SessionClient whose sessions run on a worker of this module's own."""
    task_queue = f"it-{uuid.uuid4().hex[:10]}"
    async with build_worker(temporal, stack, task_queue=task_queue):
        yield SessionClient(temporal, stack, task_queue=task_queue)


@pytest.fixture
async def livekit(stack: Settings) -> AsyncIterator[api.LiveKitAPI]:
    async with api.LiveKitAPI(stack.livekit_http_url, stack.livekit_api_key, stack.livekit_api_secret.get_secret_value()) as lk:
        yield lk


@pytest.fixture
async def liveavatar(stack: Settings) -> AsyncIterator[LiveAvatarClient]:
    async with LiveAvatarClient(stack.liveavatar_api_url, stack.liveavatar_api_key.get_secret_value()) as client:
        yield client
