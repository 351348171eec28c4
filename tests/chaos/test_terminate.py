"""`temporal workflow terminate` of live sessions: no workflow code runs, so the safety nets (the reaper on its
Schedule, the keep-alive's not_found teardown) must release the room and the billed avatar."""

from __future__ import annotations

import asyncio

from tests.support.chaos import Scenario


async def test_terminate_live_sessions(chaos: Scenario) -> None:
    with_human, immediate = chaos.spec(), chaos.spec(immediately=True)
    await chaos.join_human(with_human)
    await chaos.start(immediate)
    await asyncio.gather(chaos.live_with_avatar(with_human), chaos.live_with_avatar(immediate))
    await chaos.terminate(with_human)
    await chaos.terminate(immediate)
    # Reaper every 5 s with a 5 s grace, keep-alive heartbeat 10 s: released well within 30 s, or it leaked.
    await chaos.settle(timeout=30)
