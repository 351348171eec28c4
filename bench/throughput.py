"""Throughput: whole sessions started, run and cleaned per second, closed loop at several concurrencies, with and
without an avatar, against the same LiveKit work done directly (no Temporal) in the same run.

    python -m sandbox exec -- python -m bench.throughput           (`make bench` runs it with the others)
    python -m sandbox exec -- python -m bench.throughput --levels 10:40,50:100 --avatar-levels 10:20

One session, as a closed-loop caller runs it (each step timed):

1. **join**: `SessionClient.join` of a new session until the grant (starts the workflow, creates the room);
2. **connect**: the candidate, a real LiveKit rtc participant (publishing nothing), connects with the grant;
3. **live**: the session's `state` query says LIVE (it learnt of the join from the LiveKit webhook), and, for a
   session with an avatar, that its avatar is in the room (polled every `--poll-ms`);
4. **end**: `SessionClient.end` until it answers, i.e. until the session released its room and stopped its avatar;
   the participant, removed with the room, then leaves.

**direct** (the baseline): the same LiveKit work without Temporal: `create_room` and the candidate's token, the
participant connects, `delete_room`.

`sessions/s` is sessions completed over the level's wall time. After each level the run counts what is left of
its rooms on LiveKit and its avatars on the emulator (leaks: must be 0). No room monitor runs. Every session is
ended and every direct room deleted, also when the run fails. Prints figures, writes JSON and a plot of
sessions/s against concurrency (docs/img/bench-throughput.png); asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from livekit import api

from bench.common import (
    closed_loop,
    delete_rooms,
    direct_room,
    end_sessions,
    figure,
    leftovers,
    livekit_api,
    machine,
    parse_levels,
    print_leftovers,
    print_table,
    quiet_sdk_logs,
    read_json,
    save_plot,
    started_on,
    summary,
    write_json,
)
from config.settings import DEFAULT_AVATAR_ID, Settings
from sandbox.media import join_room
from starters.client import SessionClient
from workers.temporal import connect
from workers.worker import build_worker
from workflows.models import SessionSpec, SessionStatus

DEFAULT_LEVELS = "10:40,50:100"
DEFAULT_AVATAR_LEVELS = "10:30"
DEFAULT_JSON = ".sessionflow/bench-throughput.json"
DIRECT_PREFIX = "bench-tpdirect-"
STEPS = ("join", "connect", "live", "end", "total")
DIRECT_STEPS = ("create+mint", "connect", "delete", "total")
# One session's wait to go live: far above any figure; past it the sample counts as a failure.
LIVE_TIMEOUT_S = 90.0


def spec(session_id: str, avatar: bool) -> SessionSpec:
    fields: dict[str, Any] = {
        "session_id": session_id, "kind": "interview" if avatar else "coaching",
        "participants": [{"identity": "cand", "role": "candidate"}, {"identity": "coach", "role": "coach"}],
        "max_duration": "PT10M",
    }
    if avatar:
        fields["avatar"] = {"avatar_id": DEFAULT_AVATAR_ID}
    return SessionSpec.model_validate(fields)


class Bench:
    def __init__(self, client: Any, settings: Settings, task_queue: str, poll_s: float) -> None:
        self.settings = settings
        self.sessions = SessionClient(client, settings, task_queue=task_queue)
        self.poll_s = poll_s
        self.steps: dict[str, list[float]] = {}
        self.failures: list[str] = []
        self.rooms: set[str] = set()
        self.open_sessions: set[str] = set()
        self.direct_rooms: set[str] = set()

    def lk(self) -> api.LiveKitAPI:
        lk: api.LiveKitAPI = livekit_api(self.settings)
        return lk

    def _record(self, **ms: float) -> None:
        for step, value in ms.items():
            self.steps.setdefault(step, []).append(value)

    async def _live(self, session_id: str, avatar: bool) -> None:
        while True:
            state = await self.sessions.state(session_id)
            if state.status is SessionStatus.LIVE and (state.avatar_present or not avatar):
                return
            await asyncio.sleep(self.poll_s)  # the polling period of the measurement, not a wait for a condition

    async def session(self, session_id: str, avatar: bool) -> None:
        s = spec(session_id, avatar)
        self.open_sessions.add(session_id)
        t0 = time.monotonic()
        try:
            grant = await self.sessions.join(s, "cand")
            self.rooms.add(grant.room)
            t_join = time.monotonic()
            async with join_room(grant.url, grant.token, publish_media=False):
                t_connect = time.monotonic()
                async with asyncio.timeout(LIVE_TIMEOUT_S):
                    await self._live(session_id, avatar)
                t_live = time.monotonic()
                await self.sessions.end(session_id, "bench over")
                self.open_sessions.discard(session_id)
                t_end = time.monotonic()
        except Exception as e:  # counted and shown; the run goes on
            self.failures.append(f"{session_id}: {e!r}")
            return
        self._record(join=(t_join - t0) * 1000, connect=(t_connect - t_join) * 1000, live=(t_live - t_connect) * 1000,
                     end=(t_end - t_live) * 1000, total=(t_end - t0) * 1000)

    async def direct(self, room: str) -> None:
        s = self.settings
        self.rooms.add(room)
        self.direct_rooms.add(room)
        t0 = time.monotonic()
        try:
            token = await direct_room(s, room, "throughput")
            t_created = time.monotonic()
            async with join_room(s.livekit_url, token, publish_media=False):
                t_connect = time.monotonic()
                async with self.lk() as lk:
                    await lk.room.delete_room(api.DeleteRoomRequest(room=room))
                self.direct_rooms.discard(room)
                t_end = time.monotonic()
        except Exception as e:
            self.failures.append(f"direct {room}: {e!r}")
            return
        self._record(**{"create+mint": (t_created - t0) * 1000, "connect": (t_connect - t_created) * 1000,
                        "delete": (t_end - t_connect) * 1000, "total": (t_end - t0) * 1000})

    async def cleanup(self) -> None:
        await end_sessions(self.sessions, sorted(self.open_sessions), self.failures)
        self.open_sessions.clear()
        await delete_rooms(self.settings, self.direct_rooms)


async def run_level(bench: Bench, kind: str, concurrency: int, n: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    bench.steps = {}
    failed_before = len(bench.failures)
    rooms_before = set(bench.rooms)
    if kind == "direct":
        phase = await closed_loop([f"{DIRECT_PREFIX}{tag}-{i}" for i in range(n)], concurrency, bench.direct)
        steps: tuple[str, ...] = DIRECT_STEPS
    else:
        avatar = kind == "avatar"

        async def one(session_id: str) -> None:
            await bench.session(session_id, avatar)

        phase = await closed_loop([f"bench-tp-{tag}-{i}" for i in range(n)], concurrency, one)
        steps = STEPS
    completed = len(bench.steps.get("total", []))
    left = await leftovers(bench.settings, bench.rooms - rooms_before)
    return {
        "kind": kind, "concurrency": concurrency, "n": n, "completed": completed,
        "failed": len(bench.failures) - failed_before, "wall_s": phase.wall_s,
        "sessions_per_s": completed / phase.wall_s if phase.wall_s else 0.0,
        "steps": {step: summary(bench.steps[step], phase.wall_s) for step in steps if bench.steps.get(step)},
        "leaks": {"rooms": len(left["rooms"]), "avatars": len(left["avatars"]), "left": left},
    }


LABELS = {"none": "sessions, no avatar", "avatar": "sessions with an avatar", "direct": "direct LiveKit, no Temporal"}


def print_level(level: dict[str, Any]) -> None:
    rows = [(step, s) for step, s in level["steps"].items()]
    print_table(f"{LABELS[level['kind']]}: concurrency {level['concurrency']}, n={level['n']}: "
                f"{level['sessions_per_s']:.2f} sessions/s, {level['failed']} failed, leaks: "
                f"{level['leaks']['rooms']} rooms, {level['leaks']['avatars']} avatars", rows)


def print_summary(results: list[dict[str, Any]]) -> None:
    print("\nsessions/s (completed over wall time) and ratio to direct LiveKit at the same concurrency")
    print(f"  {'kind':<32} {'concurrency':>11} {'sessions/s':>11} {'total p50 ms':>13} {'total p99 ms':>13} "
          f"{'vs direct':>10} {'leaks':>6}")
    direct = {lv["concurrency"]: lv for lv in results if lv["kind"] == "direct"}
    for lv in results:
        base = direct.get(lv["concurrency"])
        ratio = f"{lv['sessions_per_s'] / base['sessions_per_s']:.2f}x" if base and base["sessions_per_s"] else "-"
        total = lv["steps"].get("total", {"p50": float("nan"), "p99": float("nan")})
        print(f"  {LABELS[lv['kind']]:<32} {lv['concurrency']:>11} {lv['sessions_per_s']:>11.2f} {total['p50']:>13.1f} "
              f"{total['p99']:>13.1f} {ratio:>10} {lv['leaks']['rooms'] + lv['leaks']['avatars']:>6}")


def plot(results: list[dict[str, Any]]) -> Path:
    fig, ax = figure("Throughput: whole sessions per second (closed loop)", "concurrent sessions",
                     "sessions completed per second")
    for kind in ("direct", "none", "avatar"):
        rows = sorted((lv["concurrency"], lv["sessions_per_s"]) for lv in results if lv["kind"] == kind)
        if rows:
            ax.plot([c for c, _ in rows], [v for _, v in rows], marker="o", label=LABELS[kind])
    from matplotlib.ticker import FormatStrFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xticks(sorted({lv["concurrency"] for lv in results}))
    ax.legend(fontsize=8)
    return save_plot(fig, "bench-throughput")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default=DEFAULT_LEVELS,
                        help=f"concurrency:sessions for sessions without an avatar and direct (default {DEFAULT_LEVELS})")
    parser.add_argument("--avatar-levels", default=DEFAULT_AVATAR_LEVELS,
                        help=f"concurrency:sessions with an avatar; '' for none (default {DEFAULT_AVATAR_LEVELS}; "
                             "the emulator allows 20 active avatar sessions)")
    parser.add_argument("--warmup", type=int, default=2, help="sequential warm-up sessions of each kind (default 2)")
    parser.add_argument("--poll-ms", type=float, default=100.0, help="how often `state` is asked whether the session is live")
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"where to write the figures (default {DEFAULT_JSON})")
    parser.add_argument("--no-plot", action="store_true", help="do not write docs/img/bench-throughput.png")
    parser.add_argument("--replot", metavar="JSON", help="only draw the plot again from a run's JSON, then exit")
    args = parser.parse_args()
    if args.replot:
        print(plot(read_json(args.replot)["levels"]))
        return
    quiet_sdk_logs()
    plan = [("direct", c, n) for c, n in parse_levels(args.levels)]
    plan += [("none", c, n) for c, n in parse_levels(args.levels)]
    plan += [("avatar", c, n) for c, n in parse_levels(args.avatar_levels)] if args.avatar_levels else []
    plan.sort(key=lambda p: (p[1], ("direct", "none", "avatar").index(p[0])))
    settings = Settings().model_copy(update={"media_task_queue": ""})  # no room monitor in this run
    client = await connect(settings)
    task_queue = f"bench-tp-{uuid.uuid4().hex[:6]}"
    bench = Bench(client, settings, task_queue, args.poll_ms / 1000)
    start = started_on()
    print(f"temporal {settings.temporal_address}, livekit {settings.livekit_http_url}, emulator "
          f"{settings.liveavatar_api_url}; {os.cpu_count()} cores, load average {start['load_avg_at_start'][0]:.2f}")
    results: list[dict[str, Any]] = []
    async with build_worker(client, settings, task_queue=task_queue):
        try:
            if args.warmup:
                for kind in {p[0] for p in plan}:
                    await run_level(bench, kind, 1, args.warmup)
                bench.failures.clear()
            for kind, concurrency, n in plan:
                level = await run_level(bench, kind, concurrency, n)
                results.append(level)
                print_level(level)
        finally:
            await bench.cleanup()
    if bench.failures:
        print(f"\n{len(bench.failures)} sessions failed (not in the figures):")
        for f in bench.failures[:10]:
            print(f"  {f}")
    print_summary(results)
    image = plot(results) if results and not args.no_plot else None
    if image:
        print(f"\nplot: {image}")
    left = await leftovers(settings, bench.rooms)
    print_leftovers(left, f"{len(bench.rooms)} rooms used")
    write_json(Path(args.json), {
        "benchmark": "bench.throughput",
        **start,
        "args": {"levels": args.levels, "avatar_levels": args.avatar_levels, "warmup": args.warmup,
                 "poll_ms": args.poll_ms},
        "machine": machine(),
        "stack": {"temporal": settings.temporal_address, "livekit": settings.livekit_http_url,
                  "emulator": settings.liveavatar_api_url},
        "unit": "ms",
        "levels": results,
        "failures": bench.failures,
        "left": left,
        "plot": str(image) if image else None,
    })
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # the Temporal runtime can crash at interpreter exit in short scripts (sdk-python#300)
