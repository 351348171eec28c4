"""The worker processes. The default one runs SessionWorkflow and its activities on the sessions' task queue, and
the reaper's sweeps on a task queue of their own (`SESSIONFLOW_REAPER_TASK_QUEUE`), so its runs never mix with
sessions; `--media` runs the room monitors on the media task queue, so media work scales apart from workflow work."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import structlog
from temporalio.client import Client
from temporalio.worker import PollerBehavior, PollerBehaviorAutoscaling, PollerBehaviorSimpleMaximum, Worker

from activities.avatar import AvatarActivities
from activities.livekit import LiveKitActivities
from activities.monitor import MonitorActivities
from activities.reaper import ReaperActivities
from config.settings import Settings, get_settings
from workers.metrics import live_session_gauge, metrics_address, metrics_runtime
from workers.schedules import ensure_reaper_schedule
from workers.temporal import connect
from workflows.reaper import ReaperWorkflow
from workflows.session import SessionWorkflow

log = structlog.get_logger("sessionflow.worker")

WORKFLOWS = [SessionWorkflow]


def activities_for(settings: Settings) -> list[Callable[..., Any]]:
    lk = LiveKitActivities(settings)
    avatar = AvatarActivities(settings)
    return [
        lk.create_room,
        lk.delete_room,
        lk.mint_participant_token,
        lk.start_recording,
        lk.stop_recording,
        avatar.create_avatar_session,
        avatar.start_avatar_session,
        avatar.keep_avatar_alive,
        avatar.stop_avatar_session,
    ]


def _pollers(maximum: int, autoscaling: bool) -> PollerBehavior:
    if autoscaling:
        return PollerBehaviorAutoscaling(minimum=1, maximum=maximum, initial=min(5, maximum))
    return PollerBehaviorSimpleMaximum(maximum=maximum)


def build_worker(client: Client, settings: Settings, *, task_queue: str | None = None, **options: Any) -> Worker:
    """The session worker, tuned by the `worker_*` settings; `options` (keyword arguments of `Worker`) win over
    them (the benchmark's `patch_activation_callback`)."""
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=WORKFLOWS,
        activities=activities_for(settings),
        max_concurrent_workflow_tasks=settings.worker_max_concurrent_workflow_tasks,
        max_concurrent_activities=settings.worker_max_concurrent_activities,
        max_concurrent_local_activities=settings.worker_max_concurrent_local_activities,
        max_cached_workflows=settings.worker_max_cached_workflows,
        workflow_task_poller_behavior=_pollers(settings.worker_workflow_task_pollers, settings.worker_poller_autoscaling),
        activity_task_poller_behavior=_pollers(settings.worker_activity_task_pollers, settings.worker_poller_autoscaling),
        # A crashed worker's sessions move to another worker after this, not after the default 10 s.
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=3),
        # On SIGTERM, running activities get this long to finish before they are handed over.
        graceful_shutdown_timeout=timedelta(seconds=5),
        max_heartbeat_throttle_interval=timedelta(seconds=5),
        **options,
    )


def build_reaper_worker(client: Client, settings: Settings, *, task_queue: str | None = None) -> Worker:
    """The reaper's worker: only `ReaperWorkflow` and its one activity, on `reaper_task_queue` (the Schedule's)."""
    return Worker(
        client,
        task_queue=task_queue or settings.reaper_task_queue,
        workflows=[ReaperWorkflow],
        activities=[ReaperActivities(settings).reap_orphans],
        graceful_shutdown_timeout=timedelta(seconds=5),
        max_heartbeat_throttle_interval=timedelta(seconds=5),
    )


def build_media_worker(client: Client, settings: Settings, *, task_queue: str | None = None) -> Worker:
    """The room monitors: one long-running activity per session, no workflows."""
    return Worker(
        client,
        task_queue=task_queue or settings.media_task_queue,
        activities=[MonitorActivities(settings).monitor_room],
        max_concurrent_activities=settings.media_max_sessions,
        # A monitor only leaves its room when cancelled: on shutdown it is handed to another media worker.
        graceful_shutdown_timeout=timedelta(seconds=2),
        max_heartbeat_throttle_interval=timedelta(seconds=1),
    )


async def run_worker(settings: Settings | None = None, *, media: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully: nothing is torn down, work is handed over."""
    settings = settings or get_settings()
    runtime = metrics_runtime(settings)  # before connecting: the client's runtime exports the worker's metrics
    client = await connect(settings, runtime=runtime)
    if media:
        media_worker = build_media_worker(client, settings)
        log.info("media worker started", task_queue=settings.media_task_queue, temporal=settings.temporal_address,
                 metrics=metrics_address(settings))
        async with media_worker:
            await _until_signalled()
        log.info("worker stopped")
        return
    worker = build_worker(client, settings)
    reaper = build_reaper_worker(client, settings)
    await ensure_reaper_schedule(client, settings)
    log.info(
        "worker started", task_queue=settings.task_queue, reaper_task_queue=settings.reaper_task_queue,
        temporal=settings.temporal_address, metrics=metrics_address(settings),
    )
    async with worker, reaper, live_session_gauge(client, runtime):
        await _until_signalled()
    log.info("worker stopped")


async def _until_signalled() -> None:
    """Wait for SIGTERM or SIGINT; the caller's `async with` then shuts its workers down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("worker shutting down", reason="signal")
