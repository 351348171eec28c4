"""The sessions HTTP API as the security tests drive it: the gateway's own app, in this process on an ASGI
transport, over the real Temporal dev server with a worker of the test's own (real LiveKit, the emulator).

Its API key is made for the test (only its hash is configured, as in production), and its sessions run on a
fresh task queue, so nothing here touches another test's sessions.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from config.settings import DEFAULT_AVATAR_ID, Settings, parse_api_keys
from starters.api import new_api_key
from starters.client import SessionClient, SessionNotFound
from starters.gateway import create_app
from workers.temporal import connect
from workers.worker import build_worker

AVATAR = {"avatar_id": DEFAULT_AVATAR_ID}
NOT_RUNNING = (
    "the local stack is not running ({what}). Run the tests with `make test`, which starts it, "
    "or start it with `python -m sandbox up`"
)


@dataclass
class Api:
    """An authorised HTTP client of the API, the Python client of the same sessions, and the key."""

    http: httpx.AsyncClient
    sessions: SessionClient
    key: str

    async def absent(self, session_id: str) -> bool:
        """True when no session of that id was ever started: how a test shows a refusal changed nothing."""
        try:
            await self.sessions.state(session_id)
        except SessionNotFound:
            return True
        return False


async def stack_temporal(settings: Settings) -> Client:
    try:
        return await asyncio.wait_for(connect(settings), 10)
    except Exception as e:
        pytest.fail(NOT_RUNNING.format(what=f"no Temporal at {settings.temporal_address}: {e}"), pytrace=False)


@asynccontextmanager
async def api_on(temporal: Client, settings: Settings) -> AsyncIterator[Api]:
    key, digest = new_api_key()
    task_queue = f"api-{uuid.uuid4().hex[:10]}"
    app_settings = settings.model_copy(update={"task_queue": task_queue, "api_keys": parse_api_keys(f"test:{digest}")})
    app = create_app(app_settings, temporal)
    transport = httpx.ASGITransport(app=app)
    async with (
        build_worker(temporal, settings, task_queue=task_queue),
        httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {key}"}) as http,
    ):
        yield Api(http, SessionClient(temporal, settings, task_queue=task_queue), key)


def spec(**overrides: Any) -> dict[str, Any]:
    """A session spec as a caller sends it over HTTP (JSON values), under a fresh session id; no avatar unless
    asked for (`avatar=AVATAR`): these tests are about the edge, not the avatar."""
    return {
        "session_id": f"sec-{uuid.uuid4().hex[:10]}",
        "kind": "interview",
        "participants": [{"identity": "cand", "role": "candidate"}, {"identity": "watcher", "role": "observer"}],
        "max_duration": "PT10M",
        "max_duration_cap": "PT15M",
        "no_show_timeout": "PT2M",
    } | overrides
