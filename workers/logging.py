"""Logging as data: structlog renders every record (ours, Temporal's, uvicorn's) as one JSON line, or
pretty in a terminal. Temporal's workflow and activity loggers add their context as `extra`, which lands in
the record, so each line carries the session's workflow id and, where known, the activity."""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import EventDict, Processor
from temporalio import activity, workflow

from config.settings import get_settings
from workflows.models import ROOM_PREFIX, session_id_of


def configure_logging(fmt: str = "auto", level: str = "INFO") -> None:
    json_lines = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        _flatten_temporal_context,
    ]
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # The context goes in as data (below), not glued onto the message text.
    workflow.logger.workflow_info_on_message = False
    activity.logger.activity_info_on_message = False


def _flatten_temporal_context(_logger: object, _name: str, event: EventDict) -> EventDict:
    """Lift the ids Temporal attaches (`temporal_workflow`, `temporal_activity`) to top-level keys."""
    for key in ("temporal_workflow", "temporal_activity"):
        ctx = event.pop(key, None)
        if isinstance(ctx, dict):
            event.setdefault("workflow_id", ctx.get("workflow_id"))
            event.setdefault("run_id", ctx.get("run_id"))
            if key == "temporal_activity":
                event["activity"] = ctx.get("activity_type")
                event["attempt"] = ctx.get("attempt")
    wid = event.get("workflow_id")
    if isinstance(wid, str) and wid.startswith(ROOM_PREFIX):
        event.setdefault("session_id", session_id_of(wid, get_settings().deployment))
    return event
