"""Serve an emulator inside the current event loop (tests, the dev stack): ``async with serve(config) as url``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import uvicorn

from .app import create_app
from .config import EmulatorConfig


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Embedded in someone else's process: leave its signal handlers alone.
        yield


@contextlib.asynccontextmanager
async def serve(
    config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 10.0
) -> AsyncIterator[str]:
    """Run an emulator on ``host:port`` (0 = a free port) in this loop; yield its base URL; shut it down on exit.

    Calls still hung by fault injection are released at shutdown (they answer 503).
    """
    app = create_app(config)
    server = _EmbeddedServer(
        uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    )
    task = asyncio.create_task(server.serve(), name="liveavatar-emulator")
    try:
        async with asyncio.timeout(startup_timeout_s):
            while not server.started:
                if task.done():
                    task.result()  # raises the startup error
                    raise RuntimeError(f"emulator on {host}:{port} exited during startup")
                await asyncio.sleep(0.01)
        bound_port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound_port}"
    finally:
        app.state.emulator.faults.reset()  # hung calls would block the graceful shutdown
        server.should_exit = True
        await task
