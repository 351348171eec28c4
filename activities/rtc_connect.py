"""Joining a LiveKit room with the rtc SDK without ever cutting `room.connect()` short.

Cancelling `connect()` midway leaks the SDK's sockets and FFI handles (reference/livekit.md), so a cancel that
arrives while connecting waits for the attempt to settle, leaves the room, then propagates. Used by the room
monitor and by every rtc participant the sandbox runs (the emulator's avatar, test participants).
"""

from __future__ import annotations

import asyncio
import contextlib

from livekit import rtc


async def connect_shielded(room: rtc.Room, url: str, token: str, options: rtc.RoomOptions) -> None:
    """`room.connect(...)`; on cancel, the attempt finishes and the room is left before the cancel goes on."""
    connecting = asyncio.ensure_future(room.connect(url, token, options))
    try:
        await asyncio.shield(connecting)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await connecting
        await room.disconnect()
        raise
