"""The worker process: SessionWorkflow and its activities on the sessions' task queue, and the reaper's sweeps
on a task queue of their own (`SESSIONFLOW_REAPER_TASK_QUEUE`), so its runs never mix with sessions."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import structlog
from temporalio.client import Client
from temporalio.worker import Worker

from activities.avatar import AvatarActivities
from activities.livekit import LiveKitActivities
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


def build_worker(client: Client, settings: Settings, *, task_queue: str | None = None) -> Worker:
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=WORKFLOWS,
        activities=activities_for(settings),
        # A crashed worker's sessions move to another worker after this, not after the default 10 s.
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=3),
        # On SIGTERM, running activities get this long to finish before they are handed over.
        graceful_shutdown_timeout=timedelta(seconds=5),
        max_heartbeat_throttle_interval=timedelta(seconds=5),
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


async def run_worker(settings: Settings | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully: nothing is torn down, work is handed over."""
    settings = settings or get_settings()
    runtime = metrics_runtime(settings)  # before connecting: the client's runtime exports the worker's metrics
    client = await connect(settings, runtime=runtime)
    worker = build_worker(client, settings)
    reaper = build_reaper_worker(client, settings)
    await ensure_reaper_schedule(client, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "worker started", task_queue=settings.task_queue, reaper_task_queue=settings.reaper_task_queue,
        temporal=settings.temporal_address, metrics=metrics_address(settings),
    )
    async with worker, reaper, live_session_gauge(client, runtime):
        await stop.wait()
        log.info("worker shutting down", reason="signal")
    log.info("worker stopped")
