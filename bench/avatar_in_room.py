"""Avatar in room: `SessionClient.join` of a new avatar interview until the candidate, a real LiveKit participant
that connects with the grant, has the avatar's video track subscribed, and until its first video frame arrives;
at several concurrencies, against the emulator alone measured in the same run.

    python -m sandbox exec -- python -m bench.avatar_in_room       (`make bench` runs it with the others)
    python -m sandbox exec -- python -m bench.avatar_in_room --levels 1:10,5:15 --json /tmp/avatar.json

For each level `c:n`, `c` callers run a closed loop until `n` sessions are done, first the baseline, then the
engine:

- **engine**: join (update-with-start: the workflow, the room, the grant), the candidate connects with the grant
  (publishing nothing), the session learns of the join (LiveKit webhook through the gateway) and starts its avatar
  (`create_avatar_session`, `start_avatar_session` on the emulator, whose avatar is a real rtc participant
  publishing synthetic video), the candidate sees the avatar's video track subscribed, then its first frame. The
  candidate leaves and the session is ended (not measured: `end -> released` is its own row).
- **baseline, the emulator alone**: the same steps with no Temporal: create the room on LiveKit and mint the
  candidate's token directly, the candidate connects, create + start an avatar session directly on the emulator's
  LiveAvatar API (`POST /v1/sessions/token`, `/v1/sessions/start`), the same wait for the track and the frame; then
  stop the avatar and delete the room. Its `create + start` row is the emulator's own start time.

`--start immediately` starts the avatar with the workflow instead of on the candidate's join. No room monitor
runs (no media worker: the session learns of the join from the webhook). Every session is ended, every direct
room deleted and every direct avatar stopped, also when the run fails; the run ends by printing what is left on
LiveKit and the emulator. Prints figures, writes JSON and a CDF plot (docs/img/bench-avatar-in-room.png); asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

from livekit import api
from temporalio.api.enums.v1 import EventType

from activities.avatar import AVATAR_TOKEN_GRACE
from activities.liveavatar_client import LiveAvatarClient
from activities.livekit import mint_token
from bench.common import (
    cdf_plot,
    closed_loop,
    delete_rooms,
    direct_room,
    end_sessions,
    leftovers,
    livekit_api,
    machine,
    parse_levels,
    print_leftovers,
    print_table,
    quiet_sdk_logs,
    ratios,
    read_json,
    started_on,
    summary,
    watching_participant,
    write_json,
)
from config.settings import DEFAULT_AVATAR_ID, Settings
from starters.client import SessionClient
from workers.temporal import connect
from workers.worker import build_worker
from workflows.models import MintTokenInput, SessionSpec, avatar_identity_prefix

DEFAULT_LEVELS = "1:10,5:15"
DEFAULT_JSON = ".sessionflow/bench-avatar-in-room.json"
DIRECT_PREFIX = "bench-avdirect-"
BASE_AVATAR = "avatar-baseline-"
MAX_SESSION_S = 600
# One sample's wait for the avatar's video: far above any figure; a sample past it is counted as a failure.
SAMPLE_TIMEOUT_S = 60.0

ROWS = (
    ("engine_grant", "engine: join -> grant"),
    ("engine_connected", "engine: join -> candidate connected"),
    ("engine_track", "engine: join -> avatar video subscribed"),
    ("engine_frame", "engine: join -> first avatar frame"),
    ("engine_end", "engine: end -> released"),
    ("base_connected", "emulator alone: -> candidate connected"),
    ("base_start", "emulator alone: create + start avatar"),
    ("base_track", "emulator alone: -> avatar video subscribed"),
    ("base_frame", "emulator alone: -> first avatar frame"),
)


def avatar_spec(session_id: str, start: str) -> SessionSpec:
    return SessionSpec.model_validate({
        "session_id": session_id, "kind": "interview",
        "participants": [{"identity": "cand", "role": "candidate"}],
        "avatar": {"avatar_id": DEFAULT_AVATAR_ID, "start": start},
        "max_duration": "PT10M",
    })


class Bench:
    def __init__(self, client: Any, settings: Settings, task_queue: str, start: str) -> None:
        self.settings = settings
        self.sessions = SessionClient(client, settings, task_queue=task_queue)
        self.start = start
        self.samples: dict[str, list[float]] = {key: [] for key, _ in ROWS}
        self.failures: list[str] = []
        self.rooms: set[str] = set()  # every room the run used (session rooms and direct ones)
        self.open_sessions: set[str] = set()
        self.direct_avatars: set[str] = set()  # started on the emulator directly, not yet stopped
        self.direct_rooms: set[str] = set()  # created directly, not yet deleted
        self.client = client
        self.traced: list[tuple[str, float, dict[str, float]]] = []  # engine samples: id, sent (epoch s), client ms

    def lk(self) -> api.LiveKitAPI:
        lk: api.LiveKitAPI = livekit_api(self.settings)
        return lk

    def liveavatar(self) -> LiveAvatarClient:
        s = self.settings
        return LiveAvatarClient(base_url=s.liveavatar_api_url, api_key=s.liveavatar_api_key.get_secret_value(),
                                timeout=s.liveavatar_call_timeout_s)

    async def engine(self, session_id: str) -> None:
        spec = avatar_spec(session_id, self.start)
        self.rooms.add(spec.model_copy(update={"deployment": self.settings.deployment}).room_name)
        self.open_sessions.add(session_id)
        t0, sent = time.monotonic(), time.time()
        try:
            grant = await self.sessions.join(spec, "cand")
            self.rooms.add(grant.room)
            t_grant = time.monotonic()
            async with watching_participant(grant.url, grant.token) as watch:
                t_connected = time.monotonic()
                async with asyncio.timeout(SAMPLE_TIMEOUT_S):
                    _, t_track = await watch.video_from(avatar_identity_prefix(session_id))
                    _, t_frame = await watch.video_from(avatar_identity_prefix(session_id), frame=True)
            for key, t in (("engine_grant", t_grant), ("engine_connected", t_connected), ("engine_track", t_track),
                           ("engine_frame", t_frame)):
                self.samples[key].append((t - t0) * 1000)
            self.traced.append((session_id, sent, {"grant": (t_grant - t0) * 1000, "connected": (t_connected - t0) * 1000,
                                                   "track": (t_track - t0) * 1000, "frame": (t_frame - t0) * 1000}))
        except Exception as e:  # counted and shown; the run goes on
            self.failures.append(f"engine {session_id}: {e!r}")
        t_end = time.monotonic()
        try:
            await self.sessions.end(session_id, "bench over")
        except Exception as e:  # the cleanup tries again
            self.failures.append(f"end {session_id}: {e!r}")
            return
        self.samples["engine_end"].append((time.monotonic() - t_end) * 1000)
        self.open_sessions.discard(session_id)

    async def baseline(self, room: str) -> None:
        s = self.settings
        avatar_identity = BASE_AVATAR + room
        self.rooms.add(room)
        self.direct_rooms.add(room)
        t0 = time.monotonic()
        try:
            token = await direct_room(s, room, "avatar_in_room")
            async with watching_participant(s.livekit_url, token) as watch:
                t_connected = time.monotonic()
                avatar_token, _ = mint_token(s, MintTokenInput(
                    room=room, identity=avatar_identity, name="Avatar", role=None,
                    ttl=timedelta(seconds=MAX_SESSION_S) + AVATAR_TOKEN_GRACE))
                async with self.liveavatar() as la:
                    t_create = time.monotonic()
                    created = await la.create_session_token(
                        DEFAULT_AVATAR_ID, livekit_url=s.livekit_url, livekit_room=room,
                        livekit_client_token=avatar_token, max_session_duration=MAX_SESSION_S)
                    self.direct_avatars.add(created.session_id)
                    await la.start_session(created.session_token)
                    t_started = time.monotonic()
                async with asyncio.timeout(SAMPLE_TIMEOUT_S):
                    _, t_track = await watch.video_from(avatar_identity)
                    _, t_frame = await watch.video_from(avatar_identity, frame=True)
            self.samples["base_connected"].append((t_connected - t0) * 1000)
            self.samples["base_start"].append((t_started - t_create) * 1000)
            self.samples["base_track"].append((t_track - t0) * 1000)
            self.samples["base_frame"].append((t_frame - t0) * 1000)
        except Exception as e:
            self.failures.append(f"baseline {room}: {e!r}")
        try:
            await self.release_direct()
        except Exception as e:  # the cleanup tries again
            self.failures.append(f"baseline release {room}: {e!r}")

    async def release_direct(self) -> None:
        """Stop the directly started avatars and delete the direct rooms not yet released."""
        if self.direct_avatars:
            async with self.liveavatar() as la:
                for avatar_session_id in list(self.direct_avatars):
                    await la.stop_session_confirmed(avatar_session_id)
                    self.direct_avatars.discard(avatar_session_id)
        await delete_rooms(self.settings, self.direct_rooms)

    async def cleanup(self) -> None:
        await end_sessions(self.sessions, sorted(self.open_sessions), self.failures)
        self.open_sessions.clear()
        await self.release_direct()


MILESTONES = (
    ("grant", "grant at the client"),
    ("connected", "candidate connected"),
    ("signal", "session told of the join (webhook signal)"),
    ("create_scheduled", "create_avatar_session scheduled"),
    ("create_done", "create_avatar_session completed"),
    ("start_scheduled", "start_avatar_session scheduled"),
    ("start_done", "start_avatar_session completed"),
    ("track", "avatar video subscribed at the client"),
    ("frame", "first avatar frame at the client"),
)


async def milestones(bench: Bench, session_id: str, sent: float, client_ms: dict[str, float]) -> dict[str, float]:
    """Milestones of one engine sample, ms after the join was sent: the client's own, and from the session's
    history the webhook's signal that told it of the join (the last signal before the avatar's create) and the
    avatar's two activities."""
    history = await bench.sessions.handle(session_id).fetch_history()
    out = dict(client_ms)
    names: dict[int, str] = {}
    last_signal: float | None = None
    for event in history.events:
        at = (event.event_time.ToDatetime(tzinfo=UTC).timestamp() - sent) * 1000
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED and "create_scheduled" not in out:
            last_signal = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            names[event.event_id] = name
            if name == "create_avatar_session":
                out.setdefault("create_scheduled", at)
            elif name == "start_avatar_session":
                out.setdefault("start_scheduled", at)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            name = names.get(event.activity_task_completed_event_attributes.scheduled_event_id, "")
            if name == "create_avatar_session":
                out.setdefault("create_done", at)
            elif name == "start_avatar_session":
                out.setdefault("start_done", at)
    if last_signal is not None and bench.start == "on_first_join":
        out["signal"] = last_signal
    return out


async def engine_milestones(bench: Bench) -> dict[str, float]:
    """Mean of each milestone over the engine samples taken since the last call (histories fetched after the phase,
    ten at a time, so the fetching is not measured)."""
    traced, bench.traced = bench.traced, []
    rows: list[dict[str, float]] = []
    for i in range(0, len(traced), 10):
        rows += await asyncio.gather(*(milestones(bench, sid, sent, ms) for sid, sent, ms in traced[i:i + 10]))
    return {key: statistics.mean(r[key] for r in rows if key in r) for key, _ in MILESTONES
            if any(key in r for r in rows)}


async def run_level(bench: Bench, concurrency: int, n: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    for samples in bench.samples.values():
        samples.clear()
    base = await closed_loop([f"{DIRECT_PREFIX}{tag}-{i}" for i in range(n)], concurrency, bench.baseline)
    bench.traced = []
    engine = await closed_loop([f"bench-av-{tag}-{i}" for i in range(n)], concurrency, bench.engine)
    level: dict[str, Any] = {"concurrency": concurrency, "n": n, "wall_s": {"baseline": base.wall_s, "engine": engine.wall_s}}
    level["samples_ms"] = {k: list(v) for k, v in bench.samples.items()}
    level["engine_milestones_mean_ms"] = await engine_milestones(bench)
    for key, _ in ROWS:
        if bench.samples[key]:
            level[key] = summary(bench.samples[key], 0.0)
    if "engine_track" in level and "base_track" in level:
        level["ratios"] = {
            "track engine/emulator alone": ratios(level["engine_track"], level["base_track"]),
            "frame engine/emulator alone": ratios(level["engine_frame"], level["base_frame"]),
        }
        level["engine_added_ms"] = {q: level["engine_track"][q] - level["base_track"][q] for q in ("p50", "p90", "p99")}
    return level


def print_level(level: dict[str, Any]) -> None:
    rows = [(label, level[key]) for key, label in ROWS if key in level]
    print_table(f"concurrency {level['concurrency']}, n={level['n']}", rows)
    for name, r in level.get("ratios", {}).items():
        print(f"  {name:<38} p50 {r['p50']:5.2f}x   p90 {r['p90']:5.2f}x   p99 {r['p99']:5.2f}x")
    if "engine_added_ms" in level:
        a = level["engine_added_ms"]
        print(f"  {'engine adds (track, ms)':<38} p50 {a['p50']:+7.1f}  p90 {a['p90']:+7.1f}  p99 {a['p99']:+7.1f}")
    m = level.get("engine_milestones_mean_ms", {})
    if m:
        print("  where the engine's time goes: mean ms after the join was sent (+ since the previous milestone)")
        prev = 0.0
        for key, label in MILESTONES:
            if key in m:
                print(f"    {label:<44} {m[key]:8.1f}  {m[key] - prev:+8.1f}")
                prev = m[key]


def draw(results: list[dict[str, Any]]) -> Path:
    """The CDF of join -> avatar video, engine against the emulator alone (dashed), per level."""
    series: dict[str, list[float]] = {}
    styles: dict[str, dict[str, Any]] = {}
    for n, lv in enumerate(results):
        c = lv["concurrency"]
        engine, alone = f"engine, c={c}: join -> avatar video", f"emulator alone, c={c}: -> avatar video"
        series[engine], series[alone] = lv["samples_ms"]["engine_track"], lv["samples_ms"]["base_track"]
        styles[engine], styles[alone] = {"color": f"C{n}"}, {"color": f"C{n}", "linestyle": "--"}
    return cdf_plot("bench-avatar-in-room", "Avatar in room: until the candidate has the avatar's video track",
                    series, styles=styles)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default=DEFAULT_LEVELS,
                        help=f"concurrency:sessions, comma-separated (default {DEFAULT_LEVELS})")
    parser.add_argument("--warmup", type=int, default=2, help="sequential warm-up sessions of each kind (default 2)")
    parser.add_argument("--start", choices=("on_first_join", "immediately"), default="on_first_join",
                        help="when the session starts its avatar (default on_first_join: the candidate's join)")
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"where to write the figures (default {DEFAULT_JSON})")
    parser.add_argument("--no-plot", action="store_true", help="do not write docs/img/bench-avatar-in-room.png")
    parser.add_argument("--replot", metavar="JSON", help="only draw the plot again from a run's JSON, then exit")
    args = parser.parse_args()
    if args.replot:
        print(draw(read_json(args.replot)["levels"]))
        return
    quiet_sdk_logs()
    levels = parse_levels(args.levels)
    # No room monitor: nothing serves a media task queue in this run (the webhooks tell the session of the join).
    settings = Settings().model_copy(update={"media_task_queue": ""})
    client = await connect(settings)
    task_queue = f"bench-avatar-{uuid.uuid4().hex[:6]}"
    bench = Bench(client, settings, task_queue, args.start)
    start = started_on()
    print(f"temporal {settings.temporal_address}, livekit {settings.livekit_http_url}, emulator "
          f"{settings.liveavatar_api_url}; {os.cpu_count()} cores, load average {start['load_avg_at_start'][0]:.2f}; "
          f"avatar starts {args.start}")
    results: list[dict[str, Any]] = []
    async with build_worker(client, settings, task_queue=task_queue):
        try:
            if args.warmup:
                await run_level(bench, 1, args.warmup)
                bench.failures.clear()
            for concurrency, n in levels:
                level = await run_level(bench, concurrency, n)
                results.append(level)
                print_level(level)
        finally:
            await bench.cleanup()
    if bench.failures:
        print(f"\n{len(bench.failures)} samples failed (not in the figures):")
        for f in bench.failures[:10]:
            print(f"  {f}")
    plot = draw(results) if results and not args.no_plot else None
    if plot:
        print(f"\nplot: {plot}")
    # What is left of every room the run used: none, once every session has ended.
    left = await leftovers(settings, bench.rooms)
    print_leftovers(left, f"{len(bench.rooms)} rooms used")
    out = {
        "benchmark": "bench.avatar_in_room",
        **start,
        "args": {"levels": args.levels, "warmup": args.warmup, "start": args.start},
        "machine": machine(),
        "stack": {"temporal": settings.temporal_address, "livekit": settings.livekit_http_url,
                  "emulator": settings.liveavatar_api_url},
        "unit": "ms",
        "levels": results,
        "failures": bench.failures,
        "left": left,
        "plot": str(plot) if plot else None,
    }
    write_json(Path(args.json), out)
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # the Temporal runtime can crash at interpreter exit in short scripts (sdk-python#300)
