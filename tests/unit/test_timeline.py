"""The timeline support reads (`sessionflow show`, the demo), from a recorded history of the join path."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import WorkflowHistory

from starters.timeline import timeline
from tests.support.codec import corpus_data_converter
from workers.codec import decode_history

HISTORY = Path(__file__).parent.parent / "replay" / "histories" / "interview_happy_path.v3.json"


async def test_the_timeline_shows_each_token_minted_and_hides_the_sdk_patch_markers() -> None:
    converter = corpus_data_converter()  # the corpus is encrypted with its test key (tests/replay/encrypt.py)
    history = await decode_history(WorkflowHistory.from_json("t", HISTORY.read_text()), converter.payload_codec)
    lines = [m.text for m in timeline(history, converter)]
    # Tokens come from a local activity (a marker in history, not activity events): still one line each.
    assert "done: token for cand (candidate)" in lines
    assert "done: token for panel (observer)" in lines
    assert not any("TemporalChangeVersion" in line for line in lines)
    assert lines[0] == "session workflow started" and lines[-1] == "session workflow completed"


async def test_the_timeline_tells_each_consent_and_the_recording_it_started_and_stopped() -> None:
    recorded = HISTORY.with_name("consent_recording.v5.json")
    converter = corpus_data_converter()
    history = await decode_history(WorkflowHistory.from_json("t", recorded.read_text()), converter.payload_codec)
    lines = [m.text for m in timeline(history, converter)]
    consents = [line for line in lines if line.startswith("consent requested")]
    assert consents == [
        "consent requested (cand, granted)", "consent requested (panel, granted)",
        "consent requested (panel, withdrawn)", "consent requested (panel, granted)",
    ]
    assert sum(line.startswith("done: start recording room") for line in lines) == 2
    assert [line for line in lines if line.startswith("done: stop recording")] == [
        "done: stop recording EG_1", "done: stop recording EG_2"
    ]


async def test_the_timeline_shows_the_room_created_by_a_local_activity_before_the_join_is_answered() -> None:
    recorded = HISTORY.with_name("join_with_start.v7-local-room.json")  # workflow.patched("local-room-create")
    converter = corpus_data_converter()
    history = await decode_history(WorkflowHistory.from_json("t", recorded.read_text()), converter.payload_codec)
    lines = [m.text for m in timeline(history, converter)]
    room = next(line for line in lines if line.startswith("done: create room "))  # a marker now, not activity events
    assert lines.index(room) < lines.index("done: token for cand (candidate)")
    assert "join requested (cand)" in lines
