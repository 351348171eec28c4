"""The room monitor's costs and speed: event latency, history size, and a media worker's memory and CPU.

    python -m sandbox exec -- python -m bench.monitor_events [--sessions 10,50] [--events 30] [--hold 20]

- **event latency**: a real participant (publishing audio) connecting or leaving, from the start of its connect
  (or its leave) until the session's `state` says so (polled every 20 ms), p50/p99 over `--events` joins and as
  many leaves, once from the monitor alone (the stack's gateway paused: no webhook) and once from the webhooks
  alone (no media worker for those sessions).
- **history**: the events of a session that ran `--hold` seconds with one participant in, monitor on; the
  monitor heartbeats (not history) and signals only changes, so a steady hour adds nothing: the figure is per
  session, whatever its length, plus one signal per change.
- **media worker**: `python -m workers --media` as its own process, watching `n` sessions (one participant
  each, publishing audio, which the monitor subscribes to): its resident memory and CPU over `--hold` seconds,
  against the same worker watching nothing.

Prints figures and writes JSON (`--json`); asserts nothing. Every session is ended, also when the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from livekit import rtc

from bench.common import usage
from config.settings import Settings
from sandbox.media import join_room
from sandbox.stack import REPO_ROOT, LocalStack
from starters.client import SessionClient
from workers.temporal import connect
from workers.worker import build_media_worker, build_worker
from workflows.models import SessionSpec

POLL_S = 0.02


def spec(n: int) -> SessionSpec:
    return SessionSpec.model_validate({
        "session_id": f"bench-mon-{uuid.uuid4().hex[:8]}-{n}",
        "kind": "interview",
        "participants": [{"identity": "cand", "role": "candidate"}],
        "max_duration": "PT30M",
    })


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def until(sessions: SessionClient, session_id: str, present: list[str], every: float = POLL_S) -> None:
    """Poll the session's state until `present` is who it sees (a benchmark measures: no timeout of its own)."""
    while True:
        if (await sessions.state(session_id)).present == present:
            return
        await asyncio.sleep(every)


async def latency(sessions: SessionClient, events: int) -> dict[str, float]:
    """Seconds from a participant's connect (or leave) returning to the session's state showing it."""
    s = spec(0)
    grant = await sessions.join(s, "cand")
    joins: list[float] = []
    leaves: list[float] = []
    try:
        for _ in range(events):
            stack = contextlib.AsyncExitStack()
            started = time.monotonic()
            await stack.enter_async_context(audio_participant(grant.url, grant.token))  # connected and publishing
            await until(sessions, s.session_id, ["cand"])
            joins.append(time.monotonic() - started)
            started = time.monotonic()
            await stack.aclose()  # left the room
            await until(sessions, s.session_id, [])
            leaves.append(time.monotonic() - started)
    finally:
        await sessions.end(s.session_id, "bench over")
    return {
        "join_p50_ms": 1000 * statistics.median(joins), "join_p99_ms": 1000 * percentile(joins, 99),
        "leave_p50_ms": 1000 * statistics.median(leaves), "leave_p99_ms": 1000 * percentile(leaves, 99),
    }


@contextlib.asynccontextmanager
async def gateway_paused() -> AsyncIterator[None]:
    stack = LocalStack.attach()
    assert stack is not None, "run under `python -m sandbox exec`"
    stack.pause("gateway")
    try:
        yield
    finally:
        stack.resume("gateway")


@contextlib.asynccontextmanager
async def audio_participant(url: str, token: str) -> AsyncIterator[None]:
    """A participant publishing a quiet tone (what the monitor subscribes to): light enough for 50 in one process."""
    async with join_room(url, token, publish_media=False) as room:
        source = rtc.AudioSource(48000, 1)
        track = rtc.LocalAudioTrack.create_audio_track("mic", source)
        await room.local_participant.publish_track(track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        silence = rtc.AudioFrame(np.zeros(480, dtype=np.int16).tobytes(), 48000, 1, 480)

        async def produce() -> None:
            while True:
                await source.capture_frame(silence)
                await asyncio.sleep(0.01)

        task = asyncio.create_task(produce())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await source.aclose()


async def sample(pid: int, hold: float) -> dict[str, float]:
    cpu0, _ = usage(pid)
    await asyncio.sleep(hold)
    cpu1, rss = usage(pid)
    return {"cpu_pct": 100 * (cpu1 - cpu0) / hold, "rss_mib": rss}


async def media_load(sessions: SessionClient, media_queue: str, counts: list[int], hold: float) -> dict[str, Any]:
    env = os.environ | {"SESSIONFLOW_MEDIA_TASK_QUEUE": media_queue, "SESSIONFLOW_LOG_LEVEL": "WARNING"}
    worker = subprocess.Popen([sys.executable, "-m", "workers", "--media"], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, Any] = {}
    try:
        await asyncio.sleep(3)
        results["idle"] = await sample(worker.pid, hold)
        for n in counts:
            specs = [spec(i) for i in range(n)]
            async with contextlib.AsyncExitStack() as stack:
                grants = await asyncio.gather(*(sessions.join(s, "cand") for s in specs))
                for grant in grants:
                    await stack.enter_async_context(audio_participant(grant.url, grant.token))
                # Slow polling here: 50 sessions polled every 20 ms would be the load measured.
                await asyncio.gather(*(until(sessions, s.session_id, ["cand"], every=1.0) for s in specs))
                await asyncio.sleep(3)  # every monitor connected and subscribed
                figures = await sample(worker.pid, hold)
                history = await sessions.handle(specs[0].session_id).fetch_history()
                figures["history_events_first_session"] = len(history.events)
                results[str(n)] = figures
                await asyncio.gather(*(sessions.end(s.session_id, "bench over") for s in specs))
            print(f"  {n} sessions: {results[str(n)]}", flush=True)
    finally:
        worker.terminate()
        worker.wait(20)
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", default="10,50")
    parser.add_argument("--events", type=int, default=30)
    parser.add_argument("--hold", type=float, default=20.0)
    parser.add_argument("--json", default=".sessionflow/bench-monitor-events.json")
    args = parser.parse_args()
    settings = Settings()
    client = await connect(settings)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    monitored = SessionClient(client, settings.model_copy(update={"media_task_queue": f"{queue}-media"}), task_queue=queue)
    webhooks_only = SessionClient(client, settings.model_copy(update={"media_task_queue": ""}), task_queue=queue)
    out: dict[str, Any] = {"cpus": os.cpu_count(), "load_before": os.getloadavg()}
    async with build_worker(client, settings, task_queue=queue):
        async with build_media_worker(client, monitored.settings):
            async with gateway_paused():
                out["monitor_alone"] = await latency(monitored, args.events)
            print(f"monitor alone: {out['monitor_alone']}", flush=True)
        out["webhooks_alone"] = await latency(webhooks_only, args.events)
        print(f"webhooks alone: {out['webhooks_alone']}", flush=True)
        counts = [int(n) for n in args.sessions.split(",") if n]
        load = SessionClient(client, settings.model_copy(update={"media_task_queue": f"{queue}-load"}), task_queue=queue)
        out["media_worker"] = await media_load(load, load.settings.media_task_queue, counts, args.hold)
    write(Path(args.json), out)
    print(json.dumps(out, indent=2))


def write(path: Path, out: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # the Temporal runtime can crash at interpreter exit (sdk-python#300)
