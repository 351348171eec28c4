"""LiveKit side effects: create and delete the session's room, mint participant tokens, start and stop its recording.

Each activity is idempotent (CreateRoom returns the live room by name; DeleteRoom of a missing room is
success) and classifies failures with `activities.errors`, so Temporal's retry policy decides what happens
next. livekit-api ignores its own timeout, so every call is bounded here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Literal, TypedDict, TypeVar

from livekit import api
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import classify_livekit_error, never_final
from config.settings import Settings
from workflows.models import (
    CreateRoomInput,
    JoinGrant,
    MintTokenInput,
    RecordingStarted,
    Released,
    Role,
    StartRecordingInput,
)

T = TypeVar("T")

# What each role may do in the room. Observers watch; nobody but the engine holds admin.
class RoleGrants(TypedDict):
    """The publish/subscribe grants of one role (passed to ``api.VideoGrants``)."""

    can_publish: bool
    can_subscribe: bool
    can_publish_data: bool


ROLE_GRANTS: dict[Role, RoleGrants] = {
    Role.CANDIDATE: {"can_publish": True, "can_subscribe": True, "can_publish_data": True},
    Role.COACH: {"can_publish": True, "can_subscribe": True, "can_publish_data": True},
    Role.INTERVIEWER: {"can_publish": True, "can_subscribe": True, "can_publish_data": True},
    Role.OBSERVER: {"can_publish": False, "can_subscribe": True, "can_publish_data": False},
}


def mint_token(settings: Settings, inp: MintTokenInput) -> tuple[str, datetime]:
    """Sign a join token for one participant of one room. `role=None` is the avatar: an agent that publishes."""
    if inp.role is None:
        # The avatar: LiveAvatar needs publish, subscribe and publish-data (without data, /start answers 500),
        # and kind=agent makes it a dependent participant that does not hold the room open.
        grants = api.VideoGrants(room_join=True, room=inp.room, can_publish=True, can_subscribe=True, can_publish_data=True)
        kind: Literal["standard", "agent"] = "agent"
    else:
        grants = api.VideoGrants(room_join=True, room=inp.room, **ROLE_GRANTS[inp.role])
        kind = "standard"
    expires_at = datetime.now(UTC) + inp.ttl
    token = (
        api.AccessToken(settings.livekit_api_key, settings.livekit_api_secret.get_secret_value())
        .with_identity(inp.identity)
        .with_name(inp.name or inp.identity)
        .with_kind(kind)
        .with_grants(grants)
        .with_attributes({"sessionflow.role": inp.role.value if inp.role else "avatar"})
        .with_ttl(inp.ttl)
        .to_jwt()
    )
    return token, expires_at


def mint_monitor_token(settings: Settings, room: str, identity: str, ttl: timedelta) -> str:
    """The room monitor's token: hidden (nobody sees it), agent kind (it never holds the room open), and it
    may only subscribe: no publishing, no data, no admin."""
    grants = api.VideoGrants(
        room_join=True, room=room, hidden=True, can_subscribe=True, can_publish=False, can_publish_data=False
    )
    return (
        api.AccessToken(settings.livekit_api_key, settings.livekit_api_secret.get_secret_value())
        .with_identity(identity)
        .with_kind("agent")
        .with_grants(grants)
        .with_ttl(ttl)
        .to_jwt()
    )


class LiveKitActivities:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    @asynccontextmanager
    async def _api(self) -> AsyncIterator[api.LiveKitAPI]:
        # One short-lived client per call: its aiohttp session belongs to the running event loop.
        async with api.LiveKitAPI(
            self._settings.livekit_http_url,
            self._settings.livekit_api_key,
            self._settings.livekit_api_secret.get_secret_value(),
        ) as lk:
            yield lk

    async def _call(self, what: str, call: Awaitable[T], *, cleanup: bool = False) -> T | None:
        """Run one LiveKit call under our own timeout and classify its failure.

        `cleanup`: a `not_found` answer means the thing is already gone, which is what we wanted, and no
        failure is final (see `never_final`).
        """
        try:
            async with asyncio.timeout(self._settings.livekit_call_timeout_s):
                return await call
        except api.ServerError as e:
            # 404 with code "unknown" is a wrong URL, not a missing room (reference/livekit.md §1.4).
            if cleanup and e.status == 404 and e.code == "not_found":
                return None
            err = classify_livekit_error(e, what)
            raise (never_final(err) if cleanup else err) from e
        except Exception as e:
            err = classify_livekit_error(e, what)
            raise (never_final(err) if cleanup else err) from e

    @activity.defn
    async def create_room(self, inp: CreateRoomInput) -> None:
        """Create the session's room, or find it already there (CreateRoom is idempotent by name)."""
        metadata = json.dumps({"workflow_id": inp.workflow_id, "kind": inp.session_kind.value})
        async with self._api() as lk:
            room = await self._call(
                f"create room {inp.room}",
                lk.room.create_room(
                    api.CreateRoomRequest(
                        name=inp.room,
                        empty_timeout=inp.empty_timeout_s,
                        departure_timeout=inp.departure_timeout_s,
                        max_participants=inp.max_participants,
                        metadata=metadata,
                    )
                ),
            )
        assert room is not None
        activity.logger.info("room ready", extra={"room": room.name, "room_sid": room.sid})

    @activity.defn
    async def delete_room(self, room: str) -> Released:
        """Delete the room; a room that is already gone counts as deleted. A cleanup step: never gives up."""
        await self.release_room(room)
        activity.logger.info("room deleted", extra={"room": room})
        return Released(resource="room", id=room)

    async def release_room(self, room: str) -> None:
        """Delete `room` (already gone counts as deleted); failures are classified and always retryable.

        Shared by `delete_room` and the safety nets (the keep-alive net, the reaper), which run it outside the
        workflow's cleanup.
        """
        async with self._api() as lk:
            await self._call(f"delete room {room}", lk.room.delete_room(api.DeleteRoomRequest(room=room)), cleanup=True)

    async def list_rooms(self) -> list[api.Room]:
        """Every live room on the server, bounded by the call timeout and classified like the activities."""
        async with self._api() as lk:
            listed = await self._call("list rooms", lk.room.list_rooms(api.ListRoomsRequest()))
        assert listed is not None
        return list(listed.rooms)

    @activity.defn
    async def mint_participant_token(self, inp: MintTokenInput) -> JoinGrant:
        """Mint a participant's join token with the grants of their role."""
        if inp.role is None:
            raise ValueError("participant tokens need a role; the avatar's token is minted by the avatar activity")
        token, expires_at = mint_token(self._settings, inp)
        return JoinGrant(
            url=self._settings.livekit_url,
            room=inp.room,
            identity=inp.identity,
            role=inp.role,
            token=token,
            expires_at=expires_at,
        )

    @activity.defn
    async def start_recording(self, inp: StartRecordingInput) -> RecordingStarted:
        """Start recording the room (a room composite egress to `SESSIONFLOW_RECORDING_FILEPATH`).

        Only ever asked for once everyone the spec names has consented (the machine decides). A server without
        an egress service answers 503 after a long wait, or not within our timeout: that failure reaches the
        session, which goes on unrecorded.
        """
        request = api.RoomCompositeEgressRequest(
            room_name=inp.room,
            layout="speaker",
            file_outputs=[api.EncodedFileOutput(file_type=api.EncodedFileType.MP4, filepath=self._settings.recording_filepath)],
        )
        async with self._api() as lk:
            info = await self._call(f"start recording room {inp.room}", lk.egress.start_room_composite_egress(request))
        assert info is not None
        activity.logger.info("recording started", extra={"room": inp.room, "egress_id": info.egress_id})
        return RecordingStarted(egress_id=info.egress_id)

    @activity.defn
    async def stop_recording(self, egress_id: str) -> None:
        """Stop one egress; one that has already ended (its room deleted, say) counts as stopped."""
        async with self._api() as lk:
            try:
                await self._call(f"stop recording {egress_id}", lk.egress.stop_egress(api.StopEgressRequest(egress_id=egress_id)))
            except ApplicationError as e:
                status = getattr(e.__cause__, "status", None)
                if status not in (404, 412):  # not found, or already complete / failed: nothing records any more
                    raise
        activity.logger.info("recording stopped", extra={"egress_id": egress_id})
