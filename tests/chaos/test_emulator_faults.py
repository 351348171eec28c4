"""LiveAvatar misbehaving (the emulator's fault injection): error bursts, a hung stop, a crashed avatar, an idle
expiry while no worker keeps the avatar alive."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.chaos import IDLE_TIMEOUT_S, RELEASED_BY_US, Scenario
from tests.support.polling import eventually
from workflows.models import SessionSpec, SessionState, SessionStatus

REPLACED_WITHIN_S = 45  # replace_backoff is 2 s; then a create, a start and the avatar's join


@pytest.mark.parametrize("status", [503, 429])
async def test_error_burst_on_avatar_start(chaos: Scenario, status: int) -> None:
    """Two failed `start` calls in a row: the avatar still comes up (the start retried by Temporal, not replaced),
    then the session ends cleanly."""
    await chaos.emulator("faults", {"endpoint": "start", "status": status, "count": 2})
    spec = chaos.spec(immediately=True)
    await chaos.start(spec)
    state = await chaos.live_with_avatar(spec)
    assert state.recoveries == [], f"a retryable start error cost an avatar session: {state.recoveries}"
    await chaos.end(spec)
    await chaos.settle()


@pytest.mark.chaos_long
async def test_hang_on_avatar_stop(chaos: Scenario) -> None:
    """The first `stop` never answers: the client's call timeout and the cleanup's retries still release it."""
    spec = chaos.spec(immediately=True)
    await chaos.start(spec)
    await chaos.live_with_avatar(spec)
    await chaos.emulator("hang", {"endpoint": "stop", "count": 1})
    await chaos.end(spec, timeout=75)
    await chaos.settle()


@pytest.mark.chaos_long
async def test_avatar_crash(chaos: Scenario) -> None:
    """The avatar drops out of the room while its LiveAvatar session stays active (and billed)."""
    spec = chaos.spec()
    await chaos.join_human(spec)
    crashed = (await chaos.live_with_avatar(spec)).avatar_session_id
    assert crashed is not None
    await chaos.emulator(f"sessions/{crashed}/crash")
    await replaced(chaos, spec, crashed, lost_end_reason=RELEASED_BY_US)  # the crashed one is still billed: we stop it
    await chaos.end(spec)
    await chaos.settle()


@pytest.mark.chaos_long
async def test_avatar_idle_expiry_while_no_worker_runs(chaos: Scenario) -> None:
    """Every worker dies for longer than LiveAvatar's idle timeout: the vendor ends the avatar (IDLE_TIMEOUT).
    When workers are back the session must notice and replace it."""
    spec = chaos.spec()
    await chaos.join_human(spec)
    expired = (await chaos.live_with_avatar(spec)).avatar_session_id
    assert expired is not None
    for worker in chaos.workers.alive:
        await chaos.workers.kill9(worker)
    chaos.vendor_end_ok[expired] = "IDLE_TIMEOUT"  # the fault under test, not a leak of ours
    await eventually(
        lambda: _avatar_ended(chaos, expired, "IDLE_TIMEOUT"),
        what=f"the emulator to end avatar {expired} with IDLE_TIMEOUT (idle timeout {IDLE_TIMEOUT_S:.0f} s)",
        timeout=IDLE_TIMEOUT_S + 20, every=1,
    )
    await chaos.workers.ensure()
    await replaced(chaos, spec, expired, lost_end_reason="IDLE_TIMEOUT")
    await chaos.end(spec)
    await chaos.settle()


async def replaced(chaos: Scenario, spec: SessionSpec, lost: str, *, lost_end_reason: str) -> SessionState:
    """The session replaced avatar `lost`, as its policy promises (max_replacements 2, when_lost continue): within
    REPLACED_WITHIN_S it is LIVE again with a new avatar session in the room, the state records exactly one
    replacement, the emulator has the new session active with its avatar present, and `lost` is no longer billed
    (ended with `lost_end_reason`). Degraded, or continuing without an avatar, does not pass."""

    def back_with_a_new_avatar(s: SessionState) -> bool:
        return (
            s.status is SessionStatus.LIVE and s.avatar_present and s.avatar_session_id not in (None, lost)
            and not s.avatar_fallback and s.end_detail is None
        )

    state = await chaos.state_when(
        spec, f"a replacement for avatar {lost} in the room", back_with_a_new_avatar, REPLACED_WITHIN_S
    )
    chaos.note(f"{lost} replaced by {state.avatar_session_id}; recoveries: {state.recoveries}")
    replacements = [r for r in state.recoveries if r.startswith("avatar replacement ")]
    assert len(replacements) == 1, f"expected one avatar replacement, the session recorded {state.recoveries}"
    assert state.avatar_session_id is not None  # back_with_a_new_avatar saw it
    new = await _avatar(chaos, state.avatar_session_id)
    assert new is not None and new["state"] == "active" and new["avatar_present"], f"the replacement is not live: {new}"
    assert new["livekit_room"] == spec.room_name, new
    await eventually(
        lambda: _avatar_ended(chaos, lost, lost_end_reason),
        what=f"the lost avatar session {lost} to be ended ({lost_end_reason}) while the session lives", timeout=30, every=0.5,
    )
    return state


async def _avatar(chaos: Scenario, avatar_id: str) -> dict[str, Any] | None:
    snap = await chaos.snapshot()
    return next((a for a in snap.avatars or [] if a["id"] == avatar_id), None)


async def _avatar_ended(chaos: Scenario, avatar_id: str, reason: str) -> bool:
    a = await _avatar(chaos, avatar_id)
    return a is not None and a["state"] == "ended" and a.get("end_reason") == reason
