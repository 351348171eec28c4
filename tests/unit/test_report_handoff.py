"""`sessionflow show`'s "connections" section: what it prints of the handoff metrics."""

from __future__ import annotations

from starters.report import render_handoff
from workflows.models import ConnectionLevel, Handoff, ParticipantHandoff


def test_show_prints_each_avatar_first_frame_and_replacement_time():
    handoff = Handoff(
        participants={"cand": ParticipantHandoff(connect_s=0.8, quality_s={ConnectionLevel.GOOD: 42.0})},
        avatar_join_s=[2.5, 2.1],
        avatar_first_frame_s=[3.04, 2.6],
        avatar_replacement_s=[5.25],
    )
    lines = render_handoff(handoff).splitlines()
    assert "  avatar in the room after: 2.50 s, 2.10 s" in lines
    assert "  avatar first frame after: 3.04 s, 2.60 s" in lines
    assert "  avatar replaced in: 5.25 s (lost to the replacement's first frame)" in lines


def test_show_says_nothing_of_avatar_frames_it_has_not_measured():
    text = render_handoff(Handoff(participants={"cand": ParticipantHandoff(connect_s=1.0)}, avatar_join_s=[2.0]))
    assert "first frame" not in text and "replaced" not in text
