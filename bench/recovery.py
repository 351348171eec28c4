"""Recovery: how long a session takes to work again after a fault, repeated, with the parts that make it up.

    python -m sandbox exec -- python -m bench.recovery             (`make bench` runs it with the others)
    python -m sandbox exec -- python -m bench.recovery --reps 5 --json /tmp/recovery.json

The sessions run on `python -m workers` processes (the chaos suite's `WorkerPool`) on a task queue of the run's
own, which the run kills; the run is their client. Measured, `--reps` times each, one session per repetition:

- **worker kill, replacement**: one worker only. `kill -9` of it, a new worker process is started at once; from
  the kill until a `state` query and an `extend` update (both sent right after the kill) are answered, and until
  the new worker logs "worker started". The `extend`'s history gives the parts: when its workflow task was
  scheduled, timed out on the dead worker's sticky queue, and started on the new worker.
- **worker kill, survivor**: two workers. `kill -9` of the one that ran the session's last workflow task (its
  sticky cache holds the session) while the other keeps polling; the same measures (a replacement is started
  too, as a deployment would, but nothing waits for it).
- **avatar crash**: an avatar interview with the candidate, a real rtc participant, watching; the emulator's
  fault `POST /_control/sessions/{id}/crash` makes the avatar leave the room while its LiveAvatar session stays
  active. From the crash until: the session's `state` says the avatar is gone, a new avatar session is recorded
  (created after `replace_backoff`, 2 s by default), and the candidate has the new avatar's video track subscribed
  and its first frame. Against the emulator's own create + start (and the candidate's wait for its video),
  measured directly on the emulator in the same run (`bench.avatar_in_room`'s baseline).
- **terminate**: `terminate` of a live session (no workflow code runs after it), with an avatar started at once
  and without one; from the terminate until its room is gone from LiveKit and its avatar session is no longer
  active on the emulator (polled every 100 ms). The keep-alive's net releases an avatar session's room and avatar
  on its next heartbeat; a session without an avatar has only the reaper, which this run's workers schedule every
  5 s with a 5 s grace (`SESSIONFLOW_REAPER_EVERY`/`_GRACE`; the defaults are 30 s and 60 s). The run puts the
  reaper's Schedule back to the stack's own settings when it ends.

Targets (issue 11): worker kill to recovery under 5 s; avatar crash to replacement under 3 s plus the emulator's
start time. Every session is ended (or terminated and released), every worker stopped, also when the run fails;
the run ends by printing what is left on LiveKit and the emulator. Prints figures, writes JSON and a CDF plot
(docs/img/bench-recovery.png); asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import httpx
from livekit import api
from temporalio.api.enums.v1 import EventType

from bench.avatar_in_room import Bench as AvatarBaseline
from bench.common import (
    RESULTS,
    cdf_plot,
    end_sessions,
    leftovers,
    livekit_api,
    machine,
    print_leftovers,
    print_table,
    quiet_sdk_logs,
    read_json,
    started_on,
    summary,
    watching_participant,
    write_json,
)
from config.settings import DEFAULT_AVATAR_ID, Settings
from starters.client import SessionClient
from tests.support.chaos import WorkerPool
from workers.schedules import ensure_reaper_schedule
from workers.temporal import connect
from workflows.models import SessionSpec, SessionStatus, avatar_identity_prefix

DEFAULT_JSON = ".sessionflow/bench-recovery.json"
REAPER_ENV = {"SESSIONFLOW_REAPER_EVERY": "5", "SESSIONFLOW_REAPER_GRACE": "5"}
POLL_S = 0.05
RELEASE_POLL_S = 0.1
STEP_TIMEOUT_S = 90.0  # one measured wait; past it the repetition counts as failed

KILL_ROWS = (
    ("worker_ready", "kill -> new worker process ready"),
    ("task_scheduled", "kill -> extend's workflow task scheduled"),
    ("sticky_timeout", "kill -> task timed out on the sticky queue"),
    ("task_started", "kill -> task started on a live worker"),
    ("state", "kill -> state query answered"),
    ("extend", "kill -> extend update answered"),
)
CRASH_ROWS = (
    ("noticed", "crash -> state: avatar gone"),
    ("recorded", "crash -> state: new avatar session"),
    ("track", "crash -> new avatar video subscribed"),
    ("frame", "crash -> new avatar first frame"),
    ("base_start", "emulator alone: create + start"),
    ("base_track", "emulator alone: -> avatar video subscribed"),
)
TERMINATE_ROWS = (
    ("avatar_stopped", "terminate -> avatar stopped"),
    ("room_deleted", "terminate -> room deleted"),
    ("released", "terminate -> everything released"),
)


def spec(kind: str, *, avatar: str | None) -> SessionSpec:
    fields: dict[str, Any] = {
        "session_id": f"bench-rec-{kind}-{uuid.uuid4().hex[:8]}", "kind": "interview" if avatar else "coaching",
        "participants": [{"identity": "cand", "role": "candidate"}, {"identity": "coach", "role": "coach"}],
        "max_duration": "PT10M",
    }
    if avatar:
        fields["avatar"] = {"avatar_id": DEFAULT_AVATAR_ID, "start": avatar}
    return SessionSpec.model_validate(fields)


class Bench:
    def __init__(self, client: Any, settings: Settings, task_queue: str, pool: WorkerPool) -> None:
        self.client = client
        self.settings = settings
        self.sessions = SessionClient(client, settings, task_queue=task_queue)
        self.pool = pool
        self.http = httpx.AsyncClient(base_url=settings.liveavatar_api_url, timeout=10, trust_env=False)
        self.rooms: set[str] = set()
        self.open_sessions: set[str] = set()
        self.failures: list[str] = []
        self.release_mechanisms: dict[str, list[str]] = {}  # "avatar: room" -> who released it, per repetition

    def lk(self) -> api.LiveKitAPI:
        lk: api.LiveKitAPI = livekit_api(self.settings)
        return lk

    def room_of(self, s: SessionSpec) -> str:
        room: str = s.model_copy(update={"deployment": self.settings.deployment}).room_name
        self.rooms.add(room)
        return room

    async def state_when(self, session_id: str, ok: Any) -> Any:
        while True:
            state = await self.sessions.state(session_id)
            if ok(state):
                return state
            await asyncio.sleep(POLL_S)  # the polling period of the measurement

    async def end(self, session_id: str) -> None:
        await self.sessions.end(session_id, "bench over")
        self.open_sessions.discard(session_id)

    # ---- (a) worker kill

    async def last_task_worker(self, session_id: str) -> str:
        history = await self.sessions.handle(session_id).fetch_history()
        identity = ""
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                identity = event.workflow_task_started_event_attributes.identity
        return identity

    async def worker_kill(self, workers: int) -> dict[str, float]:
        await self.pool.ensure(workers)
        s = spec("kill", avatar=None)
        self.open_sessions.add(s.session_id)
        self.room_of(s)
        await self.sessions.start(s)
        await self.state_when(s.session_id, lambda st: st.status is not SessionStatus.PROVISIONING)
        victim = self.pool.by_identity(await self.last_task_worker(s.session_id))
        killed_wall, t_kill = time.time(), time.monotonic()
        await self.pool.kill9(victim)
        out: dict[str, float] = {}

        async def replacement() -> None:
            await self.pool.ensure(workers)
            out["worker_ready"] = (time.monotonic() - t_kill) * 1000

        async def timed(key: str, call: Any) -> None:
            await call
            out[key] = (time.monotonic() - t_kill) * 1000

        async with asyncio.timeout(STEP_TIMEOUT_S):
            await asyncio.gather(
                replacement(), timed("state", self.sessions.state(s.session_id)),
                timed("extend", self.sessions.extend(s.session_id, timedelta(minutes=1))),
            )
        out.update(await self.extend_parts(s.session_id, killed_wall))
        await self.end(s.session_id)
        return out

    async def extend_parts(self, session_id: str, killed_wall: float) -> dict[str, float]:
        """From the history: the first workflow task after the kill (the extend's), when it was scheduled, when it
        timed out on the dead worker's sticky queue (if it did), when a live worker started it; ms after the kill."""
        history = await self.sessions.handle(session_id).fetch_history()
        out: dict[str, float] = {}
        for event in history.events:
            at = (event.event_time.ToDatetime(tzinfo=UTC).timestamp() - killed_wall) * 1000
            if at < 0:
                continue
            kind = event.event_type
            if kind == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED and "task_scheduled" not in out:
                out["task_scheduled"] = at
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT and "sticky_timeout" not in out:
                out["sticky_timeout"] = at
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED and "task_started" not in out:
                out["task_started"] = at
                break
        return out

    # ---- (b) avatar crash

    async def emulator(self, path: str) -> Any:
        response = await self.http.post(f"/_control/{path}", json={})
        response.raise_for_status()
        return response.json()["data"]

    async def avatar_crash(self) -> dict[str, float]:
        await self.pool.ensure(2)
        s = spec("crash", avatar="on_first_join")
        self.open_sessions.add(s.session_id)
        self.room_of(s)
        prefix = avatar_identity_prefix(s.session_id)
        grant = await self.sessions.join(s, "cand")
        out: dict[str, float] = {}
        async with watching_participant(grant.url, grant.token) as watch:
            async with asyncio.timeout(STEP_TIMEOUT_S):
                await watch.video_from(prefix)
                before = await self.state_when(s.session_id, lambda st: st.avatar_present and st.avatar_session_id)
            t_crash = time.monotonic()
            await self.emulator(f"sessions/{before.avatar_session_id}/crash")

            async def state_parts() -> None:
                await self.state_when(s.session_id, lambda st: not st.avatar_present)
                out["noticed"] = (time.monotonic() - t_crash) * 1000
                await self.state_when(s.session_id, lambda st: st.avatar_session_id not in (None, before.avatar_session_id))
                out["recorded"] = (time.monotonic() - t_crash) * 1000

            async def seen() -> None:
                _, t_track = await watch.video_from(prefix, not_before=t_crash)
                out["track"] = (t_track - t_crash) * 1000
                _, t_frame = await watch.video_from(prefix, frame=True, not_before=t_crash)
                out["frame"] = (t_frame - t_crash) * 1000

            async with asyncio.timeout(STEP_TIMEOUT_S):
                await asyncio.gather(state_parts(), seen())
            await self.end(s.session_id)
        return out

    # ---- (c) terminate

    async def terminate(self, avatar: bool) -> dict[str, float]:
        await self.pool.ensure(2)
        s = spec("term", avatar="immediately" if avatar else None)
        self.open_sessions.add(s.session_id)
        room = self.room_of(s)
        await self.sessions.start(s)
        async with asyncio.timeout(STEP_TIMEOUT_S):
            if avatar:
                await self.state_when(s.session_id, lambda st: st.avatar_present)
            else:
                await self.state_when(s.session_id, lambda st: st.status is not SessionStatus.PROVISIONING)
        avatar_session_id = (await self.sessions.state(s.session_id)).avatar_session_id if avatar else None
        t0 = time.monotonic()
        await self.sessions.handle(s.session_id).terminate(reason="bench: terminate")
        self.open_sessions.discard(s.session_id)
        out: dict[str, float] = {}
        async with asyncio.timeout(STEP_TIMEOUT_S), self.lk() as lk:
            while "released" not in out:
                rooms = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
                response = await self.http.get("/_control/sessions")
                active = [a for a in response.json()["data"]["sessions"]
                          if a["livekit_room"] == room and a["state"] == "active"]
                now = (time.monotonic() - t0) * 1000
                if not rooms.rooms:
                    out.setdefault("room_deleted", now)
                if avatar and not active:
                    out.setdefault("avatar_stopped", now)
                if "room_deleted" in out and ("avatar_stopped" in out or not avatar):
                    out["released"] = now
                await asyncio.sleep(RELEASE_POLL_S)  # the polling period of the measurement
        for what, by in self.released_by(room, avatar_session_id).items():
            self.release_mechanisms.setdefault(f"{'avatar' if avatar else 'plain'}: {what}", []).append(by)
        return out

    def released_by(self, room: str, avatar_session_id: str | None) -> dict[str, str]:
        """Which safety net released the room and the avatar, from the workers' JSON logs: the keep-alive's net
        ("keep-alive net: released ...") or the reaper ("orphan released")."""
        found: dict[str, str] = {}
        for path in sorted(self.pool.log_dir.glob("worker-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                event = str(record.get("event", ""))
                if event == "orphan released" and record.get("resource") in (room, avatar_session_id):
                    found["room" if record["resource"] == room else "avatar"] = "reaper"
                elif event.startswith("keep-alive net: released") and record.get("room") == room:
                    found["room" if "room" in str(record.get("step")) else "avatar"] = "keep-alive net"
        return {"room": found.get("room", "?"), **({"avatar": found.get("avatar", "?")} if avatar_session_id else {})}

    # ---- always

    async def cleanup(self) -> None:
        """End what is still open; terminate what will not end; the reaper and the keep-alive net do the rest,
        and the leftovers check at the end says whether they did."""
        await end_sessions(self.sessions, sorted(self.open_sessions), self.failures)
        self.open_sessions.clear()
        await self.http.aclose()


async def repeat(what: str, reps: int, bench: Bench, run: Any) -> dict[str, list[float]]:
    """`run()` `reps` times; each part's samples. A failed repetition is counted and shown, the run goes on."""
    samples: dict[str, list[float]] = {}
    for i in range(reps):
        try:
            parts = await run()
        except Exception as e:
            bench.failures.append(f"{what} #{i + 1}: {e!r}")
            print(f"  {what} #{i + 1} failed: {e!r}", flush=True)
            continue
        print(f"  {what} #{i + 1}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in parts.items()), flush=True)
        for key, value in parts.items():
            samples.setdefault(key, []).append(value)
    return samples


def table(title: str, rows: tuple[tuple[str, str], ...], samples: dict[str, list[float]]) -> dict[str, Any]:
    figures = {key: summary(samples[key], 0.0) for key, _ in rows if samples.get(key)}
    print_table(title, [(label, figures[key]) for key, label in rows if key in figures])
    return figures


async def wait_released(bench: Bench, timeout: float) -> dict[str, list[str]]:
    """What is left of the run's rooms, after giving the reaper and the keep-alive net up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = await leftovers(bench.settings, bench.rooms)
        if not (left["rooms"] or left["avatars"]) or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.5)  # the polling period of the final check


def draw(samples: dict[str, dict[str, list[float]]], results: dict[str, Any]) -> Path:
    """The CDF of each recovery, with the issue's targets marked."""
    series: dict[str, list[float]] = {}
    for key, label in (("kill_replacement", "worker kill (replacement): extend answered"),
                       ("kill_survivor", "worker kill (survivor): extend answered")):
        series[label] = samples.get(key, {}).get("extend", [])
    series["avatar crash: new avatar video"] = samples.get("crash", {}).get("track", [])
    series["emulator alone: avatar video"] = samples.get("crash", {}).get("base_track", [])
    series["terminate (avatar): released"] = samples.get("terminate_avatar", {}).get("released", [])
    series["terminate (no avatar): released"] = samples.get("terminate_plain", {}).get("released", [])
    marks = {"target: worker kill 5 s": 5000.0}
    if "crash_target" in results:
        marks["target: crash 3 s + emulator start (p50)"] = results["crash_target"][
            "target_ms (3 s + emulator start)"]["p50"]
    return cdf_plot("bench-recovery", "Recovery: from the fault until working again / released", series,
                    log_x=True, marks=marks)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each fault (default 5)")
    parser.add_argument("--only", default="kill,crash,terminate", help="which faults (default kill,crash,terminate)")
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"where to write the figures (default {DEFAULT_JSON})")
    parser.add_argument("--no-plot", action="store_true", help="do not write docs/img/bench-recovery.png")
    parser.add_argument("--replot", metavar="JSON", help="only draw the plot again from a run's JSON, then exit")
    args = parser.parse_args()
    if args.replot:
        out = read_json(args.replot)
        print(draw(out["samples_ms"], out["results"]))
        return
    faults = set(args.only.split(","))
    quiet_sdk_logs()
    # No room monitor (nothing serves a media task queue): the sessions learn of joins and leaves from webhooks.
    settings = Settings().model_copy(update={"media_task_queue": ""})
    client = await connect(settings)
    task_queue = f"bench-rec-{uuid.uuid4().hex[:6]}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-recovery-", dir=RESULTS))
    pool = WorkerPool({**os.environ, **REAPER_ENV}, log_dir)
    pool.env["SESSIONFLOW_TASK_QUEUE"] = task_queue
    bench = Bench(client, settings, task_queue, pool)
    baseline = AvatarBaseline(client, settings, task_queue, "on_first_join")
    start = started_on()
    print(f"temporal {settings.temporal_address}, livekit {settings.livekit_http_url}, emulator "
          f"{settings.liveavatar_api_url}; {os.cpu_count()} cores, load average {start['load_avg_at_start'][0]:.2f}; "
          f"worker logs in {log_dir}")
    results: dict[str, Any] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        if "kill" in faults:
            print("\nworker kill, one worker (a replacement is started at once):", flush=True)
            samples["kill_replacement"] = await repeat("kill", args.reps, bench, lambda: bench.worker_kill(1))
            print("\nworker kill, two workers (the survivor takes over):", flush=True)
            samples["kill_survivor"] = await repeat("kill", args.reps, bench, lambda: bench.worker_kill(2))
        if "crash" in faults:
            print("\nemulator alone: create + start an avatar, the candidate waits for its video:", flush=True)
            for i in range(args.reps):
                await baseline.baseline(f"bench-recdirect-{uuid.uuid4().hex[:6]}-{i}")
            bench.rooms |= baseline.rooms
            print("\navatar crash:", flush=True)
            crash = await repeat("crash", args.reps, bench, bench.avatar_crash)
            crash["base_start"], crash["base_track"] = baseline.samples["base_start"], baseline.samples["base_track"]
            bench.failures += baseline.failures
            samples["crash"] = crash
        if "terminate" in faults:
            print("\nterminate, a session with an avatar:", flush=True)
            samples["terminate_avatar"] = await repeat("terminate", args.reps, bench, lambda: bench.terminate(True))
            print("\nterminate, a session without an avatar (the reaper):", flush=True)
            samples["terminate_plain"] = await repeat("terminate", args.reps, bench, lambda: bench.terminate(False))
    finally:
        await bench.cleanup()
        await baseline.cleanup()
        left = await wait_released(bench, 30)
        await ensure_reaper_schedule(client, Settings())  # the stack's own reaper settings again
        pool.stop_all()
    if "kill_replacement" in samples:
        results["kill_replacement"] = table("worker kill, one worker: a replacement starts", KILL_ROWS,
                                            samples["kill_replacement"])
        results["kill_survivor"] = table("worker kill, two workers: the survivor takes over", KILL_ROWS,
                                         samples["kill_survivor"])
    if "crash" in samples:
        results["crash"] = figures = table("avatar crash (emulator fault) -> replacement in the room", CRASH_ROWS,
                                           samples["crash"])
        if "track" in figures and "base_start" in figures:
            budget = {q: 3000 + figures["base_start"][q] for q in ("p50", "p90", "p99")}
            results["crash_target"] = {"target_ms (3 s + emulator start)": budget,
                                       "measured_ms (crash -> video)": {q: figures["track"][q] for q in budget}}
            print(f"  target 3 s + emulator start: p50 {budget['p50']:.0f} ms, p99 {budget['p99']:.0f} ms; measured "
                  f"crash -> video p50 {figures['track']['p50']:.0f} ms, p99 {figures['track']['p99']:.0f} ms")
    if "terminate_avatar" in samples:
        results["terminate_avatar"] = table("terminate, with an avatar (the keep-alive net, the reaper)",
                                            TERMINATE_ROWS, samples["terminate_avatar"])
        results["terminate_plain"] = table("terminate, without an avatar (the reaper: every 5 s, 5 s grace)",
                                           TERMINATE_ROWS, samples["terminate_plain"])
    if bench.release_mechanisms:
        results["terminate_released_by"] = {k: {m: v.count(m) for m in sorted(set(v))}
                                            for k, v in bench.release_mechanisms.items()}
        print("  released by (from the workers' logs): " + "; ".join(
            f"{k}: " + ", ".join(f"{m} {n}x" for m, n in counts.items())
            for k, counts in results["terminate_released_by"].items()))
    if bench.failures:
        print(f"\n{len(bench.failures)} repetitions failed (not in the figures):")
        for f in bench.failures[:10]:
            print(f"  {f}")
    plot = draw(samples, results) if samples and not args.no_plot else None
    if plot:
        print(f"\nplot: {plot}")
    print_leftovers(left, f"{len(bench.rooms)} rooms used")
    write_json(Path(args.json), {
        "benchmark": "bench.recovery",
        **start,
        "args": {"reps": args.reps, "only": args.only},
        "machine": machine(),
        "stack": {"temporal": settings.temporal_address, "livekit": settings.livekit_http_url,
                  "emulator": settings.liveavatar_api_url},
        "reaper_env": REAPER_ENV,
        "unit": "ms",
        "results": results,
        "samples_ms": samples,
        "failures": bench.failures,
        "left": left,
        "plot": str(plot) if plot else None,
    })
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # the Temporal runtime can crash at interpreter exit in short scripts (sdk-python#300)
