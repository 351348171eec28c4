"""``sandbox.media``: synthetic tracks published by a real participant, removed on stop, and a clean leave."""

from __future__ import annotations

from livekit import rtc

from sandbox.media import AUDIO_TRACK_NAME, VIDEO_TRACK_NAME, SyntheticMedia, join_room
from tests.support.livekit import AUDIO_AND_VIDEO, LiveKit, observer, subscribed_kinds
from tests.support.polling import eventually


def _present(viewer: rtc.Room, identity: str) -> bool:
    return identity in {p.identity for p in viewer.remote_participants.values()}


async def test_synthetic_media_publishes_unpublishes_and_leaves(livekit: LiveKit, room: str) -> None:
    async with observer(livekit, room) as viewer:
        async with join_room(livekit.url, livekit.token(room, "candidate"), publish_media=False) as candidate:
            media = SyntheticMedia()
            async with media.publish(candidate):
                assert len(media.track_sids) == 2
                names = {pub.name for pub in candidate.local_participant.track_publications.values()}
                assert names == {VIDEO_TRACK_NAME, AUDIO_TRACK_NAME}
                await eventually(
                    lambda: subscribed_kinds(viewer, "candidate") == AUDIO_AND_VIDEO,
                    timeout=10, what="the observer to receive the candidate's synthetic tracks",
                )
            assert media.track_sids == []
            await eventually(
                lambda: subscribed_kinds(viewer, "candidate") == set(),
                timeout=10, what="the tracks to be unpublished while the candidate stays connected",
            )
            assert candidate.isconnected() and _present(viewer, "candidate")
            await media.stop()  # idempotent
        assert not candidate.isconnected()
        await eventually(
            lambda: not _present(viewer, "candidate"), timeout=10, what="the candidate to leave the room"
        )
