"""The timeline names each support search attribute when its value changes, not at every status upsert."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import WorkflowHistory

from starters.timeline import timeline
from workers.temporal import data_converter

HISTORY = Path(__file__).parent.parent / "replay" / "histories" / "avatar_crash_and_replacement.v6.json"


def test_attributes_appear_when_they_change() -> None:
    moments = timeline(WorkflowHistory.from_json("t", HISTORY.read_text()), data_converter())
    lines = [m.text for m in moments]
    at = {m.text: m.at for m in moments}
    assert lines.count("SessionDegraded -> False") == 1 and lines.count("SessionDegraded -> True") == 1
    assert lines.index("SessionDegraded -> False") < lines.index("SessionDegraded -> True")
    assert at["SessionDegraded -> True"] == at["status -> degraded"]  # published with the status (one upsert)
    assert lines.count("SessionEndReason -> requested") == 1
    assert at["SessionEndReason -> requested"] == at["status -> ending"]
    billed = [line for line in lines if line.startswith("AvatarBilledSeconds -> ")]
    assert billed[0] == "AvatarBilledSeconds -> 0.0" and len(billed) == len(set(billed))
