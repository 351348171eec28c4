"""The reaper's pure pieces: the injection-safe owner query, and the one "is the owner gone?" decision."""

from __future__ import annotations

import uuid

import pytest
from temporalio.client import WorkflowExecutionStatus as S

from activities.reaper import (
    AVATAR_SESSION_ID_ATTRIBUTE,
    SuspiciousId,
    Verdict,
    avatar_owner_query,
    owner_gone,
    verdict,
)
from workflows.search_attributes import AVATAR_SESSION_ID


@pytest.mark.parametrize(
    "avatar_session_id",
    ["6f1c2e9a-3b4d-4c5e-8f70-1a2b3c4d5e6f", "6F1C2E9A-3B4D-4C5E-8F70-1A2B3C4D5E6F", str(uuid.uuid4())],
)
def test_a_uuid_becomes_an_exact_match_on_the_attribute_the_workflow_records(avatar_session_id: str) -> None:
    # Used verbatim (not normalised): the Keyword match is exact, and the workflow recorded it as LiveAvatar gave it.
    assert avatar_owner_query(avatar_session_id) == f'AvatarSessionId = "{avatar_session_id}"'


def test_the_attribute_name_is_the_one_the_session_workflow_upserts() -> None:
    assert AVATAR_SESSION_ID.name == AVATAR_SESSION_ID_ATTRIBUTE


@pytest.mark.parametrize(
    "hostile",
    [
        'x" OR AvatarSessionId != "',
        '6f1c2e9a-3b4d-4c5e-8f70-1a2b3c4d5e6f" OR "1" = "1',
        "6f1c2e9a-3b4d-4c5e-8f70-1a2b3c4d5e6f' OR WorkflowId != '",
        "6f1c2e9a-3b4d-4c5e-8f70-1a2b3c4d5e6f OR ExecutionStatus = 'Running'",
        "6f1c2e9a-3b4d-4c5e-8f70-1a2b3c4d5e6f\\",
        '6f1c2e9a-3b4d-4c5e-8f70-1a2b3c4d5e6f\\" OR \\"',
        "6f1c2e9a 3b4d 4c5e 8f70 1a2b3c4d5e6f",
        " 6f1c2e9a-3b4d-4c5e-8f70-1a2b3c4d5e6f",
        "6f1c2e9a-3b4d-4c5e-8f70-1a2b3c4d5e6f\n",
        "6f1c2e9a3b4d4c5e8f701a2b3c4d5e6f",  # uuid.UUID accepts it; we take only the canonical form
        "{6f1c2e9a-3b4d-4c5e-8f70-1a2b3c4d5e6f}",
        "6f1c2e9a-3b4d-4c5e-8f70-1a2b3c4d5e6g",
        "",
    ],
)
def test_anything_but_a_uuid_is_refused_and_never_reaches_a_query(hostile: str) -> None:
    with pytest.raises(SuspiciousId, match="not a UUID"):
        avatar_owner_query(hostile)


def test_a_non_string_id_is_refused() -> None:
    with pytest.raises(SuspiciousId):
        avatar_owner_query(uuid.uuid4())  # type: ignore[arg-type]  # the point: only a str id is accepted


@pytest.mark.parametrize(
    ("owners", "gone"),
    [
        ([], True),  # no workflow at all (never started, or deleted)
        ([S.TERMINATED], True),
        ([S.COMPLETED, S.FAILED, S.CANCELED, S.TIMED_OUT, S.CONTINUED_AS_NEW], True),
        ([None], True),
        ([S.RUNNING], False),
        ([S.TERMINATED, S.RUNNING], False),  # an old run ended, a newer one still holds it
    ],
)
def test_a_resource_is_orphaned_only_when_no_owner_is_running(owners: list[S | None], gone: bool) -> None:
    assert owner_gone(owners) is gone


@pytest.mark.parametrize(
    ("owners", "age_s", "expected"),
    [
        ([S.RUNNING], 10_000.0, Verdict.OWNED),  # however old, a running session keeps what it holds
        ([S.RUNNING], None, Verdict.OWNED),
        ([S.TERMINATED], 5.0, Verdict.YOUNG),  # its workflow may not have recorded it yet
        ([], 59.9, Verdict.YOUNG),
        ([], 60.0, Verdict.ORPHAN),
        ([S.TERMINATED], 3600.0, Verdict.ORPHAN),
        ([], None, Verdict.ORPHAN),  # cannot be dated, still bills: released
    ],
)
def test_the_grace_period_spares_young_orphans_only(owners: list[S | None], age_s: float | None, expected: Verdict) -> None:
    assert verdict(owners, age_s, grace_s=60.0) is expected


@pytest.mark.parametrize(
    ("owners", "age_s", "expected"),
    [
        ([], 3600.0, Verdict.NOT_OURS),  # no workflow of ours recorded it: another app's, however old
        ([], None, Verdict.NOT_OURS),
        ([S.RUNNING], 3600.0, Verdict.OWNED),
        ([S.TERMINATED], 5.0, Verdict.YOUNG),
        ([S.COMPLETED], 3600.0, Verdict.ORPHAN),  # recorded by a session of ours that has closed
    ],
)
def test_an_avatar_session_is_judged_only_when_a_workflow_of_ours_recorded_it(
    owners: list[S | None], age_s: float | None, expected: Verdict
) -> None:
    assert verdict(owners, age_s, grace_s=60.0, needs_recorded_owner=True) is expected
