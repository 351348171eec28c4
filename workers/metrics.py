"""Prometheus metrics for operators: every worker serves them on a loopback port (settings
`SESSIONFLOW_METRICS_HOST`/`SESSIONFLOW_METRICS_PORT`, 0 for none).

One endpoint carries three kinds of figures:
- the Temporal runtime's own (`temporal_*`: workflow and activity task latencies, free slots, failures, polls),
  from the runtime's Prometheus exporter;
- what happened in sessions and sweeps (`sessionflow_*` counters and the billed-seconds histogram), emitted
  through the SDK's metric meters by `workflows/metrics.py` and `activities/metrics.py`;
- what is running now (`sessionflow_sessions{session_kind, session_status}`), a gauge this module refreshes from
  Temporal visibility, because a count of running sessions cannot be summed from counters across workers that
  restart. Every worker reports the same figure: take `max` across workers, not `sum`.

docs/grafana-dashboard.json charts these; docs/support.md says which figure means trouble.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from config.settings import Settings
from workflows.models import SessionKind, SessionStatus
from workflows.search_attributes import SESSION_KIND, SESSION_STATUS

log = structlog.get_logger("sessionflow.metrics")

RUNNING_STATUSES = tuple(s for s in SessionStatus if s not in (SessionStatus.ENDED, SessionStatus.FAILED))
SAMPLE_EVERY_S = 15.0  # Prometheus scrapes every 15 s by default


class MetricsSettingsError(ValueError):
    """The metrics endpoint is configured to listen somewhere it must not."""


def metrics_address(settings: Settings) -> str | None:
    """Where the endpoint listens, or None when it is off. Loopback only: the figures name sessions' kinds and
    volumes, and nothing here has authentication (put a scraper or an agent beside the worker)."""
    if settings.metrics_port == 0:
        return None
    try:
        loopback = ipaddress.ip_address(settings.metrics_host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise MetricsSettingsError(
            f"SESSIONFLOW_METRICS_HOST={settings.metrics_host!r} is not a loopback address (127.0.0.0/8 or ::1); "
            "the metrics endpoint has no authentication: serve it on loopback and scrape it from the same host"
        )
    host = f"[{settings.metrics_host}]" if ":" in settings.metrics_host else settings.metrics_host
    return f"{host}:{settings.metrics_port}"


def metrics_runtime(settings: Settings) -> Runtime | None:
    """A Temporal runtime exporting Prometheus metrics at `metrics_address`; pass it to `workers.temporal.connect`.
    None when metrics are off (the SDK's default runtime is used)."""
    address = metrics_address(settings)
    if address is None:
        return None
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=address, counters_total_suffix=True)))
    except RuntimeError as e:  # the exporter binds at once: a port in use fails here
        raise MetricsSettingsError(
            f"cannot serve metrics on {address} ({e}): is another worker on this host using it? Give each worker its own "
            "SESSIONFLOW_METRICS_PORT, or 0 for none"
        ) from None


class LiveSessions:
    """The `sessionflow_sessions` gauge: running sessions by kind and status, counted in visibility."""

    def __init__(self, client: Client, runtime: Runtime) -> None:
        self._client = client
        self._gauge = runtime.metric_meter.create_gauge(
            "sessionflow_sessions", "running sessions by kind and status (from Temporal visibility)"
        )

    async def sample(self) -> dict[tuple[str, str], int]:
        """Count once and set the gauge; returns the counts by (kind, status)."""
        counts = {}
        for kind in SessionKind:
            for status in RUNNING_STATUSES:
                query = (
                    "WorkflowType = 'SessionWorkflow' AND ExecutionStatus = 'Running' "
                    f"AND {SESSION_KIND.name} = '{kind.value}' AND {SESSION_STATUS.name} = '{status.value}'"
                )
                count = (await self._client.count_workflows(query)).count
                self._gauge.set(count, {"session_kind": kind.value, "session_status": status.value})
                counts[(kind.value, status.value)] = count
        return counts

    async def run(self, every_s: float = SAMPLE_EVERY_S) -> None:
        """Sample until cancelled; a failed count is logged and tried again at the next turn."""
        while True:
            try:
                await self.sample()
            except Exception as e:  # visibility unavailable for a moment: the gauge keeps its last value
                log.warning("could not count running sessions", error=str(e))
            await asyncio.sleep(every_s)


@asynccontextmanager
async def live_session_gauge(client: Client, runtime: Runtime | None) -> AsyncIterator[None]:
    """Keep `sessionflow_sessions` fresh while the block runs (nothing when metrics are off)."""
    if runtime is None:
        yield
        return
    task = asyncio.create_task(LiveSessions(client, runtime).run())
    try:
        yield
    finally:
        task.cancel()
