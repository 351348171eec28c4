"""Tokens carry exactly the rights of their role, in exactly their room, for exactly their lifetime."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jwt
import pytest
from livekit.api import TokenVerifier
from pydantic import SecretStr

from activities.livekit import ROLE_GRANTS, mint_token
from config.settings import Settings
from workflows.models import MintTokenInput, Role

API_KEY = "unit-test-key"
API_SECRET = "unit-test-secret-that-is-long-enough-for-hs256"
ROOM = "session-abc-123"
TTL = timedelta(minutes=15)

SPEAKERS = [Role.CANDIDATE, Role.COACH, Role.INTERVIEWER]


@pytest.fixture(scope="module")
def settings() -> Settings:
    # explicit values, so no environment variable can change what is being checked
    return Settings(livekit_api_key=API_KEY, livekit_api_secret=SecretStr(API_SECRET), livekit_url="ws://lk.test:7880")


def mint(settings: Settings, role: Role | None, identity: str = "alice", ttl: timedelta = TTL, name: str | None = None):
    """Mint a token and return (verified claims, raw JWT payload, minted_at, expires_at)."""
    minted_at = datetime.now(UTC)
    token, expires_at = mint_token(settings, MintTokenInput(room=ROOM, identity=identity, name=name, role=role, ttl=ttl))
    claims = TokenVerifier(API_KEY, API_SECRET).verify(token)
    raw = jwt.decode(token, API_SECRET, algorithms=["HS256"], issuer=API_KEY)
    return claims, raw, minted_at, expires_at


@pytest.mark.parametrize("role", SPEAKERS, ids=str)
def test_speaking_roles_publish_subscribe_and_send_data(settings, role):
    claims, _, _, _ = mint(settings, role)
    assert claims.video is not None
    assert (claims.video.can_publish, claims.video.can_subscribe, claims.video.can_publish_data) == (True, True, True)
    assert claims.kind == "standard"
    assert claims.attributes == {"sessionflow.role": role.value}


def test_observer_only_subscribes(settings):
    claims, raw, _, _ = mint(settings, Role.OBSERVER)
    assert claims.video is not None
    assert claims.video.can_subscribe is True
    assert claims.video.can_publish is False
    assert claims.video.can_publish_data is False
    # written into the token, not left to LiveKit's defaults (which allow publishing)
    assert raw["video"]["canPublish"] is False and raw["video"]["canPublishData"] is False
    assert claims.kind == "standard"


def test_avatar_token_is_an_agent_that_publishes_media_and_data(settings):
    claims, _, _, _ = mint(settings, None, identity="avatar-abc-123")
    assert claims.kind == "agent"
    assert claims.video is not None
    assert claims.video.can_publish is True
    assert claims.video.can_publish_data is True
    assert claims.video.can_subscribe is True
    assert claims.attributes == {"sessionflow.role": "avatar"}


def test_every_role_has_a_grant_entry():
    assert set(ROLE_GRANTS) == set(Role)


@pytest.mark.parametrize("role", [*Role, None], ids=lambda r: str(r) if r else "avatar")
def test_token_joins_only_its_own_room_as_its_identity_with_no_admin_rights(settings, role):
    identity = "avatar-abc-123" if role is None else "bob.smith"
    claims, raw, _, _ = mint(settings, role, identity=identity)
    assert claims.identity == identity
    assert raw["sub"] == identity
    assert raw["iss"] == API_KEY
    video = raw["video"]
    assert video["room"] == ROOM
    assert video["roomJoin"] is True
    for admin_right in ("roomAdmin", "roomCreate", "roomList", "roomRecord", "destinationRoom"):
        assert not video.get(admin_right), f"{admin_right} granted to {role or 'avatar'}"
    assert not claims.video.room_admin and not claims.video.room_create and not claims.video.room_list


@pytest.mark.parametrize("ttl", [timedelta(minutes=15), timedelta(hours=2), timedelta(seconds=90)])
def test_token_expires_after_the_requested_ttl(settings, ttl):
    _, raw, minted_at, expires_at = mint(settings, Role.CANDIDATE, ttl=ttl)
    exp = datetime.fromtimestamp(raw["exp"], UTC)
    # jwt timestamps are whole seconds
    assert abs(exp - (minted_at + ttl)) <= timedelta(seconds=2)
    assert abs(expires_at - exp) <= timedelta(seconds=2)


def test_display_name_defaults_to_the_identity(settings):
    named, _, _, _ = mint(settings, Role.COACH, identity="carol", name="Carol C.")
    unnamed, _, _, _ = mint(settings, Role.COACH, identity="carol")
    assert named.name == "Carol C."
    assert unnamed.name == "carol"
