"""The session's figures for operators, emitted through the workflow's metric meter.

`workflow.metric_meter()` records nothing while a workflow replays, so each figure counts what happened once,
however often a history is replayed on another worker. The figures are read off the machine's commands (the
one place they pass in `SessionWorkflow._execute`), so nothing here decides anything. They come out of the
worker's Prometheus endpoint (`workers/metrics.py`) beside the Temporal runtime's own.
"""

from __future__ import annotations

from collections.abc import Sequence

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.machine import Command, CreateRoom, PublishStatus, SessionMachine, StartAvatarSession
    from workflows.models import SessionStatus

CLOSED = (SessionStatus.ENDED, SessionStatus.FAILED)


class SessionMetrics:
    """One session's counters, labelled with its kind."""

    def __init__(self, kind: str, machine: SessionMachine) -> None:
        meter = workflow.metric_meter().with_additional_attributes({"session_kind": kind})
        self._started = meter.create_counter("sessionflow_sessions_started", "sessions whose workflow began")
        self._closed = meter.create_counter("sessionflow_sessions_closed", "sessions closed, by end reason")
        self._degraded = meter.create_counter(
            "sessionflow_sessions_degraded", "times a session became degraded (avatar lost, someone reconnecting)"
        )
        self._recoveries = meter.create_counter("sessionflow_recoveries", "recoveries (avatar replaced, rejoin, fallback)")
        self._avatar_starts = meter.create_counter("sessionflow_avatar_starts", "avatar sessions started (billing begins)")
        self._billed = meter.create_histogram_float(
            "sessionflow_avatar_billed_seconds", "avatar seconds billed per closed session (the sum is the total)", "s"
        )
        self._recoveries_seen = len(machine.recoveries)  # a run that continued from another counted those

    def saw(self, commands: Sequence[Command], machine: SessionMachine) -> None:
        """Count what `commands` say happened (the machine is read only for its recoveries)."""
        for command in commands:
            match command:
                case CreateRoom():
                    self._started.add(1)
                case StartAvatarSession():
                    self._avatar_starts.add(1)
                case PublishStatus(status) if status is SessionStatus.DEGRADED:
                    self._degraded.add(1)
                case PublishStatus(status) if status in CLOSED:
                    reason = command.end_reason.value if command.end_reason else "unknown"
                    self._closed.add(1, {"end_reason": reason})
                    self._billed.record(command.avatar_billed_seconds)
        if len(machine.recoveries) > self._recoveries_seen:
            self._recoveries.add(len(machine.recoveries) - self._recoveries_seen)
            self._recoveries_seen = len(machine.recoveries)
