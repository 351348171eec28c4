"""The room monitor's costs and speed: event latency, history size, and a media worker's memory and CPU.

    python -m sandbox exec -- python -m bench.monitor_events [--sessions 10,50] [--events 30] [--hold 20]

- **event latency**: a real participant (publishing audio) connecting or leaving, from the start of its connect
  (or its leave) until the session's `state` says so (polled every 20 ms), p50/p99 over `--events` joins and as
  many leaves, once from the monitor alone (the stack's gateway paused: no webhook) and once from the webhooks
  alone (no media worker for those sessions).
- **history**: each session's event count once its participant is in (monitor on), and again after `--hold`
  seconds: the growth per session over the hold, extrapolated to an hour (measured slope x 3600 / hold; the
  monitor heartbeats, which is not history, and signals only changes).
- **media worker**: `python -m workers --media` as its own process, watching `n` sessions (one participant
  each, publishing audio, hosted by two processes of their own, `bench/participants.py`): its resident memory
  and CPU over `--hold` seconds, against the same worker watching nothing, and per session.

Robust on a loaded machine: every call is bounded and a slow one is asked again, not fatal; sessions are ended
a few at a time, each end retried.

Prints figures and writes JSON (`--json`); asserts nothing. Every session is ended, also when the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from livekit import rtc

from bench.common import RESULTS, ParticipantHost, WorkerProcess, bounded, usage
from config.settings import Settings
from sandbox.media import join_room
from sandbox.stack import LocalStack
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


async def shown(sessions: SessionClient, session_ids: list[str], timeout: float) -> list[str]:
    """Poll (slowly, 4 at a time, each call bounded) until every session shows its participant; returns those
    that did not within `timeout`. A slow or failed query is asked again, not fatal."""
    waiting = list(session_ids)
    deadline = time.monotonic() + timeout

    async def present(session_id: str) -> bool:
        return (await sessions.state(session_id)).present == ["cand"]

    while waiting and time.monotonic() < deadline:
        results = await bounded(waiting, 4, present, timeout=30)
        waiting = [s for s, r in zip(waiting, results, strict=True) if r is not True]
        if waiting:
            await asyncio.sleep(1.0)
    return waiting


async def history_sizes(sessions: SessionClient, session_ids: list[str]) -> list[int]:
    results = await bounded(session_ids, 4, lambda s: sessions.handle(s).fetch_history(), timeout=30)
    return [len(r.events) for r in results if not isinstance(r, Exception)]


async def end_all(sessions: SessionClient, session_ids: list[str]) -> list[str]:
    """End every session (bounded, each end retried twice): an overloaded LiveKit or Temporal slows them down,
    it does not leave rooms behind. Returns the ones that still did not end."""
    todo = list(session_ids)
    for _ in range(3):
        results = await bounded(todo, 5, lambda s: sessions.end(s, "bench over"), timeout=60)
        todo = [s for s, r in zip(todo, results, strict=True) if isinstance(r, Exception)]
        if not todo:
            break
    return todo


async def leave(hosts: dict[str, ParticipantHost], session_id: str) -> float:
    return await hosts[session_id].leave(session_id)


async def media_load(sessions: SessionClient, counts: list[int], hold: float) -> dict[str, Any]:
    """The media worker (its own process) watching `n` sessions, each with one participant publishing audio;
    the participants are hosted by two processes of their own, so this process only measures."""
    media = WorkerProcess(True, sessions.task_queue, sessions.settings.media_task_queue, log="bench-monitor-media-worker.log")
    results: dict[str, Any] = {}
    try:
        async with ParticipantHost(RESULTS / "bench-monitor-participants0.log") as h0, \
                ParticipantHost(RESULTS / "bench-monitor-participants1.log") as h1:
            await asyncio.sleep(5)  # the worker connected and polling
            results["idle"] = await sample(media.proc.pid, hold)
            print(f"  idle media worker: {results['idle']}", flush=True)
            for n in counts:
                specs = [spec(i) for i in range(n)]
                ids = [s.session_id for s in specs]
                hosts = {s.session_id: (h0, h1)[i % 2] for i, s in enumerate(specs)}

                async def populate(s: SessionSpec, hosts: dict[str, ParticipantHost] = hosts) -> None:
                    grant = await sessions.join(s, "cand")
                    await hosts[s.session_id].join(s.session_id, grant.url, grant.token)

                try:
                    failed = [r for r in await bounded(specs, 5, populate, timeout=60) if isinstance(r, Exception)]
                    not_shown = await shown(sessions, ids, timeout=120)
                    await asyncio.sleep(3)  # every monitor connected and subscribed
                    before = await history_sizes(sessions, ids)
                    host_cpu = [usage(h.pid)[0] for h in (h0, h1)]
                    figures: dict[str, Any] = dict(await sample(media.proc.pid, hold))
                    after = await history_sizes(sessions, ids)
                    figures["participants_cpu_pct"] = 100 * sum(usage(h.pid)[0] - c for h, c in zip((h0, h1), host_cpu,
                                                                                                       strict=True)) / hold
                    figures["per_session"] = {"cpu_pct": (figures["cpu_pct"] - results["idle"]["cpu_pct"]) / n,
                                              "rss_mib": (figures["rss_mib"] - results["idle"]["rss_mib"]) / n}
                    figures["failed_joins"], figures["not_shown"] = len(failed), len(not_shown)
                    figures["history_events_mean"] = statistics.mean(before) if before else None
                    if before and after:
                        grown = (sum(after) - sum(before)) / min(len(before), len(after))
                        # Extrapolated: events added per session over the hold, scaled to an hour.
                        figures["history_events_per_session_hour"] = grown * 3600 / (hold + 0.0)
                    results[str(n)] = figures
                finally:
                    figures_end = await end_all(sessions, ids)
                    await bounded(ids, 8, functools.partial(leave, hosts), timeout=30)
                    results.setdefault(str(n), {})["not_ended"] = len(figures_end)
                print(f"  {n} sessions: {results[str(n)]}", flush=True)
    finally:
        media.stop()
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
        out["media_worker"] = await media_load(load, counts, args.hold)
    write(Path(args.json), out)
    print(json.dumps(out, indent=2))


def write(path: Path, out: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # the Temporal runtime can crash at interpreter exit (sdk-python#300)
