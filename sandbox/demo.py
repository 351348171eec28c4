"""`python -m sandbox demo` (`make demo`): one scripted AI-avatar interview on the embedded local stack, start to finish.

Starts the stack (Temporal dev server, LiveKit server, LiveAvatar emulator, gateway) unless one is already up,
runs a worker in this process, and then: a candidate (a real LiveKit participant, publishing synthetic
media) joins with the token the session minted; the avatar joins; the session is ended; cleanup completes.
It prints the session's timeline from its Temporal history and the Temporal UI link, checks that LiveKit
holds no room and LiveAvatar no active session of it, and stops everything it started.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from livekit import api, rtc
from rich.console import Console

from activities.liveavatar_client import LiveAvatarClient
from config.settings import DEFAULT_AVATAR_ID, Settings
from sandbox.media import join_room
from sandbox.stack import LocalStack
from starters.client import SessionClient
from starters.timeline import render, timeline
from workers.codec import decode_history
from workers.temporal import connect
from workers.worker import build_worker
from workflows.models import SessionSpec, avatar_identity_prefix

console = Console(highlight=False)
T = TypeVar("T")


@dataclass
class DemoResult:
    session_id: str
    ready_seconds: float
    avatar_seconds: float
    leaked_rooms: int
    leaked_avatars: int


@asynccontextmanager
async def local_stack() -> AsyncIterator[None]:
    """Reuse a healthy stack that is already up (`python -m sandbox dev`), else start one for the demo's lifetime."""
    running = LocalStack.attach()
    if running is not None and running.healthy():
        console.print("[dim]using the local stack that is already running[/dim]")
        os.environ.update(running.env)
        yield
        return
    async with LocalStack() as stack:
        os.environ.update(stack.env)
        for label, url in stack.urls.items():
            console.print(f"  {label:<20} {url}")
        yield


async def wait_for(what: str, check: Callable[[], Awaitable[T]], timeout: float = 30.0, every: float = 0.2) -> T:
    """Poll `check()` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)


def demo_spec(session_id: str, deployment: str) -> SessionSpec:
    return SessionSpec.model_validate(
        {
            "session_id": session_id,
            "deployment": deployment,
            "kind": "interview",
            "participants": [
                {"identity": "candidate-1", "role": "candidate", "name": "Demo Candidate"},
                {"identity": "observer-1", "role": "observer", "name": "Demo Observer"},
            ],
            "avatar": {"avatar_id": DEFAULT_AVATAR_ID},
            "max_duration": "PT10M",
            "no_show_timeout": "PT2M",
        }
    )


async def run_interview(settings: Settings, sessions: SessionClient) -> DemoResult:
    spec = demo_spec(f"demo-{uuid.uuid4().hex[:8]}", settings.deployment)
    sid = spec.session_id
    console.rule(f"[bold]interview {sid}")

    t0 = time.monotonic()
    grant = await sessions.join(spec, "candidate-1")
    ready = time.monotonic() - t0
    console.print(f"[green]✓[/green] session started and candidate admitted in {ready * 1000:.0f} ms (room {grant.room})")

    avatar_prefix = avatar_identity_prefix(sid)
    async with join_room(grant.url, grant.token, publish_media=True) as room:
        console.print("[green]✓[/green] candidate connected to LiveKit with the minted token, publishing camera + mic")
        t1 = time.monotonic()

        def avatar_video() -> bool:
            return any(
                identity.startswith(avatar_prefix) and pub.kind == rtc.TrackKind.KIND_VIDEO and pub.subscribed
                for identity, p in room.remote_participants.items()
                for pub in p.track_publications.values()
            )

        async def avatar_seen() -> bool:
            return avatar_video()

        await wait_for("the avatar's video in the room", avatar_seen, timeout=45)
        avatar_after = time.monotonic() - t1
        console.print(f"[green]✓[/green] avatar joined and its video is received, {avatar_after:.1f} s after the candidate")
        state = await sessions.state(sid)
        console.print(f"  state: {state.status.value}, present {state.present}, avatar session {state.avatar_session_id}")
        await asyncio.sleep(2)  # let the interview run for a moment
        final = await sessions.end(sid, "demo interview finished")
    console.print(f"[green]✓[/green] session ended: {final.status.value} ({final.end_reason}); cleanup completed")
    console.print(f"  billed avatar time: {final.avatar_seconds:.1f} s over {len(final.avatar_sessions)} avatar session(s)")

    last_avatar = final.avatar_sessions[-1] if final.avatar_sessions else None
    leaked_rooms, leaked_avatars = await check_released(settings, spec, last_avatar)
    handle = sessions.handle(sid)
    await handle.result()  # the workflow closes once its keep-alive has acknowledged the end
    converter = sessions.client.data_converter
    history = await decode_history(await handle.fetch_history(), converter.payload_codec)
    console.rule("timeline (from the session's Temporal history)")
    console.print(render(timeline(history, converter)))
    console.rule()
    console.print(f"Temporal UI: [link]{sessions.ui_url(sid)}[/link]")
    return DemoResult(sid, ready, avatar_after, leaked_rooms, leaked_avatars)


async def check_released(settings: Settings, spec: SessionSpec, avatar_session_id: str | None) -> tuple[int, int]:
    """Ask LiveKit and LiveAvatar themselves whether anything of this session is left."""
    async with api.LiveKitAPI(
        settings.livekit_http_url, settings.livekit_api_key, settings.livekit_api_secret.get_secret_value()
    ) as lk:
        rooms = (await lk.room.list_rooms(api.ListRoomsRequest(names=[spec.room_name]))).rooms
    leaked_avatars = 0
    if avatar_session_id:
        async with LiveAvatarClient(settings.liveavatar_api_url, settings.liveavatar_api_key.get_secret_value()) as la:
            entry = await la.get_session(avatar_session_id)
            leaked_avatars = 0 if entry.is_ended else 1
            console.print(f"  LiveAvatar session {avatar_session_id}: ended at {entry.end_at} ({entry.end_reason})")
    console.print(f"  LiveKit rooms named {spec.room_name}: {len(rooms)}")
    return len(rooms), leaked_avatars


async def demo() -> int:
    console.print("[bold]sessionflow demo[/bold]: one AI-avatar interview on the local stack")
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(local_stack())
        settings = Settings()
        client = await connect(settings)
        task_queue = f"demo-{uuid.uuid4().hex[:8]}"
        worker = build_worker(client, settings, task_queue=task_queue)
        await stack.enter_async_context(worker)
        sessions = SessionClient(client, settings, task_queue=task_queue)
        result = await run_interview(settings, sessions)
    clean = result.leaked_rooms == 0 and result.leaked_avatars == 0
    if clean:
        console.print(
            f"[bold green]every resource released[/bold green]: 0 rooms, 0 avatar sessions left "
            f"(session ready in {result.ready_seconds * 1000:.0f} ms)"
        )
        console.print("[dim]stack stopped; start it again with `python -m sandbox dev` to browse the Temporal UI[/dim]")
    else:
        console.print(f"[bold red]LEAK[/bold red]: {result.leaked_rooms} room(s), {result.leaked_avatars} avatar session(s) left")
    return 0 if clean else 1

