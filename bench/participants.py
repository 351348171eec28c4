"""A process hosting real LiveKit participants for a benchmark, so their CPU is not the measuring client's.

    python -m bench.participants        # driven through `bench.common.ParticipantHost`, not by hand

Reads one JSON request per line on stdin and answers one JSON line per request on stdout:

- `{"id": 1, "op": "join", "key": "s1", "url": "ws://...", "token": "..."}`: connect a participant (rtc SDK),
  publish a microphone track and keep feeding it a tone; answers `{"id": 1, "ok": true, "ms": 123.4}` once
  connected and published (`ms`: from the request to published).
- `{"id": 2, "op": "leave", "key": "s1"}`: leave the room; answers once the disconnect returned.

End of input leaves every room and exits. Each participant sends what a person speaking sends: a continuous tone
(not silence, which Opus's DTX would reduce to almost nothing), 100 ms per frame to keep the Python side light.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import numpy as np
from livekit import rtc

from sandbox.media import join_room

RATE = 48_000
FRAME_S = 0.1
TONE_HZ = 440  # 44 whole periods per 100 ms frame: frame after frame, the tone is continuous


def _tone() -> rtc.AudioFrame:
    n = int(RATE * FRAME_S)
    samples = (np.sin(2 * np.pi * TONE_HZ * np.arange(n) / RATE) * 0.2 * 32767).astype(np.int16)
    return rtc.AudioFrame(samples.tobytes(), RATE, 1, n)


class Host:
    def __init__(self) -> None:
        self._frame = _tone()
        self._leave: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def join(self, key: str, url: str, token: str) -> None:
        """Return once `key`'s participant is connected and publishing; it stays until `leave(key)`."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        leave = self._leave[key] = asyncio.Event()
        self._tasks[key] = asyncio.create_task(self._participant(url, token, ready, leave))
        await ready

    async def leave(self, key: str) -> None:
        self._leave.pop(key).set()
        task = self._tasks.pop(key)
        await asyncio.gather(task, return_exceptions=True)

    async def leave_all(self) -> None:
        await asyncio.gather(*(self.leave(key) for key in list(self._leave)), return_exceptions=True)

    async def _participant(self, url: str, token: str, ready: asyncio.Future[None], leave: asyncio.Event) -> None:
        try:
            async with join_room(url, token, publish_media=False) as room:
                source = rtc.AudioSource(RATE, 1)
                track = rtc.LocalAudioTrack.create_audio_track("mic", source)
                options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
                await room.local_participant.publish_track(track, options)
                ready.set_result(None)
                loop = asyncio.get_running_loop()
                next_at = loop.time()
                while not leave.is_set():
                    await source.capture_frame(self._frame)
                    next_at = max(next_at + FRAME_S, loop.time())
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, next_at - loop.time())):
                            await leave.wait()
                await source.aclose()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
            if not isinstance(e, Exception):
                raise


async def main() -> None:
    host = Host()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pending: set[asyncio.Task[None]] = set()

    def answer(out: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()

    async def serve(request: dict[str, Any]) -> None:
        started = time.perf_counter()
        try:
            if request["op"] == "join":
                await host.join(request["key"], request["url"], request["token"])
            else:
                await host.leave(request["key"])
            answer({"id": request["id"], "ok": True, "ms": (time.perf_counter() - started) * 1000})
        except Exception as e:
            answer({"id": request["id"], "ok": False, "error": f"{type(e).__name__}: {e}"})

    while line := await reader.readline():
        task = asyncio.create_task(serve(json.loads(line)))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending, return_exceptions=True)
    await host.leave_all()


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # the rtc runtime's threads can hold the interpreter at exit
