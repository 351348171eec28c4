"""Bad input is rejected at the edge, with an error that names what was wrong, before any room exists."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from workflows.models import (
    MAX_METADATA_BYTES,
    AvatarStart,
    EndRequest,
    ExtendRequest,
    Role,
    SessionKind,
    SessionSpec,
)

AVATAR_ID = "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a"


def spec_data(**overrides: Any) -> dict[str, Any]:
    """A valid SessionSpec payload, as a backend would send it, with `overrides` applied."""
    return {
        "session_id": "abc-123",
        "kind": "interview",
        "participants": [
            {"identity": "alice", "role": "candidate", "name": "Alice"},
            {"identity": "bob.smith", "role": "interviewer"},
        ],
        **overrides,
    }


def person(identity: Any, role: str = "candidate", **extra: Any) -> dict[str, Any]:
    return {"identity": identity, "role": role, **extra}


def metadata_of_json_size(size: int) -> dict[str, str]:
    """Metadata whose compact JSON is exactly `size` bytes, every key and value within its own limit."""
    metadata = {f"k{i}": "x" * 1000 for i in range(size // 1010)}
    used = len(json.dumps(metadata, separators=(",", ":")).encode())
    metadata["z"] = "x" * (size - used - len(',"z":""'))
    assert len(json.dumps(metadata, separators=(",", ":")).encode()) == size
    return metadata


def rejection(model: type[BaseModel], data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str, str]]:
    """Validate `data`, expecting a failure; return each error as (location, type, message)."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return [(tuple(e["loc"]), e["type"], e["msg"]) for e in caught.value.errors()]


def single_rejection(model: type[BaseModel], data: dict[str, Any]) -> tuple[tuple[Any, ...], str, str]:
    errors = rejection(model, data)
    assert len(errors) == 1, errors
    return errors[0]


# ---- the happy path ----------------------------------------------------------------------------------------


def test_minimal_spec_gets_documented_defaults():
    spec = SessionSpec.model_validate(spec_data())
    assert spec.kind is SessionKind.INTERVIEW
    assert spec.avatar is None
    assert spec.max_duration == timedelta(hours=1)
    assert spec.max_duration_cap == timedelta(hours=2)
    assert spec.no_show_timeout == timedelta(minutes=10)
    assert spec.max_participants is None
    assert spec.metadata == {}
    assert [p.role for p in spec.participants] == [Role.CANDIDATE, Role.INTERVIEWER]


def test_workflow_id_and_room_name_are_the_prefixed_session_id():
    spec = SessionSpec.model_validate(spec_data(session_id="s_42-x"))
    assert spec.workflow_id == "session-s_42-x"
    assert spec.room_name == "session-s_42-x"


def test_room_capacity_is_the_roster_size_unless_max_participants_is_set():
    assert SessionSpec.model_validate(spec_data()).room_capacity == 2
    assert SessionSpec.model_validate(spec_data(max_participants=5)).room_capacity == 5


def test_participant_lookup_by_identity():
    spec = SessionSpec.model_validate(spec_data())
    found = spec.participant("bob.smith")
    assert found is not None and found.role is Role.INTERVIEWER
    assert spec.participant("mallory") is None


def test_avatar_defaults_to_start_on_first_join_outside_the_sandbox():
    spec = SessionSpec.model_validate(spec_data(avatar={"avatar_id": AVATAR_ID}))
    assert spec.avatar is not None
    assert spec.avatar.start is AvatarStart.ON_FIRST_JOIN
    assert spec.avatar.is_sandbox is False


def test_metadata_exactly_at_the_byte_limit_is_accepted():
    metadata = metadata_of_json_size(MAX_METADATA_BYTES)
    assert SessionSpec.model_validate(spec_data(metadata=metadata)).metadata == metadata


def test_max_duration_cap_equal_to_max_duration_is_accepted():
    spec = SessionSpec.model_validate(spec_data(max_duration=600, max_duration_cap=600))
    assert spec.max_duration == spec.max_duration_cap == timedelta(minutes=10)


def test_extend_and_end_requests_accept_sensible_values():
    assert ExtendRequest.model_validate({"by": 300}).by == timedelta(minutes=5)
    assert ExtendRequest.model_validate({"by": 4 * 3600}).by == timedelta(hours=4)
    assert EndRequest().reason == "ended by request"
    assert EndRequest.model_validate({"reason": "x" * 200}).reason == "x" * 200


# ---- session ids --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "session_id",
    ["ABC-123", "ab", "a" * 65, "has space", "a/b", "", "-abc", "abc\n"],
    ids=["uppercase", "too-short", "too-long", "space", "slash", "empty", "leading-dash", "newline"],
)
def test_malformed_session_id_is_rejected_naming_the_field(session_id):
    loc, kind, _ = single_rejection(SessionSpec, spec_data(session_id=session_id))
    assert loc == ("session_id",)
    assert kind == "string_pattern_mismatch"


@pytest.mark.parametrize("session_id", ["abc", "a" * 64, "0-_"])
def test_session_id_boundaries_are_accepted(session_id):
    assert SessionSpec.model_validate(spec_data(session_id=session_id)).session_id == session_id


# ---- participants --------------------------------------------------------------------------------------------


def test_unknown_role_is_rejected_listing_the_valid_roles():
    loc, kind, msg = single_rejection(SessionSpec, spec_data(participants=[person("alice", role="boss")]))
    assert loc == ("participants", 0, "role")
    assert kind == "enum"
    for role in Role:
        assert role.value in msg


@pytest.mark.parametrize(
    "identity",
    ["has space", "a/b", "", ".alice", "a" * 65, "ünïcode"],
    ids=["space", "slash", "empty", "leading-dot", "too-long", "non-ascii"],
)
def test_malformed_identity_is_rejected_at_its_position(identity):
    data = spec_data(participants=[person("alice"), person(identity, role="coach")])
    loc, kind, _ = single_rejection(SessionSpec, data)
    assert loc == ("participants", 1, "identity")
    assert kind == "string_pattern_mismatch"


@pytest.mark.parametrize("identity", ["avatar-abc-123", "monitor-1", "avatar-x"])
def test_reserved_identity_prefix_is_rejected_and_explained(identity):
    loc, _, msg = single_rejection(SessionSpec, spec_data(participants=[person(identity)]))
    assert loc == ("participants", 0, "identity")
    assert identity in msg
    assert "reserved" in msg and "avatar-" in msg and "monitor-" in msg


def test_identity_merely_containing_a_reserved_word_is_accepted():
    spec = SessionSpec.model_validate(spec_data(participants=[person("my-avatar-fan"), person("avatar")]))
    assert [p.identity for p in spec.participants] == ["my-avatar-fan", "avatar"]


def test_duplicate_identities_are_rejected_naming_the_repeated_ones():
    data = spec_data(participants=[person("alice"), person("bob"), person("alice", role="observer"), person("bob")])
    _, _, msg = single_rejection(SessionSpec, data)
    assert "unique" in msg
    assert "repeated: alice, bob" in msg


def test_empty_participant_list_is_rejected():
    loc, kind, _ = single_rejection(SessionSpec, spec_data(participants=[]))
    assert loc == ("participants",)
    assert kind == "too_short"


def test_more_than_fifty_participants_is_rejected():
    loc, kind, _ = single_rejection(SessionSpec, spec_data(participants=[person(f"p{i}") for i in range(51)]))
    assert loc == ("participants",)
    assert kind == "too_long"


def test_participants_as_a_string_is_rejected():
    loc, kind, _ = single_rejection(SessionSpec, spec_data(participants="alice"))
    assert loc == ("participants",)
    assert kind == "list_type"


def test_integer_identity_is_rejected_not_coerced():
    loc, kind, _ = single_rejection(SessionSpec, spec_data(participants=[person(5)]))
    assert loc == ("participants", 0, "identity")
    assert kind == "string_type"


# ---- durations --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "kind"),
    [(29, "greater_than_equal"), (8 * 3600 + 1, "less_than_equal")],
    ids=["below-30s", "above-8h"],
)
def test_max_duration_outside_30s_to_8h_is_rejected(seconds, kind):
    errors = rejection(SessionSpec, spec_data(max_duration=seconds, max_duration_cap=12 * 3600))
    assert [(loc, k) for loc, k, _ in errors] == [(("max_duration",), kind)]


@pytest.mark.parametrize("seconds", [30, 8 * 3600])
def test_max_duration_boundaries_are_accepted(seconds):
    spec = SessionSpec.model_validate(spec_data(max_duration=seconds, max_duration_cap=12 * 3600))
    assert spec.max_duration == timedelta(seconds=seconds)


def test_max_duration_as_text_is_rejected():
    loc, _, _ = single_rejection(SessionSpec, spec_data(max_duration="an hour"))
    assert loc == ("max_duration",)


def test_max_duration_cap_below_max_duration_is_rejected_and_says_so():
    _, _, msg = single_rejection(SessionSpec, spec_data(max_duration=3 * 3600, max_duration_cap=2 * 3600))
    assert "max_duration_cap must be at least max_duration" in msg


def test_default_cap_does_not_silently_accept_a_longer_max_duration():
    # the cap defaults to 2 h: asking for 3 h without raising the cap is an error, not a clamp
    _, _, msg = single_rejection(SessionSpec, spec_data(max_duration=3 * 3600))
    assert "max_duration_cap" in msg


# ---- metadata --------------------------------------------------------------------------------------------


def test_oversize_metadata_is_rejected_with_its_size_and_the_limit():
    data = spec_data(metadata={f"k{i}": "v" * 1000 for i in range(5)})
    _, _, msg = single_rejection(SessionSpec, data)
    assert f"the limit is {MAX_METADATA_BYTES}" in msg
    assert "5041 bytes" in msg


def test_metadata_one_byte_over_the_limit_is_rejected():
    _, _, msg = single_rejection(SessionSpec, spec_data(metadata=metadata_of_json_size(MAX_METADATA_BYTES + 1)))
    assert f"{MAX_METADATA_BYTES + 1} bytes" in msg


def test_metadata_key_over_64_chars_is_rejected_at_that_key():
    key = "k" * 65
    loc, kind, _ = single_rejection(SessionSpec, spec_data(metadata={key: "v"}))
    assert loc == ("metadata", key, "[key]")
    assert kind == "string_too_long"


def test_metadata_value_over_1024_chars_is_rejected_at_that_key():
    loc, kind, _ = single_rejection(SessionSpec, spec_data(metadata={"note": "v" * 1025}))
    assert loc == ("metadata", "note")
    assert kind == "string_too_long"


def test_non_string_metadata_value_is_rejected():
    loc, _, _ = single_rejection(SessionSpec, spec_data(metadata={"count": 3}))
    assert loc == ("metadata", "count")


# ---- extra fields, avatar -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"room": "elsewhere"}, ("room",)),
        ({"participants": [person("alice", admin=True)]}, ("participants", 0, "admin")),
        ({"avatar": {"avatar_id": AVATAR_ID, "voice": "deep"}}, ("avatar", "voice")),
    ],
    ids=["top-level", "in-participant", "in-avatar"],
)
def test_extra_fields_are_forbidden_and_located(overrides, where):
    loc, kind, _ = single_rejection(SessionSpec, spec_data(**overrides))
    assert loc == where
    assert kind == "extra_forbidden"


@pytest.mark.parametrize(
    "avatar_id", ["wayne", "DD73EA75-1218-4EF3-92CE-606D5F7FBC0A", AVATAR_ID[:-1], AVATAR_ID.replace("-", "")]
)
def test_avatar_id_must_be_a_lowercase_uuid(avatar_id):
    loc, kind, _ = single_rejection(SessionSpec, spec_data(avatar={"avatar_id": avatar_id}))
    assert loc == ("avatar", "avatar_id")
    assert kind == "string_pattern_mismatch"


def test_unknown_avatar_start_policy_is_rejected():
    loc, _, msg = single_rejection(SessionSpec, spec_data(avatar={"avatar_id": AVATAR_ID, "start": "later"}))
    assert loc == ("avatar", "start")
    assert "on_first_join" in msg and "immediately" in msg


def test_spec_is_frozen_once_validated():
    spec = SessionSpec.model_validate(spec_data())
    with pytest.raises(ValidationError):
        spec.session_id = "other"  # type: ignore[misc]  # the point: a frozen model refuses assignment


# ---- extend and end requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("by", "kind"),
    [(0, "greater_than"), (-60, "greater_than"), (4 * 3600 + 1, "less_than_equal")],
    ids=["zero", "negative", "over-4h"],
)
def test_extend_by_must_be_positive_and_at_most_four_hours(by, kind):
    assert [(loc, k) for loc, k, _ in rejection(ExtendRequest, {"by": by})] == [(("by",), kind)]


def test_extend_request_forbids_extra_fields():
    loc, kind, _ = single_rejection(ExtendRequest, {"by": 60, "until": "tomorrow"})
    assert (loc, kind) == (("until",), "extra_forbidden")


@pytest.mark.parametrize(("reason", "kind"), [("x" * 201, "string_too_long"), ("", "string_too_short")])
def test_end_reason_must_be_1_to_200_chars(reason, kind):
    assert [(loc, k) for loc, k, _ in rejection(EndRequest, {"reason": reason})] == [(("reason",), kind)]


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"reconnect_grace": 31 * 60}, ("reconnect_grace",)),
        ({"reconnect_grace": -1}, ("reconnect_grace",)),
        ({"avatar": {"avatar_id": AVATAR_ID, "max_replacements": 11}}, ("avatar", "max_replacements")),
        ({"avatar": {"avatar_id": AVATAR_ID, "max_session_duration": 60}}, ("avatar", "max_session_duration")),
        ({"avatar": {"avatar_id": AVATAR_ID, "when_lost": "retry"}}, ("avatar", "when_lost")),
        ({"when_participant_lost": "ignore"}, ("when_participant_lost",)),
    ],
    ids=[
        "grace-over-30min", "grace-negative", "replacements-over-10", "avatar-session-under-2min", "bad-when-lost",
        "bad-participant-policy",
    ],
)
def test_recovery_settings_out_of_range_are_rejected_and_located(overrides, where):
    loc, _, _ = single_rejection(SessionSpec, spec_data(**overrides))
    assert loc == where


def test_what_the_engine_hands_back_tolerates_fields_a_newer_worker_adds() -> None:
    """Backends and workers deploy apart: an outcome or state with a field this release does not know still reads."""
    from workflows.models import SessionOutcome, SessionState

    outcome: dict[str, object] = {
        "session_id": "abc-123", "status": "ended", "end_reason": "requested", "end_detail": None,
        "started_at": "2026-12-02T10:00:00Z", "ended_at": "2026-12-02T10:30:00Z", "live_seconds": 1700.0,
        "avatar_sessions": [], "avatar_seconds": 0.0, "avatar_fallback": False, "recoveries": [],
        "participants_joined": ["cand"], "a_field_from_the_future": 1,
    }
    assert SessionOutcome.model_validate(outcome).end_reason == "requested"
    state: dict[str, object] = {
        "session_id": "abc-123", "kind": "interview", "status": "live", "room": "session-abc-123",
        "started_at": "2026-12-02T10:00:00Z", "ends_at": "2026-12-02T11:00:00Z", "present": [], "admitted": [],
        "avatar_session_id": None, "avatar_identity": None, "avatar_present": False, "avatar_fallback": False,
        "reconnecting": [], "recoveries": [], "end_reason": None, "end_detail": None, "a_field_from_the_future": 1,
    }
    assert SessionState.model_validate(state).status == "live"
