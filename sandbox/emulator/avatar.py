"""The emulated avatar: a real LiveKit participant that publishes synthetic video and audio.

It joins the room named in ``livekit_config`` with the token it was given (so its identity is the token's ``sub``),
stays until told to leave, and always leaves cleanly. Joining and leaving run in a background task of the app.
"""

from __future__ import annotations

import asyncio
import contextlib
from enum import StrEnum
from typing import Any

import jwt
from livekit import rtc

from sandbox.media import SyntheticMedia, join_room

from .schemas import LiveKitConfig


class SilenceMode(StrEnum):
    QUIET = "quiet"  # it sends silence, as an avatar that listens does (healthy: a few packets a second)
    MUTE = "mute"  # its audio track stays published but muted: no packet reaches the room (a stalled stream)
    UNPUBLISH = "unpublish"  # its audio track leaves the room; the avatar and its video stay


class AvatarJoinError(Exception):
    """The avatar could not join the LiveKit room; ``/start`` answers 500 with this message."""


def avatar_identity(livekit: LiveKitConfig) -> str:
    """Check the avatar token the way LiveAvatar does and return the identity (``sub``) it will join with.

    Raises ``AvatarJoinError`` if the token is not a JWT, lacks ``video.canPublishData`` (reference §3.2, §6), or
    grants a different room than ``livekit_room``. The signature is not checked: only LiveKit has the secret.
    """
    try:
        claims: dict[str, Any] = jwt.decode(livekit.livekit_client_token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise AvatarJoinError(f"livekit_client_token is not a valid JWT ({exc})") from exc
    video = claims.get("video") or {}
    if video.get("canPublishData") is not True:
        raise AvatarJoinError(
            "livekit_client_token lacks canPublishData; grant can_publish_data=True to the avatar's token"
        )
    granted_room = video.get("room")
    if granted_room and granted_room != livekit.livekit_room:
        raise AvatarJoinError(
            f"livekit_client_token grants room {granted_room!r} but livekit_room is {livekit.livekit_room!r}"
        )
    return str(claims.get("sub") or "")


class Avatar:
    """One avatar participant. ``join()`` returns once it is in the room publishing media; ``leave()`` ends it."""

    def __init__(self, livekit: LiveKitConfig, *, join_timeout_s: float) -> None:
        self.identity = avatar_identity(livekit)
        self.room_name = livekit.livekit_room
        self._livekit = livekit
        self._join_timeout_s = join_timeout_s
        self._room: rtc.Room | None = None
        self._joined = asyncio.Event()
        self._leave = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._media = SyntheticMedia()

    def freeze(self) -> None:
        """Its video stops (the track stays published): what a stuck renderer looks like from the room."""
        self._media.freeze_video()

    async def silence(self, mode: SilenceMode) -> None:
        """Its sound stops, three ways (see ``SilenceMode``); its video goes on."""
        match mode:
            case SilenceMode.QUIET:
                self._media.quiet_audio()
            case SilenceMode.MUTE:
                self._media.mute_audio()
            case SilenceMode.UNPUBLISH:
                await self._media.unpublish_audio()

    @property
    def present(self) -> bool:
        """In the room right now (joined, not left, not disconnected by the server)."""
        return self._room is not None and self._room.isconnected()

    @property
    def alone(self) -> bool:
        """In the room with no other (visible) participant."""
        return self._room is not None and self._room.isconnected() and not self._room.remote_participants

    async def join(self) -> None:
        """Start the participant task and wait until it has joined and published, or raise ``AvatarJoinError``."""
        if self._task is not None:
            raise RuntimeError("Avatar.join() called twice")
        self._task = asyncio.create_task(self._run(), name=f"avatar-{self.identity}")
        joined = asyncio.create_task(self._joined.wait())
        # The SDK bounds each connect attempt by join_timeout_s; the margin covers publishing the tracks.
        done, _ = await asyncio.wait(
            {joined, self._task}, timeout=self._join_timeout_s + 2.0, return_when=asyncio.FIRST_COMPLETED
        )
        joined.cancel()
        if self._joined.is_set():
            return
        if self._task in done:
            error = self._task.exception()
            raise AvatarJoinError(f"avatar could not join room {self.room_name!r}: {error}") from error
        # Still connecting: never cancel a connect (reference/livekit.md §5); it leaves as soon as it gets in.
        self._leave.set()
        self._task.add_done_callback(lambda task: task.cancelled() or task.exception())  # consume late failures
        raise AvatarJoinError(f"avatar did not join room {self.room_name!r} within {self._join_timeout_s:g} s")

    async def leave(self) -> None:
        """Leave the room (unpublish, disconnect) and wait until gone. Idempotent; never raises."""
        self._leave.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)

    async def _run(self) -> None:
        options = rtc.RoomOptions(connect_timeout=self._join_timeout_s)
        async with join_room(
            self._livekit.livekit_url, self._livekit.livekit_client_token, publish_media=False, options=options
        ) as room:
            await self._media.start(room)
            self._room = room
            # Being removed or the room being deleted ends the participant too.
            room.on("disconnected", lambda *_: self._leave.set())
            self._joined.set()
            try:
                await self._leave.wait()
            finally:
                self._room = None
                await self._media.stop(unpublish=False)  # leaving the room unpublishes
