"""Session-ready time: `SessionClient.join` (update-with-start) until the grant is back, at several concurrencies,
against two baselines measured in the same run at the same concurrency.

    python -m sandbox exec -- python -m bench.session_ready        (`make bench` runs it with the others)
    python -m sandbox exec -- python -m bench.session_ready --levels 1:30,10:40,50:100 --json /tmp/ready.json

For each level `c:n`, `c` callers run concurrently (closed loop: each starts its next call as soon as its previous
one returns) until `n` calls are done. Measured at each level, one after the other:

- **floor**: update-with-start of `FloorWorkflow`, whose update returns at once: Temporal's own floor for "start
  or join in one call".
- **direct**: what the session does on LiveKit, without Temporal: `create_room` on the real LiveKit server (a
  fresh `LiveKitAPI` per call, as the activity does) then `activities.livekit.mint_token`.
- **join (before)**: the same join served by a worker that leaves the `local-room-create` patch off (the SDK's
  `patch_activation_callback`), as every session before it: the room created by a normal activity, two workflow
  tasks per join.
- **join**: `SessionClient.join` of a new session until its grant is back (starts the workflow, creates the
  room, mints the token), as the code runs today: one workflow task.
- **end**: `SessionClient.end` of each of those sessions until its room is released (no avatar here).

Then the history of one join, one join (before) (the ones nearest the p50 at the first level) and one floor call
is printed event by event, relative to the moment the client sent the request, and the mean time per call spent
in each kind of gap, from the history of every call. Every session is ended and every direct room deleted, also
when the run fails. Prints figures, writes them as JSON and draws two plots (`docs/img/bench-session-ready-*.png`:
the latency distribution at each level, latency against concurrency); asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from livekit import api
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.worker import PatchActivationInput, Worker

from activities.livekit import mint_token
from bench.common import Call, Phase, closed_loop, figure, machine, parse_levels, pct, save_plot, summary, write_json
from config.settings import Settings
from starters.client import SessionClient, Unavailable
from workers.temporal import TemporalUnavailable, connect
from workers.worker import build_worker
from workflows.machine import PARTICIPANT_TOKEN_TTL
from workflows.models import MintTokenInput, Role, SessionSpec, workflow_id_for
from workflows.session import PATCH_LOCAL_ROOM_CREATE

DEFAULT_LEVELS = "1:30,10:40,50:100"
DEFAULT_JSON = ".sessionflow/bench-session-ready.json"
# Direct-baseline rooms carry this prefix (session rooms are `session-bench-...`), so leftovers are easy to find.
DIRECT_PREFIX = "bench-direct-"


@workflow.defn(sandboxed=False)
class FloorWorkflow:
    def __init__(self) -> None:
        self.done = False

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self.done)

    @workflow.update
    def join(self, who: str) -> str:
        self.done = True
        return who


# ---- figures --------------------------------------------------------------------------------------------------


# ---- the measured operations ----------------------------------------------------------------------------------


def session_spec(session_id: str) -> SessionSpec:
    return SessionSpec.model_validate(
        {"session_id": session_id, "kind": "coaching",
         "participants": [{"identity": "coachee", "role": "candidate"}, {"identity": "coach", "role": "coach"}]}
    )


def before_local_room_create(patch: PatchActivationInput) -> bool:
    """The "before" worker: sessions it starts never take the `local-room-create` patch (all others as usual)."""
    return patch.patch_id != PATCH_LOCAL_ROOM_CREATE


class Bench:
    def __init__(self, client: Client, settings: Settings, session_tq: str, floor_tq: str, before_tq: str) -> None:
        self.client = client
        self.settings = settings
        self.sessions = SessionClient(client, settings, task_queue=session_tq)
        self.sessions_before = SessionClient(client, settings, task_queue=before_tq)
        self.floor_tq = floor_tq
        self.started: list[str] = []  # session ids whose join was sent: each is ended
        self.ended: set[str] = set()
        self.direct_rooms: list[str] = []  # rooms the direct baseline asked for: each is deleted
        self.deleted: set[str] = set()
        self.failed: dict[str, str] = {}  # joins that got no grant: session id -> the error

    async def floor(self, wid: str) -> None:
        op = WithStartWorkflowOperation(
            FloorWorkflow.run, id=wid, task_queue=self.floor_tq,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        await self.client.execute_update_with_start_workflow(FloorWorkflow.join, "x", start_workflow_operation=op)

    async def direct(self, room: str) -> None:
        """The session's LiveKit work without Temporal: the room as `create_room` asks for it, then the token."""
        spec = session_spec(room.removeprefix(DIRECT_PREFIX))
        self.direct_rooms.append(room)
        s = self.settings
        async with api.LiveKitAPI(s.livekit_http_url, s.livekit_api_key, s.livekit_api_secret.get_secret_value()) as lk:
            await lk.room.create_room(
                api.CreateRoomRequest(
                    name=room,
                    empty_timeout=int(spec.no_show_timeout.total_seconds() + 60),
                    departure_timeout=int(spec.reconnect_grace.total_seconds() + 60),
                    max_participants=spec.room_capacity,
                    metadata=json.dumps({"workflow_id": workflow_id_for(spec.session_id, s.deployment), "kind": spec.kind.value}),
                )
            )
        mint_token(s, MintTokenInput(room=room, identity="coachee", role=Role.CANDIDATE, ttl=PARTICIPANT_TOKEN_TTL))

    async def delete_direct(self, room: str) -> None:
        s = self.settings
        async with api.LiveKitAPI(s.livekit_http_url, s.livekit_api_key, s.livekit_api_secret.get_secret_value()) as lk:
            await lk.room.delete_room(api.DeleteRoomRequest(room=room))
        self.deleted.add(room)

    async def join(self, session_id: str) -> None:
        self.started.append(session_id)
        await self._joined(session_id, self.sessions.join(session_spec(session_id), "coachee"))

    async def join_before(self, session_id: str) -> None:
        self.started.append(session_id)
        await self._joined(session_id, self.sessions_before.join(session_spec(session_id), "coachee"))

    async def _joined(self, session_id: str, call: Awaitable[object]) -> None:
        """A join that got no grant (an overloaded machine: "did not answer, safe to retry") is counted, not timed."""
        try:
            await call
        except (Unavailable, TemporalUnavailable) as e:
            self.failed[session_id] = str(e)

    async def end(self, session_id: str) -> None:
        await self.sessions.end(session_id, "bench")
        self.ended.add(session_id)

    async def cleanup(self) -> list[str]:
        """End every session and delete every direct room not yet released; return what is still on LiveKit."""
        left = [sid for sid in self.started if sid not in self.ended]
        rooms = [r for r in self.direct_rooms if r not in self.deleted]
        for batch in (left[i:i + 20] for i in range(0, len(left), 20)):
            await asyncio.gather(*(self.end(sid) for sid in batch), return_exceptions=True)
        for batch in (rooms[i:i + 20] for i in range(0, len(rooms), 20)):
            await asyncio.gather(*(self.delete_direct(r) for r in batch), return_exceptions=True)
        s = self.settings
        async with api.LiveKitAPI(s.livekit_http_url, s.livekit_api_key, s.livekit_api_secret.get_secret_value()) as lk:
            listed = await lk.room.list_rooms(api.ListRoomsRequest())
        ours = {workflow_id_for(sid, self.settings.deployment) for sid in self.started} | set(self.direct_rooms)
        return sorted(r.name for r in listed.rooms if r.name in ours)


# ---- the trace of one call ------------------------------------------------------------------------------------

TRACED = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED: "workflow started",
    EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED: "workflow task scheduled",
    EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED: "workflow task started",
    EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED: "workflow task completed",
    EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED: "activity scheduled",
    EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED: "activity started",
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "activity completed",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED: "update accepted",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED: "update completed",
    EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES: "search attributes upserted",
    # A local activity (the room create, the token) runs inside a workflow task; its marker is written when that
    # task completes, so its time is in "workflow task on the worker".
    EventType.EVENT_TYPE_MARKER_RECORDED: "marker recorded",
}


def _activity_name(event: HistoryEvent, names: dict[int, str]) -> str:
    if event.HasField("activity_task_scheduled_event_attributes"):
        name = event.activity_task_scheduled_event_attributes.activity_type.name
        names[event.event_id] = name
        return name
    if event.HasField("activity_task_started_event_attributes"):
        return names.get(event.activity_task_started_event_attributes.scheduled_event_id, "?")
    if event.HasField("activity_task_completed_event_attributes"):
        return names.get(event.activity_task_completed_event_attributes.scheduled_event_id, "?")
    if event.HasField("marker_recorded_event_attributes"):
        marker = event.marker_recorded_event_attributes.marker_name
        return "local activity" if marker == "core_local_activity" else marker  # else a patch's (core_patch)
    if event.HasField("workflow_execution_update_accepted_event_attributes"):
        return event.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
    return ""


async def trace(client: Client, workflow_id: str, call: Call) -> list[dict[str, Any]]:
    """The events of `workflow_id` up to its first completed update, in ms after `call.sent` (same machine clock),
    with the gap since the previous row; the last row is the answer reaching the client."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    rows: list[dict[str, Any]] = []
    names: dict[int, str] = {}
    for event in history.events:
        detail = _activity_name(event, names)
        label = TRACED.get(event.event_type)
        if label is None:
            continue
        at = event.event_time.ToDatetime(tzinfo=UTC).timestamp()
        rows.append({"event_id": event.event_id, "event": label, "detail": detail, "at_ms": (at - call.sent) * 1000})
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
            break
    rows.append({"event_id": None, "event": "answer at the client", "detail": "", "at_ms": call.ms})
    rows.sort(key=lambda r: r["at_ms"])  # an activity's started event is written late but carries its start time
    prev: dict[str, Any] | None = None
    for r in rows:
        r["gap_ms"] = r["at_ms"] - (prev["at_ms"] if prev else 0.0)
        r["spent_in"] = _bucket(prev["event"] if prev else None, r["event"])
        prev = r
    return rows


def _bucket(before: str | None, event: str) -> str:
    """What the time between two consecutive rows of a trace was spent on."""
    if before is None:
        return "client -> server: start recorded"
    if event == "answer at the client":
        return "server -> client: answer"
    if (before, event) == ("workflow task scheduled", "workflow task started"):
        return "workflow task schedule-to-start"
    if (before, event) == ("workflow task started", "workflow task completed"):
        return "workflow task on the worker"
    if (before, event) == ("activity scheduled", "activity started"):
        return "activity schedule-to-start"
    if (before, event) == ("activity started", "activity completed"):
        return "activity run and report"
    return "other server steps"


BUCKETS = (
    "client -> server: start recorded", "workflow task schedule-to-start", "workflow task on the worker",
    "activity schedule-to-start", "activity run and report", "other server steps", "server -> client: answer",
)


def breakdown(traces: list[list[dict[str, Any]]]) -> dict[str, float]:
    """Mean milliseconds per call spent in each bucket (means add up to the mean call), and workflow tasks per call."""
    totals = dict.fromkeys(BUCKETS, 0.0)
    tasks = 0
    for rows in traces:
        for r in rows:
            totals[r["spent_in"]] += r["gap_ms"]
            tasks += r["event"] == "workflow task completed"
    out = {k: v / len(traces) for k, v in totals.items()}
    out["total"] = sum(out[k] for k in BUCKETS)
    out["workflow tasks per call"] = tasks / len(traces)
    return out


def print_trace(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"  {'id':>3}  {'event':<26} {'':<23} {'at ms':>7} {'+gap':>7}  gap spent in")
    for r in rows:
        eid = "" if r["event_id"] is None else str(r["event_id"])
        print(f"  {eid:>3}  {r['event']:<26} {r['detail']:<23} {r['at_ms']:7.1f} {r['gap_ms']:+7.1f}  {r['spent_in']}")


def print_breakdowns(results: list[dict[str, Any]]) -> None:
    print("\nwhere the time goes: mean ms per call, from the history of every measured call (join | before | floor)")
    print(f"  {'spent in':<34} " + " ".join(f"{'c=' + str(lv['concurrency']):>23}" for lv in results))
    for key in (*BUCKETS, "total", "workflow tasks per call"):
        cells = " ".join(
            f"{b['join'][key]:7.1f} |{b['join_before'][key]:7.1f} |{b['floor'][key]:6.1f}"
            for b in (lv["breakdown"] for lv in results)
        )
        print(f"  {key:<34} {cells}")


# ---- plots ----------------------------------------------------------------------------------------------------

SERIES = (("join", "join", "C0"), ("join_before", "join (before)", "C1"), ("floor", "floor", "C2"),
          ("direct", "direct", "C7"))


def plot(results: list[dict[str, Any]]) -> list[Path]:
    """The latency distribution at each level (CDFs), and p50/p99 against concurrency."""
    meta = machine()
    note = f"commit {meta['commit']}{'+' if meta['dirty'] else ''}, {meta['nproc']} cores"
    fig, first = figure(f"Session ready: join vs baselines ({note})", "ms (log scale)", "fraction of calls")
    fig.set_size_inches(4.5 * len(results), 4)
    first.remove()
    for i, level in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        for key, label, color in SERIES:
            xs = level["samples"][key]
            ax.step(xs, [(j + 1) / len(xs) for j in range(len(xs))], where="post", label=label, color=color)
        ax.set_xscale("log")
        ax.set_title(f"{level['concurrency']} concurrent (n={level['n']})")
        ax.set_xlabel("ms (log scale)")
        if i == 0:
            ax.set_ylabel("fraction of calls")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize="small")
    cdf = save_plot(fig, "bench-session-ready-cdf")
    fig, ax = figure(f"Session ready against concurrency ({note})", "concurrent joins", "ms (log scale)")
    levels = [lv["concurrency"] for lv in results]
    for key, label, color in SERIES[:3]:
        ax.plot(levels, [lv[key]["p50"] for lv in results], "o-", color=color, label=f"{label} p50")
        ax.plot(levels, [lv[key]["p99"] for lv in results], "s--", color=color, label=f"{label} p99", alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.legend(fontsize="small")
    return [cdf, save_plot(fig, "bench-session-ready-concurrency")]


# ---- the run --------------------------------------------------------------------------------------------------


FIGURES = ("p50", "p90", "p99", "max", "mean", "per_s")


def print_level(level: dict[str, Any]) -> None:
    print(f"\nconcurrency {level['concurrency']}, n={level['n']}; milliseconds (per_s: calls completed per second)")
    print(f"  {'measure':<30} " + " ".join(f"{f:>8}" for f in FIGURES))
    for key, label in (("floor", "floor: update-with-start"), ("direct", "direct: create_room + mint"),
                       ("join_before", "join (before) -> grant"), ("join", "join -> grant"),
                       ("end", "end -> released"), ("direct_delete", "direct: delete_room")):
        s = level[key]
        print(f"  {label:<30} " + " ".join(f"{s[f]:8.1f}" for f in FIGURES))
    r = level["ratios"]
    print(f"  join/floor  p50 {r['join/floor p50']:5.1f}x   p99 {r['join/floor p99']:5.1f}x")
    print(f"  join/direct p50 {r['join/direct p50']:5.1f}x   p99 {r['join/direct p99']:5.1f}x")
    print(f"  join/before p50 {r['join/join_before p50']:5.1f}x   p99 {r['join/join_before p99']:5.1f}x"
          f"   (before/floor p50 {r['join_before/floor p50']:4.1f}x)")


async def run_level(bench: Bench, concurrency: int, n: int) -> tuple[dict[str, Any], dict[str, Phase]]:
    tag = uuid.uuid4().hex[:6]
    phases = {
        "floor": await closed_loop([f"floor-{tag}-{i}" for i in range(n)], concurrency, bench.floor),
        "direct": await closed_loop([f"{DIRECT_PREFIX}{tag}-{i}" for i in range(n)], concurrency, bench.direct),
        "join_before": await closed_loop([f"bench-{tag}-b{i}" for i in range(n)], concurrency, bench.join_before),
        "join": await closed_loop([f"bench-{tag}-{i}" for i in range(n)], concurrency, bench.join),
    }
    phases["end"] = await closed_loop([c.key for c in phases["join"].calls], concurrency, bench.end)
    await closed_loop([c.key for c in phases["join_before"].calls], concurrency, bench.end)  # not measured
    phases["direct_delete"] = await closed_loop([c.key for c in phases["direct"].calls], concurrency,
                                                bench.delete_direct)
    level: dict[str, Any] = {"concurrency": concurrency, "n": n}
    for name in ("join", "join_before"):
        failed = [c for c in phases[name].calls if c.key in bench.failed]
        level[f"{name}_failed"] = len(failed)
        phases[name].calls = [c for c in phases[name].calls if c.key not in bench.failed]
    for name, phase in phases.items():
        level[name] = summary(phase.ms, phase.wall_s)
    level["samples"] = {name: sorted(phases[name].ms) for name in ("floor", "direct", "join_before", "join")}
    level["breakdown"] = {
        "join": breakdown(await traces_of(bench.client, phases["join"], bench.sessions.workflow_id)),
        "join_before": breakdown(await traces_of(bench.client, phases["join_before"], bench.sessions.workflow_id)),
        "floor": breakdown(await traces_of(bench.client, phases["floor"], str)),
    }
    level["ratios"] = {
        f"{what}/{base} {q}": level[what][q] / level[base][q]
        for what, base in (("join", "floor"), ("join", "direct"), ("join", "join_before"), ("join_before", "floor"))
        for q in ("p50", "p99")
    }
    return level, phases


async def traces_of(client: Client, phase: Phase, wid: Callable[[str], str]) -> list[list[dict[str, Any]]]:
    """The trace of every call of `phase`, fetched after it (ten at a time), so the fetching is not measured."""
    out: list[list[dict[str, Any]]] = []
    for i in range(0, len(phase.calls), 10):
        batch = phase.calls[i:i + 10]
        out += await asyncio.gather(*(trace(client, wid(c.key), c) for c in batch))
    return out


def nearest_p50(phase: Phase) -> Call:
    p50 = pct(phase.ms, 0.5)
    return min(phase.calls, key=lambda c: abs(c.ms - p50))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default=DEFAULT_LEVELS,
                        help=f"concurrency:calls, comma-separated (default {DEFAULT_LEVELS})")
    parser.add_argument("--warmup", type=int, default=3, help="sequential warm-up calls of each kind (default 3)")
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"where to write the figures (default {DEFAULT_JSON})")
    parser.add_argument("--no-plots", action="store_true", help="do not (re)draw docs/img/bench-session-ready-*.png")
    args = parser.parse_args()
    levels = parse_levels(args.levels)
    settings = Settings()
    client = await connect(settings)
    session_tq, floor_tq = f"bench-session-{uuid.uuid4().hex[:6]}", f"bench-floor-{uuid.uuid4().hex[:6]}"
    before_tq = f"bench-before-{uuid.uuid4().hex[:6]}"
    bench = Bench(client, settings, session_tq, floor_tq, before_tq)
    started_at, load_at_start = datetime.now(UTC), os.getloadavg()
    print(f"temporal {settings.temporal_address}, livekit {settings.livekit_http_url}; "
          f"{os.cpu_count()} cores, load average {load_at_start[0]:.2f}")
    results: list[dict[str, Any]] = []
    traces: dict[str, list[dict[str, Any]]] = {}
    trace_concurrency: int | None = None
    left: list[str] = []
    async with build_worker(client, settings, task_queue=session_tq), \
            build_worker(client, settings, task_queue=before_tq, patch_activation_callback=before_local_room_create), \
            Worker(client, task_queue=floor_tq, workflows=[FloorWorkflow]):
        try:
            await run_level(bench, 1, args.warmup)  # warm-up: every kind of call, discarded
            for concurrency, n in levels:
                level, phases = await run_level(bench, concurrency, n)
                results.append(level)
                print_level(level)
                if level["join_failed"] or level["join_before_failed"]:
                    print(f"  joins with no grant (not timed): {level['join_failed']} join, "
                          f"{level['join_before_failed']} join (before)")
                if not traces:
                    for name in ("join", "join_before"):
                        call = nearest_p50(phases[name])
                        traces[name] = await trace(client, workflow_id_for(call.key, settings.deployment), call)
                    floor_call = nearest_p50(phases["floor"])
                    traces["floor"] = await trace(client, floor_call.key, floor_call)
                    trace_concurrency = c = concurrency
                    # Printed (and the plots drawn) as each level ends, so a run cut short keeps what it measured.
                    print_trace(f"trace of one join (concurrency {c}, the call nearest the p50); ms after the client "
                                "sent it", traces["join"])
                    print_trace(f"trace of one join (before: room created by a normal activity; concurrency {c}, "
                                "nearest the p50)", traces["join_before"])
                    print_trace(f"trace of one floor call (concurrency {c}, nearest the p50)", traces["floor"])
                print_breakdowns(results)
                if not args.no_plots:
                    for path in plot(results):
                        print(f"plot written to {path}")
        finally:
            left = await bench.cleanup()
    print(f"\ncleanup: {len(bench.ended)} sessions ended, {len(bench.deleted)} direct rooms deleted, "
          f"{len(left)} of the benchmark's rooms still on LiveKit{': ' + ', '.join(left) if left else ''}")
    out = {
        "benchmark": "bench.session_ready",
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {"levels": args.levels, "warmup": args.warmup},
        "machine": {**machine(), "load_avg_at_start": load_at_start},
        "stack": {"temporal": settings.temporal_address, "livekit": settings.livekit_http_url},
        "unit": "ms",
        "levels": results,
        "trace": traces,
        "trace_concurrency": trace_concurrency,
        "rooms_left": left,
    }
    write_json(Path(args.json), out)
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # the Temporal runtime can crash at interpreter exit in short scripts (sdk-python#300)
