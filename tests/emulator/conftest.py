"""Fixtures for the LiveAvatar emulator tests: a real LiveKit server, emulators served in-process, helpers.

The LiveKit server comes from ``config.settings.Settings`` (defaults: the local dev server on 127.0.0.1:7880).
If it is not answering, tests fail (never skip) and say how to start it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from livekit import api, rtc

from sandbox.emulator import EmulatorConfig, serve
from sandbox.media import join_room
from config.settings import DEFAULT_AVATAR_ID, Settings

TEST_API_KEY = "emulator-test-key"
HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The local LiveKit dev secret ("secret") is short on purpose; PyJWT warns on every token signed with it.
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.filterwarnings("ignore::jwt.InsecureKeyLengthWarning"))


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], *, timeout: float = 10.0, what: str
) -> None:
    """Poll ``check`` every 50 ms until it is true; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for: {what}", pytrace=False)
        await asyncio.sleep(0.05)


# -- LiveKit ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveKit:
    url: str
    http_url: str
    key: str
    secret: str
    api: api.LiveKitAPI

    def token(
        self, room: str, identity: str, *, hidden: bool = False, can_publish_data: bool = True, kind: str = "standard"
    ) -> str:
        grants = api.VideoGrants(room_join=True, room=room, hidden=hidden, can_publish_data=can_publish_data)
        token = api.AccessToken(self.key, self.secret).with_identity(identity).with_kind(kind).with_grants(grants)
        return token.to_jwt()

    async def identities(self, room: str) -> set[str]:
        response = await self.api.room.list_participants(api.ListParticipantsRequest(room=room))
        return {p.identity for p in response.participants}


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
    with contextlib.suppress(api.ServerError):
        await livekit.api.room.delete_room(api.DeleteRoomRequest(room=name))


@contextlib.asynccontextmanager
async def observer(livekit: LiveKit, room: str, *, hidden: bool = True) -> AsyncIterator[rtc.Room]:
    """A subscribing participant in ``room`` (hidden by default, so the avatar does not see it)."""
    identity = f"observer-{uuid.uuid4().hex[:8]}"
    async with join_room(livekit.url, livekit.token(room, identity, hidden=hidden), publish_media=False) as joined:
        yield joined


def subscribed_kinds(room: rtc.Room, identity: str) -> set[rtc.TrackKind.ValueType]:
    """Kinds of the tracks ``room`` receives from participant ``identity``."""
    participant = next((p for p in room.remote_participants.values() if p.identity == identity), None)
    if participant is None:
        return set()
    return {pub.kind for pub in participant.track_publications.values() if pub.track is not None}


AUDIO_AND_VIDEO = {rtc.TrackKind.KIND_AUDIO, rtc.TrackKind.KIND_VIDEO}


# -- emulator ---------------------------------------------------------------------------------------------------------


@dataclass
class Session:
    id: str
    token: str
    avatar_identity: str | None = None

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Emulator:
    """An emulator served in-process, with a raw httpx client (tests inspect exact statuses and bodies)."""

    base_url: str
    config: EmulatorConfig
    http: httpx.AsyncClient
    livekit: LiveKit
    key: dict[str, str] = field(default_factory=lambda: {"X-API-KEY": TEST_API_KEY})

    async def create_session(
        self, room: str | None = None, *, identity: str | None = None, can_publish_data: bool = True, **body: Any
    ) -> Session:
        """``/token`` for a LITE session; with ``room`` its avatar will join that LiveKit room as ``identity``."""
        payload: dict[str, Any] = {"mode": "LITE", "avatar_id": DEFAULT_AVATAR_ID, **body}
        if room is not None:
            identity = identity or f"avatar-{uuid.uuid4().hex[:8]}"
            token = self.livekit.token(room, identity, kind="agent", can_publish_data=can_publish_data)
            payload["livekit_config"] = {
                "livekit_url": self.livekit.url,
                "livekit_room": room,
                "livekit_client_token": token,
            }
        response = await self.http.post("/v1/sessions/token", headers=self.key, json=payload)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        return Session(data["session_id"], data["session_token"], identity)

    async def start(self, session: Session) -> httpx.Response:
        return await self.http.post("/v1/sessions/start", headers=session.bearer, json={})

    async def started_session(self, room: str | None = None, **kwargs: Any) -> Session:
        session = await self.create_session(room, **kwargs)
        response = await self.start(session)
        assert response.status_code == 201, response.text
        return session

    async def entry(self, session_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/v1/sessions/{session_id}", headers=self.key)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()["data"]
        return data

    async def control_view(self, session_id: str) -> dict[str, Any]:
        response = await self.http.get("/_control/sessions")
        return next(s for s in response.json()["data"]["sessions"] if s["id"] == session_id)

    async def control(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        response = await self.http.post(f"/_control/{path}", json=body)
        assert response.status_code == 200, response.text
        return response

    async def wait_ended(self, session_id: str, *, timeout: float = 10.0) -> dict[str, Any]:
        """Poll GET until the session shows ``end_at``; return that entry."""
        entry: dict[str, Any] = {}

        async def ended() -> bool:
            nonlocal entry
            entry = await self.entry(session_id)
            return "end_at" in entry

        await eventually(ended, timeout=timeout, what=f"session {session_id} to end")
        return entry


# Every field given explicitly, so EMULATOR_* variables in the environment cannot change the tests.
TEST_CONFIG = EmulatorConfig(
    **{
        **{name: info.default for name, info in EmulatorConfig.model_fields.items()},
        "api_key": TEST_API_KEY,
        "rate_limit_per_s": 1000,
        "avatar_join_timeout_s": 5.0,
        "tick_s": 0.05,
    }
)

EmulatorFactory = Callable[..., Awaitable[Emulator]]


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
