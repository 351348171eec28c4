"""LiveKit restarts in the middle of a session: its rooms vanish without a webhook. The room monitor notices,
the session re-creates the room and starts a fresh avatar into it, the candidate comes back with a fresh grant,
and the observer who left while LiveKit was down is dropped after their reconnect grace."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from sandbox.media import join_room
from tests.support.chaos import Scenario, bounded


@pytest.fixture
async def with_monitor(chaos: Scenario) -> AsyncIterator[Scenario]:
    await chaos.workers.start_media()
    try:
        yield chaos
    finally:
        chaos.workers.stop_media()


@pytest.mark.chaos_long
async def test_livekit_restart_re_creates_the_room_and_reconciles_presence(with_monitor: Scenario) -> None:
    chaos = with_monitor
    spec = chaos.spec(reconnect_grace=timedelta(seconds=20))
    await chaos.join_human(spec)
    watcher = await chaos.client.join_running(spec.session_id, "watcher")
    async with join_room(watcher.url, watcher.token, publish_media=False) as watcher_room:
        before = await chaos.state_when(
            spec, "cand, watcher, avatar and monitor",
            lambda s: s.monitored and s.avatar_present and s.present == ["cand", "watcher"],
        )
        await chaos.kill_service("livekit")
        lost_at = time.monotonic()
        await bounded("the watcher to leave while LiveKit is down", watcher_room.disconnect(), 15)
    took = await chaos.start_service("livekit")
    recreated = await chaos.state_when(spec, "the room re-created", lambda s: any("re-created" in r for r in s.recoveries))
    chaos.note(f"LiveKit back in {took:.1f} s; room re-created {time.monotonic() - lost_at:.1f} s after the kill")
    assert recreated.avatar_billing[0].avatar_session_id == before.avatar_session_id
    grant = await bounded("a fresh grant for cand", chaos.client.join_running(spec.session_id, "cand"), 30)
    async with join_room(grant.url, grant.token, publish_media=True):
        back = await chaos.state_when(
            spec, "cand back with a fresh avatar in the new room",
            lambda s: "cand" in s.present and s.avatar_present and len(s.avatar_billing) == 2, timeout=60,
        )
        assert back.avatar_billing[0].end_reason == "lost: its room vanished (LiveKit restarted)"
        assert back.avatar_session_id != before.avatar_session_id
        dropped = await chaos.state_when(
            spec, "the watcher dropped after the grace", lambda s: "continued without watcher" in s.recoveries, timeout=60
        )
        assert dropped.present == ["cand"]
        await chaos.end(spec)
    await chaos.settle()
