"""ReaperWorkflow: one sweep for orphaned rooms and avatar sessions, started by the `sessionflow-reaper` Schedule.

Deliberately trivial: it runs the `reap_orphans` activity once and returns its report, so the history of each
sweep shows what was released. All logic (listing, owner lookup, grace period, release) lives in the activity.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.reaper_models import ReapReport, ReapRequest

# A sweep that fails is not retried for long: the Schedule starts the next one within seconds anyway.
SWEEP_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=5), maximum_attempts=3)
# Heartbeats go out between items; a worker that dies mid-sweep is noticed after this.
SWEEP_HEARTBEAT = timedelta(seconds=30)
SWEEP_TIMEOUT = timedelta(minutes=2)  # x 3 attempts: within the Schedule's run timeout (workers/schedules.py)


@workflow.defn
class ReaperWorkflow:
    @workflow.run
    async def run(self, request: ReapRequest) -> ReapReport:
        """Sweep once; the report names every room and avatar session released (or, dry run, releasable)."""
        report: ReapReport = await workflow.execute_activity(
            "reap_orphans",
            request,
            result_type=ReapReport,
            start_to_close_timeout=SWEEP_TIMEOUT,
            heartbeat_timeout=SWEEP_HEARTBEAT,
            retry_policy=SWEEP_RETRY,
            summary="dry run: find orphaned rooms and avatars" if request.dry_run else "release orphaned rooms and avatars",
        )
        return report
