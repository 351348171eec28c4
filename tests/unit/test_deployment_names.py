"""Resource names carry the deployment, so the reaper and the gateway can tell ours from anyone else's."""

from __future__ import annotations

import pytest
from livekit import api
from pydantic import ValidationError

from config.settings import Settings
from starters.gateway import room_event_from_webhook, session_workflow_id
from workflows.models import RoomEventKind, SessionSpec, deployment_prefix, session_id_of, workflow_id_for

ROSTER = [{"identity": "cand", "role": "candidate"}]


def test_a_sessions_workflow_id_and_room_carry_its_deployment() -> None:
    spec = SessionSpec.model_validate({"session_id": "intv-1", "kind": "interview", "participants": ROSTER, "deployment": "prod"})
    assert spec.workflow_id == spec.room_name == "session-prod-intv-1"
    assert spec.room_name.startswith(deployment_prefix("prod"))


def test_a_spec_without_a_deployment_keeps_the_older_names_so_running_sessions_and_histories_keep_theirs() -> None:
    spec = SessionSpec.model_validate({"session_id": "intv-1", "kind": "interview", "participants": ROSTER})
    assert spec.deployment is None and spec.room_name == workflow_id_for("intv-1") == "session-intv-1"


@pytest.mark.parametrize("bad", ["", "Prod", "pr-od", "pr_od", "a" * 21, "prod\n"])
def test_a_deployment_name_that_could_make_prefixes_overlap_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        SessionSpec.model_validate({"session_id": "intv-1", "kind": "interview", "participants": ROSTER, "deployment": bad})
    with pytest.raises(ValidationError):
        Settings(deployment=bad)


def test_no_deployments_prefix_is_the_start_of_anothers() -> None:
    # The reason a deployment has no '-': `session-prod-` must not match `session-prod-eu-…`.
    assert not workflow_id_for("x", "prodeu").startswith(deployment_prefix("prod"))


def _webhook(room: str, event: str = "participant_joined", identity: str = "cand") -> api.WebhookEvent:
    return api.WebhookEvent(
        event=event, id="EV_1", room=api.Room(name=room), participant=api.ParticipantInfo(identity=identity)
    )


@pytest.mark.parametrize("room", ["another-app-room", "local-intv-1", "sessions-intv-1"])
def test_the_gateway_ignores_rooms_of_other_apps(room: str) -> None:
    assert session_workflow_id(room) is None
    assert room_event_from_webhook(_webhook(room)) is None


@pytest.mark.parametrize(
    "room",
    [
        workflow_id_for("intv-1", "local"),  # this deployment's
        workflow_id_for("intv-1"),  # a session started before deployments existed: it must still hear of its room
    ],
)
def test_the_gateway_maps_a_sessions_room_to_the_workflow_of_the_same_name(room: str) -> None:
    assert session_workflow_id(room) == room
    event = room_event_from_webhook(_webhook(room))
    assert event is not None and event.kind is RoomEventKind.PARTICIPANT_JOINED and event.identity == "cand"


@pytest.mark.parametrize(
    ("workflow_id", "session_id"),
    [("session-local-intv-1", "intv-1"), ("session-intv-1", "intv-1"), ("session-prod-intv-1", "prod-intv-1")],
)
def test_logs_read_the_session_id_from_a_workflow_id_of_either_naming(workflow_id: str, session_id: str) -> None:
    # A workflow id of another deployment is never this deployment's; read as the older naming, its id is kept whole.
    assert session_id_of(workflow_id, "local") == session_id
