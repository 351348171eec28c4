"""Looking at a real LiveKit server: which rooms exist, who is in a room, what a participant receives."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from livekit import api, rtc

from sandbox.media import join_room

AUDIO_AND_VIDEO = {rtc.TrackKind.KIND_AUDIO, rtc.TrackKind.KIND_VIDEO}
# livekit-api's `AccessToken.ParticipantKind`, which a type checker cannot reach inside the class.
ParticipantKind = Literal["standard", "egress", "ingress", "sip", "agent"]


async def room_names(livekit: api.LiveKitAPI, *names: str) -> list[str]:
    """Those of ``names`` that are rooms on the server now."""
    return [r.name for r in (await livekit.room.list_rooms(api.ListRoomsRequest(names=list(names)))).rooms]


@dataclass(frozen=True)
class LiveKit:
    """A LiveKit server's addresses and credentials, with its server API client."""

    url: str
    http_url: str
    key: str
    secret: str
    api: api.LiveKitAPI

    def token(
        self, room: str, identity: str, *, hidden: bool = False, can_publish_data: bool = True, kind: ParticipantKind = "standard"
    ) -> str:
        grants = api.VideoGrants(room_join=True, room=room, hidden=hidden, can_publish_data=can_publish_data)
        token = api.AccessToken(self.key, self.secret).with_identity(identity).with_kind(kind).with_grants(grants)
        return token.to_jwt()

    async def identities(self, room: str) -> set[str]:
        response = await self.api.room.list_participants(api.ListParticipantsRequest(room=room))
        return {p.identity for p in response.participants}


@contextlib.asynccontextmanager
async def observer(livekit: LiveKit, room: str, *, hidden: bool = True) -> AsyncIterator[rtc.Room]:
    """A subscribing participant in ``room`` (hidden by default, so the avatar does not see it)."""
    identity = f"observer-{uuid.uuid4().hex[:8]}"
    async with join_room(livekit.url, livekit.token(room, identity, hidden=hidden), publish_media=False) as joined:
        yield joined


def subscribed_kinds(room: rtc.Room, identity: str) -> set[rtc.TrackKind.ValueType]:
    """Kinds of the tracks ``room`` receives from participant ``identity``."""
    participant = next((p for p in room.remote_participants.values() if p.identity == identity), None)
    if participant is None:
        return set()
    return {pub.kind for pub in participant.track_publications.values() if pub.track is not None}
