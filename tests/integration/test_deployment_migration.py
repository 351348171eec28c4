"""Sessions started before deployments existed keep their `session-<id>` names while they run: the gateway still
delivers their room's webhooks (a session that never heard its participant join would end as a no-show), and
`SessionClient` finds them by session id under that older name."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import httpx
import pytest
from temporalio.client import WorkflowExecutionStatus

from config.settings import Settings
from starters.client import SessionClient
from tests.integration.test_gateway import gateway_url, signed
from tests.support.polling import eventually
from tests.support.specs import interview
from workflows.models import EndReason, JoinRequest
from workflows.session import SessionWorkflow

pytestmark = pytest.mark.stack


async def test_a_session_named_the_older_way_still_hears_of_its_room(stack: Settings, sessions: SessionClient) -> None:
    spec = interview(avatar=None, deployment=None)  # as a client before deployments existed started it
    assert spec.room_name == f"session-{spec.session_id}"
    handle = await sessions.client.start_workflow(
        SessionWorkflow.run, spec, id=spec.workflow_id, task_queue=sessions.task_queue
    )
    await handle.execute_update(SessionWorkflow.join, JoinRequest(identity="cand"))
    body = json.dumps({
        "event": "participant_joined", "id": f"EV_{uuid.uuid4().hex}",
        "room": {"name": spec.room_name}, "participant": {"identity": "cand"},
    })
    key, secret = stack.livekit_api_key, stack.livekit_api_secret.get_secret_value()
    async with httpx.AsyncClient() as http:
        r = await http.post(gateway_url(stack), content=body, headers={"Authorization": signed(body, key, secret)})
    assert r.status_code == 200 and r.json()["status"] == "delivered"

    async def present() -> bool:
        return "cand" in (await handle.query(SessionWorkflow.state)).present

    await eventually(present, what="the older-named session to hear its participant joined", timeout=10)

    # A client of this version reaches it by session id too: state, extend and end go to its older name.
    sessions = SessionClient(sessions.client, sessions.settings, task_queue=sessions.task_queue)  # nothing cached
    assert "cand" in (await sessions.state(spec.session_id)).present
    assert sessions.workflow_id(spec.session_id) == f"session-{spec.session_id}"
    await sessions.extend(spec.session_id, timedelta(minutes=1))
    outcome = await sessions.end(spec.session_id, "done")
    assert outcome.end_reason is EndReason.REQUESTED and outcome.session_id == spec.session_id
    assert (await handle.describe()).status is WorkflowExecutionStatus.COMPLETED
