"""A worker's Prometheus endpoint after a real avatar interview: the Temporal runtime's own figures and the
engine's (sessions started and closed, avatar seconds billed, running sessions by kind and status)."""

from __future__ import annotations

import asyncio
import socket
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from sandbox.media import join_room
from starters.client import SessionClient
from tests.support.polling import eventually
from tests.support.specs import interview
from workers.metrics import LiveSessions, MetricsSettingsError, metrics_address, metrics_runtime
from workers.temporal import connect
from workers.worker import build_worker
from workflows.models import SessionState

pytestmark = pytest.mark.stack

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def scrape(address: str) -> Samples:
    """Every sample the endpoint serves, by name and labels (the SDK's `service_name` label left out)."""
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"http://{address}/metrics")).text
    return {
        (s.name, frozenset((k, v) for k, v in s.labels.items() if k != "service_name")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample of `name` whose labels include `labels` (summed if several match), or None."""
    matching = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return sum(matching) if matching else None


async def test_the_worker_endpoint_serves_runtime_and_engine_figures_after_a_real_session(stack: Settings) -> None:
    settings = stack.model_copy(update={"metrics_port": free_loopback_port()})
    address = metrics_address(settings)
    runtime = metrics_runtime(settings)
    assert address is not None and runtime is not None
    client = await connect(settings, runtime=runtime)  # a runtime of its own: these figures are this test's alone
    task_queue = f"metrics-{uuid.uuid4().hex[:10]}"
    sessions = SessionClient(client, settings, task_queue=task_queue)
    spec = interview()
    async with build_worker(client, settings, task_queue=task_queue):
        grant = await sessions.join(spec, "cand")
        async with join_room(grant.url, grant.token, publish_media=True):
            await eventually(lambda: _billing(sessions, spec.session_id), what="the avatar billing", timeout=45)
            # Running now, counted in visibility (which lags the status upsert a moment).
            gauge = LiveSessions(client, runtime)
            await eventually(lambda: _counted_live(gauge), what="the live interview counted", timeout=20)
            outcome = await sessions.end(spec.session_id, "interview over")
        await asyncio.wait_for(sessions.handle(spec.session_id).result(), timeout=30)

    samples = await eventually(lambda: _closed_scraped(address), what="the close counted on the endpoint", timeout=20)
    kind = {"session_kind": "interview"}
    assert value(samples, "sessionflow_sessions_started_total", **kind) == 1
    assert value(samples, "sessionflow_sessions_closed_total", **kind, end_reason="requested") == 1
    assert value(samples, "sessionflow_avatar_starts_total", **kind) == 1
    assert value(samples, "sessionflow_sessions_degraded_total", **kind) in (None, 0)
    billed = value(samples, "sessionflow_avatar_billed_seconds_sum", **kind)
    assert billed == pytest.approx(outcome.avatar_seconds, abs=0.01) and outcome.avatar_seconds > 0
    # Every running interview in the namespace, ours among them (sessions of other tests may still run).
    assert (value(samples, "sessionflow_sessions", session_kind="interview", session_status="live") or 0) >= 1
    # The Temporal runtime's own: task latencies, free slots, failures (none here).
    assert (value(samples, "temporal_workflow_task_execution_latency_count") or 0) > 0
    assert (value(samples, "temporal_activity_execution_latency_count") or 0) > 0
    assert value(samples, "temporal_worker_task_slots_available", worker_type="WorkflowWorker") is not None
    assert value(samples, "temporal_workflow_task_execution_failed_total") in (None, 0)


def test_the_endpoint_is_refused_anywhere_but_loopback(stack: Settings) -> None:
    for host in ("0.0.0.0", "192.168.1.10", "metrics.example"):
        with pytest.raises(MetricsSettingsError, match="not a loopback address"):
            metrics_address(stack.model_copy(update={"metrics_host": host}))
    assert metrics_address(stack.model_copy(update={"metrics_host": "::1", "metrics_port": 9464})) == "[::1]:9464"
    assert metrics_runtime(stack.model_copy(update={"metrics_port": 0})) is None


async def _billing(sessions: SessionClient, session_id: str) -> SessionState | None:
    state = await sessions.state(session_id)
    return state if any(b.started_at is not None for b in state.avatar_billing) else None


async def _counted_live(gauge: LiveSessions) -> bool:
    return (await gauge.sample())[("interview", "live")] >= 1


async def _closed_scraped(address: str) -> Samples | None:
    samples = await scrape(address)
    return samples if value(samples, "sessionflow_sessions_closed_total") else None
