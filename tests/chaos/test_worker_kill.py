"""kill -9 of the worker at each step of a session's life; a replacement takes over and the session still ends
`requested` with nothing leaked."""

from __future__ import annotations

import pytest

from tests.support.chaos import Scenario

HELD_S = 8  # how long the fault holds the step in flight: long enough to kill the worker in the middle of it


async def test_kill9_while_live(chaos: Scenario) -> None:
    spec = chaos.spec()
    await chaos.join_human(spec)
    before = await chaos.live_with_avatar(spec)
    killed = await chaos.kill_worker_running(spec, "keep_avatar_alive")
    # The keep-alive (heartbeat timeout 10 s) moves to a surviving worker: the avatar stays kept alive.
    await chaos.in_flight(spec, "keep_avatar_alive", timeout=30, not_on=killed)
    after = await chaos.live_with_avatar(spec, timeout=10)
    assert after.avatar_session_id == before.avatar_session_id and after.recoveries == [], (
        f"the kill cost the avatar: {before.avatar_session_id} -> {after.avatar_session_id}, recoveries {after.recoveries}"
    )
    await chaos.end(spec)
    await chaos.settle()


@pytest.mark.chaos_long
async def test_kill9_during_room_creation(chaos: Scenario) -> None:
    spec = chaos.spec()
    chaos.stack.pause("livekit")  # create_room stays in flight: LiveKit accepts the connection, answers nothing
    try:
        await chaos.start(spec)
        await chaos.kill_worker_running(spec, "create_room")
    finally:
        chaos.stack.resume("livekit")
    await chaos.join_human(spec)  # the join waits for the room, which the retried create_room makes
    await chaos.live_with_avatar(spec, timeout=60)
    await chaos.end(spec)
    await chaos.settle()


@pytest.mark.chaos_long
async def test_kill9_during_avatar_start(chaos: Scenario) -> None:
    spec = chaos.spec()
    await chaos.emulator("latency", {"endpoint": "start", "seconds": HELD_S})
    await chaos.join_human(spec)
    await chaos.kill_worker_running(spec, "start_avatar_session")
    being_started = (await chaos.client.state(spec.session_id)).avatar_session_id  # recorded before the start call
    await chaos.emulator("reset")
    # The retried start (on another worker, after the heartbeat or start-to-close timeout) finds the session started:
    # the same avatar session serves, with no replacement and no fallback.
    state = await chaos.live_with_avatar(spec, timeout=90)
    chaos.note(f"after the kill: avatar {state.avatar_session_id} (being started: {being_started}), status={state.status}")
    assert being_started is not None and state.avatar_session_id == being_started and state.recoveries == [], (
        f"the kill during the start cost the avatar: {being_started} -> {state.avatar_session_id}, {state.recoveries}"
    )
    await chaos.end(spec)
    await chaos.settle()


@pytest.mark.chaos_long
async def test_kill9_during_cleanup(chaos: Scenario) -> None:
    spec = chaos.spec()
    await chaos.join_human(spec)
    await chaos.live_with_avatar(spec)
    await chaos.emulator("latency", {"endpoint": "stop", "seconds": HELD_S})
    ending = chaos.end_soon(spec)
    await chaos.kill_worker_running(spec, "stop_avatar_session")
    await chaos.emulator("reset")
    # stop_avatar_session has no heartbeat: the retry comes after its start_to_close (30 s).
    await chaos.ended(ending, 75)
    await chaos.settle()
