"""The LiveAvatar emulator served in-process for its own tests, with a raw HTTP client."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from config.settings import DEFAULT_AVATAR_ID
from sandbox.emulator import EmulatorConfig
from tests.support.livekit import LiveKit
from tests.support.polling import eventually

TEST_API_KEY = "emulator-test-key"


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

        async def ended() -> dict[str, Any] | None:
            entry = await self.entry(session_id)
            return entry if "end_at" in entry else None

        return await eventually(ended, timeout=timeout, what=f"session {session_id} to end")


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
