"""A participant with camera and microphone, for a namespace of its own (see netns_relay): joins with the given
URL and token and stays until SIGTERM.

    python -m tests.support.netns_participant URL TOKEN
"""

from __future__ import annotations

import asyncio
import signal
import sys

from sandbox.media import join_room


async def main(url: str, token: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with join_room(url, token, publish_media=True):
        print("joined", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
