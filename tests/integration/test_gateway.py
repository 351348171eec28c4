"""The gateway accepts LiveKit webhooks only with a valid signature over the exact body."""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
import pytest
from livekit import api

from config.settings import Settings
from workflows.models import workflow_id_for

pytestmark = pytest.mark.stack

# A room of this deployment's whose session does not exist.
BODY = json.dumps({"event": "room_finished", "id": "EV_test", "room": {"name": workflow_id_for("nobody", Settings().deployment)}})


def signed(body: str, key: str, secret: str) -> str:
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    return api.AccessToken(key, secret).with_sha256(digest).to_jwt()


def gateway_url(settings: Settings) -> str:
    return f"http://{settings.gateway_host}:{settings.gateway_port}/livekit/webhook"


@pytest.mark.parametrize(
    "authorization",
    ["", "not-a-jwt", "wrong-secret", "other-body", "bearer-prefix"],
)
async def test_unsigned_or_forged_webhooks_are_rejected(stack: Settings, authorization: str) -> None:
    key, secret = stack.livekit_api_key, stack.livekit_api_secret.get_secret_value()
    header = {
        "": "",
        "not-a-jwt": "not-a-jwt",
        "wrong-secret": signed(BODY, key, "another-secret-that-is-long-enough-for-hs256"),
        "other-body": signed(BODY + " ", key, secret),
        "bearer-prefix": "Bearer " + signed(BODY, key, secret),
    }[authorization]
    async with httpx.AsyncClient() as http:
        headers = {"Authorization": header, "Content-Type": "application/webhook+json"}
        r = await http.post(gateway_url(stack), content=BODY, headers=headers)
    assert r.status_code == 401


async def test_a_signed_webhook_for_a_closed_or_unknown_session_is_acknowledged(stack: Settings) -> None:
    key, secret = stack.livekit_api_key, stack.livekit_api_secret.get_secret_value()
    async with httpx.AsyncClient() as http:
        r = await http.post(gateway_url(stack), content=BODY, headers={"Authorization": signed(BODY, key, secret)})
    # A 2xx, so LiveKit does not retry an event nobody needs.
    assert r.status_code == 200 and r.json()["status"] == "session closed"
