"""The worker as operators run it: `python -m workers`, JSON logs carrying the session's ids, a clean SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from config.settings import Settings
from starters.client import SessionClient
from tests.support.polling import eventually
from tests.support.specs import interview
from workflows.models import SessionStatus

pytestmark = pytest.mark.stack


async def test_worker_process_logs_json_with_session_ids_and_stops_cleanly_on_sigterm(
    stack: Settings, sessions: SessionClient, tmp_path: Path
) -> None:
    task_queue = f"proc-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "SESSIONFLOW_TASK_QUEUE": task_queue, "SESSIONFLOW_LOG_FORMAT": "json"}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "workers"], env=env, stderr=log, stdout=log)
    try:
        client = SessionClient(sessions.client, stack, task_queue=task_queue)
        spec = interview(avatar=None)
        await client.join(spec, "cand")
        state = await client.end(spec.session_id, "done")
        assert state.status is SessionStatus.ENDED
        # Its Prometheus endpoint (the stack's SESSIONFLOW_METRICS_PORT): the runtime's figures and the session's.
        metrics = await eventually(
            lambda: _served(f"http://{stack.metrics_host}:{stack.metrics_port}/metrics", "sessionflow_sessions_closed_total"),
            what="the worker's metrics endpoint to count the session", timeout=20,
        )
        assert "temporal_worker_task_slots_available" in metrics and 'sessionflow_sessions{' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "worker started" in events and events[-1] == "worker stopped"
    room_lines = [line for line in lines if line["event"] in ("room ready", "room deleted")]
    assert len(room_lines) == 2, events
    for line in room_lines:
        assert line["workflow_id"] == spec.workflow_id and line["session_id"] == spec.session_id
        assert line["activity"] in ("create_room", "delete_room")


async def _served(url: str, needle: str) -> str | None:
    async with httpx.AsyncClient(timeout=2) as http:
        try:
            text = (await http.get(url)).text
        except httpx.HTTPError:
            return None  # not listening yet
    return text if needle in text else None
