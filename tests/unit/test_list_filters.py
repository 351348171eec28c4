"""`sessionflow list`'s support filters: end reason, degraded, participant (by its opaque id only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from starters.client import InvalidInput
from starters.report import session_filter
from workflows.search_attributes import participant_id

KEY = b"test-key"


def test_the_filters_become_the_query_support_types_in_the_ui() -> None:
    which = session_filter("ended", None, 5, end_reason="avatar_lost", degraded="yes", participant="cand-17", participant_key=KEY)
    assert which.query() == (
        "WorkflowType = 'SessionWorkflow' AND SessionStatus = 'ended' AND SessionEndReason = 'avatar_lost' "
        f"AND SessionDegraded = true AND ParticipantIds = '{participant_id('cand-17', KEY)}'"
    )
    assert session_filter(None, None, 5, degraded="no").query().endswith("SessionDegraded = false")


def test_a_participant_is_searched_by_a_keyed_hash_never_by_name() -> None:
    pid = participant_id("cand-17", KEY)
    assert pid.startswith("p-") and len(pid) == 26 and "cand" not in pid
    assert pid == participant_id("cand-17", KEY)  # the starter and the CLI agree
    assert pid != participant_id("cand-17", b"another deployment's key")
    assert pid != participant_id("cand-18", KEY)
    assert "cand-17" not in session_filter(None, None, 5, participant="cand-17", participant_key=KEY).query()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"end_reason": "bored"}, "unknown end reason 'bored': use one of requested, max_duration"),
        ({"end_reason": "requested' OR SessionId != '"}, "unknown end reason"),  # no way into the query
        ({"degraded": "maybe"}, "--degraded takes yes or no, not 'maybe'"),
        ({"participant": "Jane Doe"}, "--participant 'Jane Doe' is not a participant identity"),
        ({"participant": ""}, "is not a participant identity"),
    ],
)
def test_bad_filters_are_refused_with_what_is_allowed(options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        session_filter(None, None, 5, participant_key=KEY, **options)  # type: ignore[arg-type]  # str options only
    assert message in str(refused.value)


def test_the_cli_refuses_a_bad_filter_before_contacting_temporal() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from starters.cli import main; main()", "list", "--degraded", "sometimes"],
        env={**os.environ, "TEMPORAL_ADDRESS": "127.0.0.1:9"}, capture_output=True, text=True, timeout=60,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "sessionflow: error: --degraded takes yes or no, not 'sometimes'\n"
