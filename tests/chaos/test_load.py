"""Twenty sessions at once on two workers, with workers killed (-9) at random while they start and run."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.support.chaos import Scenario

SESSIONS = 20
KILL_EVERY_S = (4.0, 8.0)


@pytest.mark.chaos_long
async def test_twenty_sessions_with_random_worker_kills(chaos: Scenario) -> None:
    # Half with a real participant (the avatar starts on their join), half with `start: immediately`: twenty
    # rtc participants plus twenty publishing avatars is more than two cores carry.
    humans = [chaos.spec() for _ in range(SESSIONS // 2)]
    immediate = [chaos.spec(immediately=True) for _ in range(SESSIONS - SESSIONS // 2)]
    rng = random.Random(20)
    stop = asyncio.Event()

    async def kill_at_random() -> None:
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(*KILL_EVERY_S))  # the fault's own rhythm: time between kills
            await chaos.workers.kill9(rng.choice(chaos.workers.alive))
            await chaos.workers.ensure()

    killer = asyncio.create_task(kill_at_random())
    try:
        await asyncio.gather(
            *(chaos.join_human(s, publish_media=False) for s in humans), *(chaos.start(s) for s in immediate)
        )
        await asyncio.gather(*(chaos.live_with_avatar(s, timeout=180) for s in humans + immediate))
    finally:
        stop.set()
        await asyncio.wait_for(killer, 30)
    chaos.note(f"{chaos.workers.kills} workers killed -9 so far in the run")
    # Killing workers must not cost a session its avatar: activities are retried on the survivors.
    states = [await chaos.client.state(s.session_id) for s in humans + immediate]
    lost = [(s.session_id, s.status.value, s.recoveries) for s in states if not s.avatar_present or s.avatar_fallback]
    assert not lost, f"sessions without their avatar after the kills stopped: {lost}"
    replaced = [s.session_id for s in states if s.recoveries]
    chaos.note(f"sessions whose avatar was replaced during the kills: {replaced or 'none'}")
    await asyncio.gather(*(chaos.end(s, timeout=120) for s in humans + immediate))
    await chaos.settle(timeout=90)
