"""Temporal Schedules the engine keeps: the `sessionflow-reaper` sweep.

`ensure_reaper_schedule` is idempotent and called by every worker process at start (`run_worker`), so a
deploy that changes `SESSIONFLOW_REAPER_EVERY` / `SESSIONFLOW_REAPER_GRACE` updates the running Schedule. Its
task queue is always `SESSIONFLOW_REAPER_TASK_QUEUE`, whatever queue the worker that starts last serves: a
worker started for a test or a canary on its own queue must not take the sweeps away from the fleet.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import structlog
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleHandle,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from config.settings import Settings
from workflows.reaper import ReaperWorkflow
from workflows.reaper_models import ReapRequest

log = structlog.get_logger("sessionflow.schedules")

REAPER_SCHEDULE_ID = "sessionflow-reaper"
# A sweep that cannot finish (no worker on its queue) ends after this, so SKIP does not block the next forever.
REAPER_RUN_TIMEOUT = timedelta(minutes=8)
# Missed sweeps (server or workers down) are not made up one by one: the next sweep covers them all.
REAPER_CATCHUP_WINDOW = timedelta(minutes=1)


def reaper_schedule(settings: Settings) -> Schedule:
    """The reaper's Schedule: a sweep every `reaper_every_s` on `reaper_task_queue`, never two at once."""
    return Schedule(
        action=ScheduleActionStartWorkflow(
            ReaperWorkflow.run,
            ReapRequest(grace_seconds=settings.reaper_grace_s, dry_run=False),
            id=REAPER_SCHEDULE_ID,  # each run's id is this plus the scheduled time
            task_queue=settings.reaper_task_queue,
            execution_timeout=REAPER_RUN_TIMEOUT,
            static_summary="reaper: release rooms and avatars no running session owns",
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(seconds=settings.reaper_every_s))]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=REAPER_CATCHUP_WINDOW),
    )


async def ensure_reaper_schedule(client: Client, settings: Settings) -> ScheduleHandle:
    """Create the `sessionflow-reaper` Schedule, or bring an existing one to the current spec.

    An existing Schedule keeps its state, so an operator's pause (and its note) survives a worker restart.
    """
    schedule = reaper_schedule(settings)
    try:
        handle = await client.create_schedule(REAPER_SCHEDULE_ID, schedule)
        log.info(
            "reaper schedule created",
            schedule_id=REAPER_SCHEDULE_ID, every_s=settings.reaper_every_s, task_queue=settings.reaper_task_queue,
        )
        return handle
    except ScheduleAlreadyRunningError:
        pass

    def keep_state(current: ScheduleUpdateInput) -> ScheduleUpdate:
        return ScheduleUpdate(schedule=dataclasses.replace(schedule, state=current.description.schedule.state))

    handle = client.get_schedule_handle(REAPER_SCHEDULE_ID)
    await handle.update(keep_state)
    log.info(
        "reaper schedule updated",
        schedule_id=REAPER_SCHEDULE_ID, every_s=settings.reaper_every_s, task_queue=settings.reaper_task_queue,
    )
    return handle
