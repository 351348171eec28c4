"""The CLI answers a person's mistakes with a message and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from starters.client import InvalidInput
from starters.report import SessionFilter, render_billing, session_filter
from workflows.models import AvatarBilling, AvatarEndedBy, SessionKind, SessionStatus


def sessionflow(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TEMPORAL_ADDRESS": "127.0.0.1:9"}  # nothing listens there
    return subprocess.run(
        [sys.executable, "-c", "from starters.cli import main; main()", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )


def test_no_temporal_server_is_a_clear_error() -> None:
    result = sessionflow("show", "abc-1")
    assert result.returncode == 2
    assert "cannot reach Temporal at 127.0.0.1:9" in result.stderr and "python -m sandbox dev" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_temporal_certificate_setting_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "TEMPORAL_ADDRESS": "127.0.0.1:9", "TEMPORAL_TLS_CERT": str(tmp_path / "client.pem"),
           "TEMPORAL_TLS_KEY": str(tmp_path / "client.key")}
    result = subprocess.run([sys.executable, "-c", "from starters.cli import main; main()", "show", "abc-1"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"TEMPORAL_TLS_CERT={tmp_path / 'client.pem'} cannot be read" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_spec_that_is_not_json_is_a_clear_error() -> None:
    result = sessionflow("join", "{not json", "cand")
    assert result.returncode == 2
    assert "SPEC must be a JSON file or JSON text" in result.stderr
    assert "Traceback" not in result.stderr


# ---- `sessionflow list` and `show`: input is checked before anything is contacted ------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("list", "--status", "bogus"), "unknown status 'bogus': use one of provisioning, waiting, live, degraded, ending"),
        (("list", "--status", "ended' OR WorkflowId != '"), "unknown status"),  # no way into the query
        (("list", "--kind", "webinar"), "unknown kind 'webinar': use one of interview, coaching"),
        (("list", "--limit", "0"), "--limit must be a whole number from 1 to 1000, not '0'"),
        (("list", "--limit", "lots"), "--limit must be a whole number from 1 to 1000, not 'lots'"),
        (("list", "--limit", "1001"), "--limit must be a whole number from 1 to 1000"),
        (("show", "Not An Id"), "session id 'Not An Id' is not valid"),
    ],
)
def test_bad_input_to_list_and_show_is_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    result = sessionflow(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("sessionflow: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "cannot reach Temporal" not in result.stderr  # refused before connecting
    assert result.stdout == ""


def test_list_filters_become_a_visibility_query_from_the_enum_values_only() -> None:
    assert session_filter(None, None, "20") == SessionFilter(limit=20)
    assert SessionFilter().query() == "WorkflowType = 'SessionWorkflow'"
    which = session_filter("ended", "interview", "5")
    assert which == SessionFilter(SessionStatus.ENDED, SessionKind.INTERVIEW, 5)
    assert which.query() == "WorkflowType = 'SessionWorkflow' AND SessionStatus = 'ended' AND SessionKind = 'interview'"
    assert session_filter(None, "coaching", 1000).query() == "WorkflowType = 'SessionWorkflow' AND SessionKind = 'coaching'"
    for status, kind, limit in [("ENDED", None, 1), (None, "", 1), (None, None, -3), ("live ", None, 1)]:
        with pytest.raises(InvalidInput):
            session_filter(status, kind, limit)


def test_a_running_avatar_session_shows_as_billing_so_far() -> None:
    now = datetime(2026, 12, 2, 6, 10, tzinfo=UTC)
    billing = [
        AvatarBilling(
            avatar_session_id="av-1", identity="avatar-s-1-1", started_at=now - timedelta(minutes=5),
            ended_at=now - timedelta(minutes=1), seconds=240.0, end_reason="ended by LiveAvatar: IDLE_TIMEOUT",
            ended_by=AvatarEndedBy.LIVEAVATAR,
        ),
        AvatarBilling(
            avatar_session_id="av-2", identity="avatar-s-1-2", started_at=now - timedelta(seconds=30),
            ended_at=None, seconds=0.0, end_reason=None, ended_by=None,
        ),
        AvatarBilling(
            avatar_session_id="av-3", identity="avatar-s-1-3", started_at=None, ended_at=None, seconds=0.0,
            end_reason="start failed: 502", ended_by=AvatarEndedBy.SESSIONFLOW,
        ),
    ]
    header, first, second, third, total = render_billing(billing, now).splitlines()
    assert [h.strip() for h in header.split("  ") if h.strip()] == [
        "AVATAR SESSION", "IDENTITY", "START (UTC)", "END (UTC)", "SECONDS", "END REASON", "ENDED BY"
    ]
    assert first.split()[:2] == ["av-1", "avatar-s-1-1"] and "240.0" in first and first.endswith("liveavatar")
    assert "billing" in second and "30.0 so far" in second and second.rstrip().endswith("-")
    assert "start failed: 502" in third and third.endswith("sessionflow")
    assert total.strip() == "total billed so far: 270.0 s over 3 avatar session(s)"
    *_, total = render_billing([billing[0], billing[2]], now).splitlines()
    assert total.strip() == "total billed: 240.0 s over 2 avatar session(s)"
