"""The machine's bound on participant tokens: never past the session's hard cap plus TOKEN_GRACE."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from workflows.machine import PARTICIPANT_TOKEN_TTL, TOKEN_GRACE, SessionMachine
from workflows.models import SessionSpec

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def spec(cap_s: int) -> SessionSpec:
    return SessionSpec.model_validate({
        "session_id": "ttl-1", "kind": "interview", "participants": [{"identity": "cand", "role": "candidate"}],
        "max_duration": timedelta(seconds=min(cap_s, 3600)), "max_duration_cap": timedelta(seconds=cap_s),
    })


@given(cap_s=st.integers(30, 12 * 3600), after_s=st.floats(0, 12 * 3600))
def test_a_token_never_outlives_the_hard_cap_plus_grace_nor_the_usual_ttl(cap_s: int, after_s: float) -> None:
    machine = SessionMachine(spec(cap_s), started_at=T0)
    now = T0 + timedelta(seconds=min(after_s, cap_s))
    ttl = machine.admit("cand", now).ttl
    assert ttl <= PARTICIPANT_TOKEN_TTL
    assert now + ttl <= max(T0 + timedelta(seconds=cap_s) + TOKEN_GRACE, now + timedelta(seconds=1))
    assert ttl >= min(PARTICIPANT_TOKEN_TTL, TOKEN_GRACE)  # always long enough to connect


def test_without_now_the_token_keeps_the_ttl_sessions_started_before_the_bound_use() -> None:
    assert SessionMachine(spec(45), started_at=T0).admit("cand").ttl == PARTICIPANT_TOKEN_TTL
