"""Recording closed sessions' histories as replay fixtures (`make record-histories`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHandle

HISTORIES = Path(__file__).parent.parent / "replay" / "histories"


async def record_history(handle: WorkflowHandle[Any, Any], name: str) -> None:
    """With SESSIONFLOW_RECORD_HISTORIES set (`make record-histories`), keep this closed session's history
    as a replay fixture."""
    if not os.environ.get("SESSIONFLOW_RECORD_HISTORIES"):
        return
    history = await handle.fetch_history()
    HISTORIES.mkdir(parents=True, exist_ok=True)
    (HISTORIES / f"{name}.json").write_text(history.to_json())
