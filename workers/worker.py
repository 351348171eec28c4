"""The worker processes: the default one runs SessionWorkflow and every activity on the session task queue;
`--media` runs the room monitors on the media task queue, so media work scales apart from workflow work."""

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
from activities.monitor import MonitorActivities
from activities.reaper import ReaperActivities
from config.settings import Settings, get_settings
from workers.schedules import ensure_reaper_schedule
from workers.temporal import connect
from workflows.reaper import ReaperWorkflow
from workflows.session import SessionWorkflow

log = structlog.get_logger("sessionflow.worker")

WORKFLOWS = [SessionWorkflow, ReaperWorkflow]


def activities_for(settings: Settings) -> list[Callable[..., Any]]:
    lk = LiveKitActivities(settings)
    avatar = AvatarActivities(settings)
    return [
        lk.create_room,
        lk.delete_room,
        lk.mint_participant_token,
        avatar.create_avatar_session,
        avatar.start_avatar_session,
        avatar.keep_avatar_alive,
        avatar.stop_avatar_session,
        ReaperActivities(settings).reap_orphans,
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
    client = await connect(settings)
    if media:
        worker = build_media_worker(client, settings)
        log.info("media worker started", task_queue=settings.media_task_queue, temporal=settings.temporal_address)
        await _until_signalled(worker)
        return
    worker = build_worker(client, settings)
    await ensure_reaper_schedule(client, settings, settings.task_queue)
    log.info("worker started", task_queue=settings.task_queue, temporal=settings.temporal_address)
    await _until_signalled(worker)


async def _until_signalled(worker: Worker) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        await stop.wait()
        log.info("worker shutting down", reason="signal")
    log.info("worker stopped")
