"""The log mask (workers/logging.py): whatever logger writes a token or a configured secret, at any level and
in a traceback too, the line that reaches the log has it masked."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from workers.logging import MASK, SecretMask, configure_logging

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYW5kIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
SECRET = "livekit-secret-0123456789abcdef"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.mark.usefixtures("restore_logging")
def test_every_logger_at_every_level_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "DEBUG", secrets=[SECRET])
    logging.getLogger("temporalio.worker").debug("activation %s with %s", {"token": JWT}, SECRET)
    logging.getLogger("httpx").info("POST /v1/sessions/start Authorization: Bearer %s", JWT)
    structlog.get_logger("sessionflow.test").warning("grant", token=JWT, secret=SECRET)
    try:
        raise RuntimeError(f"livekit refused {JWT}")
    except RuntimeError:
        logging.getLogger("livekit").exception("failed")

    written = capsys.readouterr().err
    assert written.count(MASK) >= 6, written
    assert JWT not in written and "eyJhbGci" not in written and SECRET not in written


def test_the_mask_leaves_ordinary_text_alone() -> None:
    mask = SecretMask(["short", SECRET])  # too short to be a secret: not masked (it would mask words)
    assert mask(f"session it-1 in room session-it-1, short, {SECRET}") == f"session it-1 in room session-it-1, short, {MASK}"
