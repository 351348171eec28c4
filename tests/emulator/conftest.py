"""Fixtures for the LiveAvatar emulator tests: a real LiveKit server and emulators served in-process (the helper
classes are in ``tests.support.emulator`` and ``tests.support.livekit``).

The LiveKit server comes from ``config.settings.Settings`` (defaults: the local dev server on 127.0.0.1:7880).
If it is not answering, tests fail (never skip) and say how to start it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from livekit import api

from config.settings import Settings
from sandbox.emulator import serve
from tests.support.emulator import TEST_CONFIG, Emulator, EmulatorFactory
from tests.support.livekit import LiveKit


@pytest.fixture(scope="session")
async def livekit(settings: Settings) -> AsyncIterator[LiveKit]:
    try:
        async with httpx.AsyncClient(timeout=3.0) as http:
            healthy = (await http.get(f"{settings.livekit_http_url}/")).status_code == 200
    except httpx.TransportError:
        healthy = False
    if not healthy:
        pytest.fail(
            f"no LiveKit server answers OK at {settings.livekit_http_url}/ (LIVEKIT_URL={settings.livekit_url}). "
            "Run the tests through `make test`, which starts the local stack, or start the server yourself: "
            "server --dev --bind 127.0.0.1 --node-ip 127.0.0.1 --config sandbox/livekit.yaml",
            pytrace=False,
        )
    secret = settings.livekit_api_secret.get_secret_value()
    lkapi = api.LiveKitAPI(settings.livekit_http_url, settings.livekit_api_key, secret)
    try:
        yield LiveKit(settings.livekit_url, settings.livekit_http_url, settings.livekit_api_key, secret, lkapi)
    finally:
        await lkapi.aclose()


@pytest.fixture
async def room(livekit: LiveKit) -> AsyncIterator[str]:
    """A fresh LiveKit room, deleted after the test."""
    name = f"emulator-test-{uuid.uuid4().hex[:12]}"
    await livekit.api.room.create_room(api.CreateRoomRequest(name=name, empty_timeout=60, departure_timeout=5))
    yield name
    try:
        await livekit.api.room.delete_room(api.DeleteRoomRequest(room=name))
    except api.ServerError as e:
        if e.code != "not_found":  # already gone (the test or the room's own timeout removed it) is fine
            raise


@pytest.fixture
async def emulator_factory(livekit: LiveKit) -> AsyncIterator[EmulatorFactory]:
    """``await emulator_factory(idle_timeout_s=1, ...)``: an emulator with ``TEST_CONFIG`` plus overrides."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Emulator:
            config = TEST_CONFIG.model_copy(update=overrides)
            base_url = await stack.enter_async_context(serve(config))
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=base_url, timeout=15.0))
            return Emulator(base_url, config, http, livekit)

        yield start


@pytest.fixture
async def emulator(emulator_factory: EmulatorFactory) -> Emulator:
    return await emulator_factory()
