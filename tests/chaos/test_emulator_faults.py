"""LiveAvatar misbehaving (the emulator's fault injection): error bursts, a hung stop, a crashed avatar, an idle
expiry while no worker keeps the avatar alive."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.harness import IDLE_TIMEOUT_S, Scenario
from tests.support.polling import eventually
from workflows.models import SessionSpec, SessionState, SessionStatus


@pytest.mark.parametrize("status", [503, 429])
async def test_error_burst_on_avatar_start(chaos: Scenario, status: int) -> None:
    """Two failed `start` calls in a row: the avatar still comes up (retried), then the session ends cleanly."""
    await chaos.emulator("faults", {"endpoint": "start", "status": status, "count": 2})
    spec = chaos.spec(immediately=True)
    await chaos.start(spec)
    await chaos.live_with_avatar(spec)
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
    await recovered_or_fell_back(chaos, spec, crashed)
    await chaos.end(spec)
    await chaos.settle()


@pytest.mark.chaos_long
async def test_avatar_idle_expiry_while_no_worker_runs(chaos: Scenario) -> None:
    """Every worker dies for longer than LiveAvatar's idle timeout: the vendor ends the avatar (IDLE_TIMEOUT).
    When workers are back the session must notice, and recover or fall back."""
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
    await recovered_or_fell_back(chaos, spec, expired)
    await chaos.end(spec)
    await chaos.settle()


async def recovered_or_fell_back(chaos: Scenario, spec: SessionSpec, lost: str) -> SessionState:
    """The session noticed the loss of avatar `lost`: a new avatar is in the room (recovered), or the session is
    DEGRADED with the problem recorded (fell back). Either way the lost avatar session is no longer billed."""

    def noticed(s: SessionState) -> bool:
        recovered = s.avatar_present and s.avatar_session_id not in (None, lost)
        fell_back = s.status is SessionStatus.DEGRADED and s.end_detail is not None
        return recovered or fell_back

    state = await chaos.state_when(spec, f"notice that avatar {lost} is gone (recover or degrade)", noticed, 45)
    chaos.note(f"after losing {lost}: status={state.status}, avatar={state.avatar_session_id}, detail={state.end_detail}")
    await eventually(lambda: _avatar_not_active(chaos, lost), what=f"the lost avatar session {lost} to be released while the session lives",
                     timeout=30, every=0.5)
    return state


async def _avatar(chaos: Scenario, avatar_id: str) -> dict[str, Any] | None:
    snap = await chaos.snapshot()
    return next((a for a in snap.avatars or [] if a["id"] == avatar_id), None)


async def _avatar_ended(chaos: Scenario, avatar_id: str, reason: str) -> bool:
    a = await _avatar(chaos, avatar_id)
    return a is not None and a["state"] == "ended" and a.get("end_reason") == reason


async def _avatar_not_active(chaos: Scenario, avatar_id: str) -> bool:
    a = await _avatar(chaos, avatar_id)
    return a is not None and a["state"] != "active"
