"""The platform under the sessions goes away: the Temporal dev server restarts, the LiveKit server dies."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.chaos import Scenario

LIVEKIT_OUTAGE_S = 20


@pytest.mark.chaos_long
async def test_temporal_restart_mid_session(chaos: Scenario) -> None:
    """SIGTERM the dev server and start it on the same database file: the session carries on."""
    spec = chaos.spec()
    await chaos.join_human(spec)
    before = await chaos.live_with_avatar(spec)
    started = time.monotonic()
    ready = await asyncio.to_thread(chaos.stack.restart, "temporal")
    chaos.note(f"Temporal restarted in {time.monotonic() - started:.1f} s (ready {ready:.1f} s after its start)")
    after = await chaos.live_with_avatar(spec, timeout=60)
    assert after.avatar_session_id == before.avatar_session_id, "the session lost its avatar across the restart"
    await chaos.end(spec)
    await chaos.settle()


@pytest.mark.chaos_long
async def test_livekit_down_mid_session(chaos: Scenario) -> None:
    """SIGKILL the LiveKit server for a while (its rooms are in memory: they are gone), start it again, end the
    session: it closes, its avatar is stopped, and no room comes back."""
    spec = chaos.spec()
    await chaos.join_human(spec)
    await chaos.live_with_avatar(spec)
    await chaos.kill_service("livekit")
    await asyncio.sleep(LIVEKIT_OUTAGE_S)  # the outage itself, not a wait for something
    took = await chaos.start_service("livekit")
    chaos.note(f"LiveKit down {LIVEKIT_OUTAGE_S} s, back in {took:.1f} s")
    await chaos.end(spec)
    await chaos.settle()
