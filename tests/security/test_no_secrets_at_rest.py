"""No secret and no personal data in clear where they are kept (issue 9 item 1): the raw history on the
Temporal server, read by a client WITHOUT the codec, holds ciphertext only, and a worker logging everything
at DEBUG writes no token. Both run a real session on the local stack: a participant with a display name and
session metadata joins, and the avatar is started (its session token is in history)."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from google.protobuf import json_format
from temporalio.client import Client, WorkflowHistory

from config.settings import DEFAULT_AVATAR_ID, Settings
from starters.client import SessionClient
from tests.integration.conftest import sessions, stack, temporal  # noqa: F401  (the stack's fixtures)
from tests.support.polling import eventually
from tests.support.specs import interview
from workers.codec import decode_history, history_payloads
from workers.logging import known_secrets
from workflows.models import SessionSpec

pytestmark = pytest.mark.stack

JWT = re.compile(rb"eyJ[\w-]+\.[\w-]+\.")


def _personal_spec() -> SessionSpec:
    tag = uuid.uuid4().hex[:8]
    return interview(
        participants=[
            {"identity": "cand", "role": "candidate", "name": f"Ada Lovelace {tag}"},
            {"identity": "watcher", "role": "observer", "name": f"Grace Hopper {tag}"},
        ],
        avatar={"avatar_id": DEFAULT_AVATAR_ID, "start": "immediately"},
        metadata={"candidate_email": f"ada.{tag}@example.test"},
    )


async def _run_session(client: SessionClient, spec: SessionSpec) -> str:
    """Join, wait for the avatar to be started, end; the participant's token."""
    grant = await client.join(spec, "cand")
    await eventually(lambda: _avatar_started(client, spec.session_id), what="the avatar to start", timeout=45)
    await client.end(spec.session_id, "done")
    await client.handle(spec.session_id).result()
    return grant.token


async def _avatar_started(client: SessionClient, session_id: str) -> bool:
    state = await client.state(session_id)
    return any(row.started_at for row in state.avatar_billing)


def _history_bytes(history: WorkflowHistory) -> bytes:
    return b"".join(event.SerializeToString() for event in history.events)


def _strings_in_payloads(history: WorkflowHistory) -> bytes:
    return b"\n".join(p.data for p in history_payloads(history))


async def test_the_raw_history_holds_no_token_no_key_and_no_name_in_clear(
    stack: Settings, sessions: SessionClient, temporal: Client  # noqa: F811
) -> None:
    spec = _personal_spec()
    token = await _run_session(sessions, spec)

    # A client of our own WITHOUT the codec: what the server, the UI without a codec server, or an export sees.
    raw_client = await Client.connect(stack.temporal_address, namespace=stack.temporal_namespace)
    raw = await raw_client.get_workflow_handle(spec.workflow_id).fetch_history()
    clear = _history_bytes(raw)

    # The same history decoded: the secrets are really in there, so not finding them in `clear` means something.
    decoded = await decode_history(raw, temporal.data_converter.payload_codec)
    readable = _strings_in_payloads(decoded)
    avatar_tokens = re.findall(rb'"session_token":"([^"]+)"', readable)
    assert token.encode() in readable and avatar_tokens, "the decoded history should hold the tokens"
    assert spec.participants[0].name and spec.participants[0].name.encode() in readable

    assert not JWT.search(clear), "a JWT in clear in the raw history"
    for secret in [
        token, *(t.decode() for t in avatar_tokens), *known_secrets(stack),
        *(p.name for p in spec.participants if p.name), *spec.metadata.values(),
    ]:
        assert secret.encode() not in clear, f"{secret[:6]}… is in clear in the raw history"
    # The search attributes stay readable: support finds sessions by them.
    assert spec.session_id.encode() in clear


async def test_a_worker_logging_at_debug_writes_no_token(
    stack: Settings, sessions: SessionClient, tmp_path: Path  # noqa: F811
) -> None:
    task_queue = f"logs-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "SESSIONFLOW_TASK_QUEUE": task_queue, "SESSIONFLOW_LOG_LEVEL": "DEBUG",
           "SESSIONFLOW_LOG_FORMAT": "json"}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "workers"], env=env, stderr=log, stdout=log)
    try:
        await eventually(lambda: "worker started" in log_path.read_text(), what="the worker to start", timeout=30)
        spec = _personal_spec()
        token = await _run_session(SessionClient(sessions.client, stack, task_queue=task_queue), spec)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    logged = log_path.read_text()

    assert '"level": "debug"' in logged, "the worker did not log at DEBUG: the test would prove nothing"
    assert not JWT.search(logged.encode()), "a JWT in the worker's log"
    for secret in [token, *known_secrets(stack)]:
        assert secret not in logged, f"{secret[:6]}… is in the worker's log"


async def test_the_temporal_ui_reads_history_through_the_gateways_codec_server(
    stack: Settings, sessions: SessionClient  # noqa: F811
) -> None:
    """The local stack starts the UI with the gateway's codec endpoint: what the UI's browser code does with it
    (POST <endpoint>/decode from the UI's origin) gives readable payloads, tokens masked."""
    spec = _personal_spec()
    token = await _run_session(sessions, spec)
    raw_client = await Client.connect(stack.temporal_address, namespace=stack.temporal_namespace)
    raw = await raw_client.get_workflow_handle(spec.workflow_id).fetch_history()
    body = {"payloads": [json_format.MessageToDict(p) for p in history_payloads(raw)]}

    async with httpx.AsyncClient(timeout=10) as http:
        ui_settings = (await http.get(f"{stack.temporal_ui_url}/api/v1/settings")).json()
        endpoint = ui_settings["Codec"]["Endpoint"]
        assert endpoint.startswith(f"http://{stack.gateway_host}:{stack.gateway_port}/codec/"), endpoint
        decoded = await http.post(f"{endpoint}/decode", json=body,
                                  headers={"Origin": stack.temporal_ui_url, "X-Namespace": stack.temporal_namespace})
        bare = await http.post(f"http://{stack.gateway_host}:{stack.gateway_port}/codec/decode", json=body)

    assert decoded.status_code == 200 and decoded.headers["Access-Control-Allow-Origin"] == stack.temporal_ui_url
    readable = b"\n".join(base64.b64decode(p.get("data", "")) for p in decoded.json()["payloads"])
    assert spec.participants[0].name and spec.participants[0].name.encode() in readable
    assert token.encode() not in readable and not JWT.search(readable), "the UI's (support) view shows a token"
    assert bare.status_code == 401
