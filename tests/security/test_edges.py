"""Lax coercion is gone from the input models, and what earlier releases wrote still reads.

The input models (`SessionSpec`, `Participant`, `AvatarSpec`, `JoinRequest`, `EndRequest`, `ExtendRequest`,
`ConsentRequest`, `RecordingSpec`)
refuse `"3"` for 3 and `true` for a duration in both ways they are read: from Python values (the client, the
HTTP API) and from JSON (the data converter reading workflow payloads). A duration is a whole number of
seconds or an ISO 8601 string, which is what every recorded history holds.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory

from config.settings import DEFAULT_AVATAR_ID
from tests.support.codec import corpus_data_converter
from workflows.machine import CarriedSession
from workflows.models import ConsentRequest, EndRequest, ExtendRequest, JoinRequest, SessionKind, SessionSpec

HISTORIES = sorted((Path(__file__).parents[1] / "replay" / "histories").glob("*.json"))


def spec_data(**overrides: Any) -> dict[str, Any]:
    return {
        "session_id": "edge-1",
        "kind": "interview",
        "participants": [{"identity": "cand", "role": "candidate"}],
        "avatar": {"avatar_id": DEFAULT_AVATAR_ID},
    } | overrides


def both_ways(model: type[BaseModel], data: dict[str, Any]) -> list[BaseModel]:
    """`data` read as Python values and as JSON text (as the data converter reads a payload)."""
    return [model.model_validate(data), model.model_validate_json(json.dumps(data))]


@pytest.mark.parametrize(
    ("model", "data", "where"),
    [
        (SessionSpec, spec_data(max_participants="3"), "max_participants"),
        (SessionSpec, spec_data(max_participants=3.0), "max_participants"),
        (SessionSpec, spec_data(max_participants=True), "max_participants"),
        (SessionSpec, spec_data(max_duration=True), "max_duration"),
        (SessionSpec, spec_data(max_duration="3600"), "max_duration"),
        (SessionSpec, spec_data(max_duration=3600.0), "max_duration"),
        (SessionSpec, spec_data(max_duration=[3600]), "max_duration"),
        (SessionSpec, spec_data(no_show_timeout=10**30), "no_show_timeout"),  # no OverflowError from timedelta
        (SessionSpec, spec_data(kind=1), "kind"),
        (SessionSpec, spec_data(session_id=123), "session_id"),
        (SessionSpec, spec_data(metadata={"k": 1}), "metadata.k"),
        (SessionSpec, spec_data(avatar={"avatar_id": DEFAULT_AVATAR_ID, "is_sandbox": "true"}), "avatar.is_sandbox"),
        (SessionSpec, spec_data(avatar={"avatar_id": DEFAULT_AVATAR_ID, "is_sandbox": 1}), "avatar.is_sandbox"),
        (SessionSpec, spec_data(avatar={"avatar_id": DEFAULT_AVATAR_ID, "max_replacements": "2"}), "avatar.max_replacements"),
        (SessionSpec, spec_data(avatar={"avatar_id": DEFAULT_AVATAR_ID, "replace_backoff": False}), "avatar.replace_backoff"),
        (SessionSpec, spec_data(participants=[{"identity": 5, "role": "candidate"}]), "participants.0.identity"),
        (SessionSpec, spec_data(participants=[{"identity": "c", "role": "candidate", "name": 5}]), "participants.0.name"),
        (JoinRequest, {"identity": 42}, "identity"),
        (EndRequest, {"reason": 42}, "reason"),
        (ExtendRequest, {"by": True}, "by"),
        (ExtendRequest, {"by": "60"}, "by"),
        (ExtendRequest, {"by": 1.5}, "by"),
    ],
)
def test_no_coercion_either_way(model: type[BaseModel], data: dict[str, Any], where: str) -> None:
    for read in (model.model_validate, lambda d: model.model_validate_json(json.dumps(d))):
        with pytest.raises(ValidationError) as refused:
            read(data)
        assert where in {".".join(str(x) for x in e["loc"]) for e in refused.value.errors()}


@pytest.mark.parametrize(
    "duration", [600, "PT10M", "00:10:00", timedelta(minutes=10)], ids=["seconds", "iso8601", "hh:mm:ss", "timedelta"]
)
def test_a_duration_is_whole_seconds_or_iso_8601(duration: Any) -> None:
    data = spec_data(max_duration=duration)
    readings = [SessionSpec.model_validate(data)]
    if not isinstance(duration, timedelta):
        readings.append(SessionSpec.model_validate_json(json.dumps(data)))
    assert {s.max_duration for s in readings} == {timedelta(minutes=10)}


def test_enums_take_their_values_and_members() -> None:
    for spec in both_ways(SessionSpec, spec_data(kind="coaching")):
        assert isinstance(spec, SessionSpec) and spec.kind is SessionKind.COACHING
    assert SessionSpec.model_validate(spec_data(kind=SessionKind.COACHING)).kind is SessionKind.COACHING


async def test_a_spec_written_by_the_converter_reads_back_equal() -> None:
    spec = SessionSpec.model_validate(spec_data(max_duration=900, reconnect_grace="PT30S", deployment="local"))
    request = JoinRequest(identity="cand", spec=spec)
    converter = corpus_data_converter()
    [back] = await converter.decode(await converter.encode([request]), [JoinRequest])
    assert back == request and back.spec == spec


def _recorded_inputs() -> list[tuple[str, type[BaseModel], Payload]]:
    """Every session spec and update input in the replay corpus, with the model it must read as."""
    models: dict[str, type[BaseModel]] = {
        "join": JoinRequest, "end": EndRequest, "extend": ExtendRequest, "consent": ConsentRequest,
    }
    found: list[tuple[str, type[BaseModel], Payload]] = []
    for path in HISTORIES:
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                attributes = event.workflow_execution_started_event_attributes
                # A run that continued an earlier one starts from the carried state, not a spec.
                started_as = CarriedSession if attributes.continued_execution_run_id else SessionSpec
                found += [(path.stem, started_as, p) for p in attributes.input.payloads]
            elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
                accepted = event.workflow_execution_update_accepted_event_attributes.accepted_request.input
                found += [(path.stem, models[accepted.name], p) for p in accepted.args.payloads]
    return found


async def test_every_recorded_input_still_reads() -> None:
    """What earlier releases wrote (lax models, no `spec` in a join) reads under the strict models, in JSON
    mode as the converter reads it; `tests/replay` replays the same histories whole."""
    inputs = _recorded_inputs()
    assert {model for _, model, _ in inputs} == {
        SessionSpec, CarriedSession, JoinRequest, EndRequest, ExtendRequest, ConsentRequest,
    }
    converter = corpus_data_converter()  # the corpus is encrypted with its test key
    started: dict[str, SessionSpec] = {}  # each history's spec (its started event comes first)
    for name, model, payload in inputs:
        [value] = await converter.decode([payload], [model])
        assert isinstance(value, model), name
        if isinstance(value, SessionSpec | CarriedSession):
            started.setdefault(name, value if isinstance(value, SessionSpec) else value.spec)
        if isinstance(value, JoinRequest):
            # Recorded before joins carried their spec, or (update-with-start) carrying the very spec it started.
            assert value.spec is None or value.spec == started[name], name
