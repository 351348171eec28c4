"""Session specs the tests start: one builder, overridable field by field."""

from __future__ import annotations

import uuid
from typing import Any

from config.settings import DEFAULT_AVATAR_ID, get_settings
from workflows.models import SessionSpec


def interview(**overrides: Any) -> SessionSpec:
    """An avatar interview with a candidate and an observer on its roster, under a fresh session id."""
    fields: dict[str, Any] = {
        "session_id": f"it-{uuid.uuid4().hex[:10]}",
        "kind": "interview",
        "participants": [
            {"identity": "cand", "role": "candidate", "name": "Candidate"},
            {"identity": "watcher", "role": "observer"},
        ],
        "avatar": {"avatar_id": DEFAULT_AVATAR_ID},
        "max_duration": "PT10M",
        "no_show_timeout": "PT2M",
    } | overrides
    if "deployment" not in fields:
        # As SessionClient sets it, so `room_name` and `workflow_id` are the ones the session really uses. Read only
        # when not given: a caller with settings of its own (the chaos stacks) passes its deployment.
        fields["deployment"] = get_settings().deployment
    return SessionSpec.model_validate(fields)
