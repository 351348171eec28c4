"""Tokens live no longer than the session may (issue 9, item 3), read from the real JWTs a session hands out.

A participant's token expires by the session's hard cap (`max_duration_cap`, the furthest `extend` can reach)
plus TOKEN_GRACE; the avatar's by its avatar session's length plus AVATAR_TOKEN_GRACE (it was the plan's cap plus
10 minutes: 8 h 10 min measured). A token that outlives its session can bring the room back on a server that
auto-creates rooms (LiveKit Cloud), so these bounds are part of cleaning up.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest

from activities.avatar import AVATAR_TOKEN_GRACE
from config.settings import DEFAULT_AVATAR_ID, Settings
from starters.client import SessionClient
from tests.support.polling import eventually
from tests.support.specs import interview
from workflows.machine import PARTICIPANT_TOKEN_TTL, ROTATION_MARGIN, TOKEN_GRACE

pytestmark = pytest.mark.stack

ROUNDING = timedelta(seconds=1)  # `exp` is whole seconds


def expiry(token: str, stack: Settings) -> datetime:
    """The `exp` of a token, after checking its signature with the stack's LiveKit secret."""
    claims: dict[str, Any] = jwt.decode(
        token, stack.livekit_api_secret.get_secret_value(), algorithms=["HS256"], options={"verify_aud": False}
    )
    return datetime.fromtimestamp(claims["exp"], UTC)


async def test_a_participants_token_expires_by_the_hard_cap_of_a_short_session(stack: Settings, sessions: SessionClient) -> None:
    spec = interview(avatar=None, max_duration="PT30S", max_duration_cap="PT45S")
    grant = await sessions.join(spec, "cand")
    started_at = (await sessions.state(spec.session_id)).started_at
    try:
        exp = expiry(grant.token, stack)
        assert exp <= started_at + spec.max_duration_cap + TOKEN_GRACE + ROUNDING
        assert exp > datetime.now(UTC)  # and still good for joining now
        assert abs(grant.expires_at - exp) <= ROUNDING  # the grant says when, as the token does
        # Measured: before, the same token lived 15 minutes whatever the session.
        print(f"participant token of a 45 s-cap session: expires {(exp - started_at).total_seconds():.0f} s after the start")
    finally:
        await sessions.end(spec.session_id)


async def test_a_long_sessions_participant_token_keeps_its_usual_lifetime(stack: Settings, sessions: SessionClient) -> None:
    spec = interview(avatar=None)  # capped at 2 h: far beyond the usual 15 minutes
    before = datetime.now(UTC)
    grant = await sessions.join(spec, "cand")
    try:
        exp = expiry(grant.token, stack)
        assert before + PARTICIPANT_TOKEN_TTL - ROUNDING <= exp <= datetime.now(UTC) + PARTICIPANT_TOKEN_TTL + ROUNDING
    finally:
        await sessions.end(spec.session_id)


async def test_the_avatars_token_expires_with_its_avatar_session_not_with_the_plans_cap(
    stack: Settings, sessions: SessionClient
) -> None:
    # The plan allows 8 h per avatar session, but this session can last 60 s at most.
    spec = interview(
        avatar={"avatar_id": DEFAULT_AVATAR_ID, "start": "immediately", "max_session_duration": "PT8H"},
        max_duration="PT30S",
        max_duration_cap="PT60S",
    )
    await sessions.start(spec)

    async def avatar_in_room() -> str | None:
        state = await sessions.state(spec.session_id)
        return state.avatar_session_id if state.avatar_present else None

    try:
        avatar_session_id = await eventually(avatar_in_room, what="the avatar to be in the room", timeout=45)
        started_at = (await sessions.state(spec.session_id)).started_at
        async with httpx.AsyncClient(base_url=stack.liveavatar_api_url) as http:
            listed = (await http.get("/_control/sessions")).json()["data"]["sessions"]
        view = next(s for s in listed if s["id"] == avatar_session_id)
        exp = datetime.fromisoformat(view["livekit_client_token_expires_at"])
        # Its avatar session lasts until the hard cap (plus the rotation margin), never the plan's 8 hours.
        assert exp <= started_at + spec.max_duration_cap + ROTATION_MARGIN + AVATAR_TOKEN_GRACE + ROUNDING
        assert exp > datetime.now(UTC)
        lifetime = (exp - started_at).total_seconds()
        print(f"avatar token of a 60 s-cap session (plan cap 8 h): expires {lifetime:.0f} s after the start")
    finally:
        await sessions.end(spec.session_id)
