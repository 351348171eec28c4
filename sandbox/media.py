"""Synthetic media for real LiveKit participants (emulated avatar, demo candidate, tests).

``SyntheticMedia`` publishes a moving colour gradient (camera source) and a sine tone (microphone source) from a
connected ``rtc.Room`` until stopped; ``join_room`` connects a participant, optionally publishing that media, and
always leaves cleanly. Both exist because the rtc SDK punishes sloppy teardown: a cancelled ``room.connect()``
leaks its FFI attempt (reference/livekit.md §5), so connects are shielded and every join ends with
``await room.disconnect()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
from livekit import rtc

from activities.rtc_connect import connect_shielded

VIDEO_TRACK_NAME = "synthetic-camera"
AUDIO_TRACK_NAME = "synthetic-microphone"
UNPUBLISH_TIMEOUT_S = 3.0


class SyntheticMedia:
    """A synthetic video track and audio track published by one participant.

    ``start(room)`` publishes both tracks and starts their producer tasks; ``stop()`` cancels the producers,
    unpublishes the tracks (if the room is still connected) and releases the sources. ``stop()`` is idempotent.
    Also usable as ``async with SyntheticMedia().publish(room):``.
    """

    def __init__(
        self,
        *,
        width: int = 320,
        height: int = 240,
        fps: float = 15.0,
        tone_hz: float = 440.0,
        sample_rate: int = 48_000,
        audio_frame_ms: int = 20,
    ) -> None:
        self._width, self._height, self._fps = width, height, fps
        self._tone_hz, self._sample_rate = tone_hz, sample_rate
        self._samples_per_frame = sample_rate * audio_frame_ms // 1000
        self._room: rtc.Room | None = None
        self._video_source: rtc.VideoSource | None = None
        self._audio_source: rtc.AudioSource | None = None
        self._publications: list[rtc.LocalTrackPublication] = []
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def track_sids(self) -> list[str]:
        """Sids of the published tracks (empty before ``start`` and after ``stop``)."""
        return [publication.sid for publication in self._publications]

    async def start(self, room: rtc.Room) -> None:
        """Publish the video and audio tracks into ``room`` (which must be connected) and start producing."""
        if self._room is not None:
            raise RuntimeError("SyntheticMedia.start() called twice; create one instance per participant")
        self._room = room
        self._video_source = rtc.VideoSource(self._width, self._height)
        self._audio_source = rtc.AudioSource(self._sample_rate, 1)
        video = rtc.LocalVideoTrack.create_video_track(VIDEO_TRACK_NAME, self._video_source)
        audio = rtc.LocalAudioTrack.create_audio_track(AUDIO_TRACK_NAME, self._audio_source)
        try:
            for track, source in (
                (video, rtc.TrackSource.SOURCE_CAMERA),
                (audio, rtc.TrackSource.SOURCE_MICROPHONE),
            ):
                options = rtc.TrackPublishOptions(source=source)
                self._publications.append(await room.local_participant.publish_track(track, options))
        except BaseException:
            await self.stop()
            raise
        self._tasks = [
            asyncio.create_task(_paced(1.0 / self._fps, self._video_frames()), name="synthetic-video"),
            asyncio.create_task(
                _paced(self._samples_per_frame / self._sample_rate, self._audio_frames()), name="synthetic-audio"
            ),
        ]

    async def stop(self, *, unpublish: bool = True) -> None:
        """Stop producing, unpublish the tracks and release the sources. Safe to call more than once.

        Pass ``unpublish=False`` when the room is about to be left anyway: disconnecting unpublishes everything,
        while an explicit unpublish can stall for seconds (seen when no one else is in the room).
        """
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        room, publications, self._publications = self._room, self._publications, []
        if unpublish and room is not None and room.isconnected():
            for publication in publications:
                # Best effort and bounded: the room may be torn down underneath us.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(UNPUBLISH_TIMEOUT_S):
                        await room.local_participant.unpublish_track(publication.sid)
        for source in (self._video_source, self._audio_source):
            if source is not None:
                with contextlib.suppress(Exception):
                    await source.aclose()
        self._video_source = self._audio_source = None

    def freeze_video(self) -> None:
        """Stop producing video frames; the track stays published (a frozen picture, for the room monitor)."""
        if self._tasks:
            self._tasks[0].cancel()

    def quiet_audio(self) -> None:
        """Stop producing sound; the track stays published and unmuted. The SDK's source then sends silence, which
        the encoder squeezes to a few packets a second (Opus DTX): what a listening avatar sounds like."""
        if len(self._tasks) > 1:
            self._tasks[1].cancel()

    def mute_audio(self) -> None:
        """Mute the audio track (it stays published): LiveKit forwards no packet of it any more, a stalled stream."""
        audio = self._audio_publication()
        if audio is not None and audio.track is not None:
            audio.track.mute()

    async def unpublish_audio(self) -> None:
        """Take the audio track out of the room; the participant and its video stay."""
        audio = self._audio_publication()
        if audio is None or self._room is None:
            return
        if len(self._tasks) > 1:
            self._tasks[1].cancel()
        self._publications.remove(audio)
        async with asyncio.timeout(UNPUBLISH_TIMEOUT_S):
            await self._room.local_participant.unpublish_track(audio.sid)

    def _audio_publication(self) -> rtc.LocalTrackPublication | None:
        return next((p for p in self._publications if p.kind == rtc.TrackKind.KIND_AUDIO), None)

    @contextlib.asynccontextmanager
    async def publish(self, room: rtc.Room) -> AsyncIterator[SyntheticMedia]:
        """``start(room)`` on entry, ``stop()`` on exit."""
        await self.start(room)
        try:
            yield self
        finally:
            await self.stop()

    def _video_frames(self) -> Callable[[], Awaitable[None]]:
        """A producer that pushes one RGBA frame of a gradient drifting diagonally, plus colour bars."""
        assert self._video_source is not None
        source, width, height = self._video_source, self._width, self._height
        xs = np.arange(width, dtype=np.uint16)[None, :]
        ys = np.arange(height, dtype=np.uint16)[:, None]
        bars = (np.arange(width) * 8 // width * 32).astype(np.uint8)[None, :].repeat(height // 4, axis=0)
        pixels = np.full((height, width, 4), 255, dtype=np.uint8)
        tick = 0

        async def produce() -> None:
            nonlocal tick
            pixels[:, :, 0] = (xs + tick * 4) % 256
            pixels[:, :, 1] = (ys + tick * 2) % 256
            pixels[:, :, 2] = 128
            pixels[: height // 4, :, 2] = bars
            source.capture_frame(rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA, pixels.tobytes()))
            tick += 1

        return produce

    def _audio_frames(self) -> Callable[[], Awaitable[None]]:
        """A producer that pushes one 16-bit mono frame of a continuous sine tone."""
        assert self._audio_source is not None
        source, rate, n = self._audio_source, self._sample_rate, self._samples_per_frame
        step = 2 * math.pi * self._tone_hz / rate
        phase = 0.0

        async def produce() -> None:
            nonlocal phase
            samples = (np.sin(phase + step * np.arange(n)) * 0.2 * 32767).astype(np.int16)
            phase = (phase + step * n) % (2 * math.pi)
            await source.capture_frame(rtc.AudioFrame(samples.tobytes(), rate, 1, n))

        return produce


async def _paced(period: float, produce: Callable[[], Awaitable[None]]) -> None:
    """Call ``produce`` every ``period`` seconds until cancelled; after a stall, resume without a burst."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        await produce()
        next_at += period
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            next_at = loop.time()


@contextlib.asynccontextmanager
async def join_room(
    url: str,
    token: str,
    *,
    publish_media: bool,
    options: rtc.RoomOptions | None = None,
) -> AsyncIterator[rtc.Room]:
    """Connect a participant to ``url`` with ``token``; yield the connected ``rtc.Room``; always leave on exit.

    With ``publish_media`` the participant publishes a ``SyntheticMedia`` video and audio track while inside the
    block. A failed connect raises ``rtc.ConnectError``. If the caller is cancelled while connecting, the connect
    attempt is allowed to finish (cancelling it leaks FFI resources) and the room is left before re-raising.
    """
    room = rtc.Room()
    await connect_shielded(room, url, token, options or rtc.RoomOptions())
    media = SyntheticMedia() if publish_media else None
    try:
        if media is not None:
            await media.start(room)
        yield room
    finally:
        if media is not None:
            await media.stop(unpublish=False)  # the disconnect below unpublishes
        await room.disconnect()
