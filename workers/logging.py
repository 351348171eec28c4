"""Logging as data: structlog renders every record (ours, Temporal's, uvicorn's) as one JSON line, or
pretty in a terminal. Temporal's workflow and activity loggers add their context as `extra`, which lands in
the record, so each line carries the session's workflow id and, where known, the activity.

Every line is masked before it is written (`SecretMask`): JWT-shaped strings (participant and avatar tokens)
and the configured secrets never reach a log, whichever logger (ours, Temporal's, LiveKit's, httpx's) and
whichever level produced them.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import Any

import structlog
from pydantic import ValidationError
from structlog.typing import EventDict, Processor
from temporalio import activity, workflow

from config.settings import Settings, get_settings
from workflows.models import ROOM_PREFIX, session_id_of

# A JWT: base64url header (always `{"` -> `eyJ`), payload and optional signature. Longer than any word.
JWT_PATTERN = re.compile(r"eyJ[\w-]{8,}\.[\w-]+\.?[\w-]*")
MASK = "[masked]"


class SecretMask:
    """Replaces JWT-shaped strings and the given secrets in a rendered log line."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Short values would mask ordinary words; every real secret here is long.
        known = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)
        self._known = re.compile("|".join(re.escape(s) for s in known)) if known else None

    def __call__(self, text: str) -> str:
        text = JWT_PATTERN.sub(MASK, text)
        return self._known.sub(MASK, text) if self._known else text


def known_secrets(settings: Settings) -> list[str]:
    """Every secret value in the settings (LiveKit and LiveAvatar keys, codec keys and tokens, Temporal API key)."""
    values = [getattr(settings, name) for name in type(settings).model_fields]
    found = [v.get_secret_value() for v in values if hasattr(v, "get_secret_value")]
    # SESSIONFLOW_CODEC_KEYS is `id:base64key,...`: each key on its own too.
    return found + [part.partition(":")[2] for value in found for part in value.split(",") if ":" in part]


class _MaskingFormatter(structlog.stdlib.ProcessorFormatter):
    def __init__(self, mask: SecretMask, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._mask = mask

    def format(self, record: logging.LogRecord) -> str:
        return self._mask(super().format(record))


def _settings_secrets() -> list[str]:
    try:
        return known_secrets(get_settings())
    except ValidationError:
        return []  # settings that do not load name no secret to mask; JWTs are still masked


def configure_logging(fmt: str = "auto", level: str = "INFO", secrets: Iterable[str] | None = None) -> None:
    """Log every record as JSON (or pretty in a terminal) at ``level``, masked (``secrets`` default: the
    settings' secrets)."""
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
        _MaskingFormatter(
            SecretMask(_settings_secrets() if secrets is None else secrets),
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
