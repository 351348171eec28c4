"""Figures the activities report for operators, through the activity's metric meter (the worker's Prometheus
endpoint, `workers/metrics.py`)."""

from __future__ import annotations

from temporalio import activity

from workflows.reaper_models import ReapReport


def count_reaped(report: ReapReport) -> None:
    """Count what a sweep released: anything here is a room or avatar session whose session failed to release
    it (a terminated workflow, a lost worker), so a rising count means trouble upstream."""
    if report.dry_run:
        return
    released = activity.metric_meter().create_counter(
        "sessionflow_reaper_released", "rooms and avatar sessions the reaper had to release (their session did not)"
    )
    released.add(len(report.rooms_released), {"resource": "room"})
    released.add(len(report.avatars_released), {"resource": "avatar_session"})
    activity.metric_meter().create_counter("sessionflow_reaper_errors", "reaper releases that failed (retried next sweep)").add(
        len(report.errors)
    )
