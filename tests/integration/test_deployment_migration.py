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
from temporalio.service import RPCError, RPCStatusCode

from config.settings import Settings
from starters.client import OLDER_NAMED_QUERY, SessionClient, SpecChanged
from tests.integration.test_gateway import gateway_url, signed
from tests.support.polling import eventually
from tests.support.specs import interview
from workflows.models import EndReason, JoinRequest, workflow_id_for
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


async def test_join_finds_a_session_running_under_its_older_name_instead_of_starting_a_second(
    sessions: SessionClient,
) -> None:
    spec = interview(avatar=None, deployment=None)  # started by a version before deployments, as `session-<id>`
    handle = await sessions.client.start_workflow(SessionWorkflow.run, spec, id=spec.workflow_id, task_queue=sessions.task_queue)

    async def listed() -> bool:  # visibility lags the start a little
        found = [e.id async for e in sessions.client.list_workflows(OLDER_NAMED_QUERY)]
        return spec.workflow_id in found

    await eventually(listed, what="the older-named session in visibility", timeout=20)
    fresh = SessionClient(sessions.client, sessions.settings, task_queue=sessions.task_queue)  # nothing cached
    grant = await fresh.join(spec, "cand")  # what a backend of this version sends: the spec, no deployment
    assert grant.room == f"session-{spec.session_id}" and grant.identity == "cand"
    assert "cand" in (await handle.query(SessionWorkflow.state)).admitted
    # No second session under this deployment's name.
    newer = sessions.client.get_workflow_handle(workflow_id_for(spec.session_id, sessions.settings.deployment))
    with pytest.raises(RPCError) as missing:
        await newer.describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND
    # A changed spec is still refused, as for any running session.
    with pytest.raises(SpecChanged):
        await fresh.join(spec.model_copy(update={"max_duration": timedelta(minutes=5)}), "cand")
    await fresh.end(spec.session_id, "done")
