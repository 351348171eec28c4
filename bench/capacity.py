"""Capacity: how many live monitored sessions one workflow worker and one media worker hold.

    python -m sandbox exec -- python -m bench.capacity [--steps 10,25,50,75,100,125,150] [--hold 10] [--probe 10]

One workflow worker (`python -m workers`) and one media worker (`python -m workers --media`), each a process of
its own on its own task queue, so their memory and CPU are read apart (from /proc). Live sessions are ramped in
steps; each session has its room monitor and one real participant (livekit rtc, publishing a microphone tone),
hosted by `--hosts` processes of their own (`bench/participants.py`) so the load they are stays out of the
measuring client. The stack's gateway is paused for the whole ramp: no webhook arrives, so a session that shows
its participant present learned it from its monitor.

At each step, once every session's state shows its participant (polled slowly, `--ready-timeout` at most):
- **usage**: resident memory and CPU of each worker, the participant hosts and the LiveKit server over `--hold`
  seconds; per session = (figure at N - the idle worker's, measured first in the same run) / N;
- **join**: `--probe` new sessions joined one after the other (`--probe-concurrency`) while N are live: p50/p99
  of join call -> grant; they then get a participant too and count from the next step;
- **events**: a participant joining and leaving a probe session, `--events` times: from the request until the
  session's state shows it (polled every 20 ms), from the monitor alone;
- **monitors**: every session described: monitor activities retried (a missed heartbeat or a crash), or not
  started (no slot on the media worker);
- **history**: the events of the oldest session and of the newest.

Stops after the step where join p99 passed `--limit-ms`, or a monitor was retried or not running, or a session
did not show its participant in time, or after the last step; says what broke first and the largest N held.
Every session is ended (its room deleted) on every path; rooms of the run still on LiveKit afterwards are deleted
and counted. Prints a table, writes JSON (`--json`) and plots (`--plots`: docs/img/bench-capacity-*.png).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

from livekit import api
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

from bench.common import (
    RESULTS,
    ParticipantHost,
    WorkerProcess,
    bounded,
    cpu_share,
    figure,
    machine,
    machine_cpu_s,
    pct,
    save_plot,
    usage,
    write_json,
)
from config.settings import Settings
from sandbox.stack import LocalStack
from starters.client import SessionClient
from workers.temporal import connect
from workflows.models import SessionSpec

T = TypeVar("T")
CALL_TIMEOUT_S = 30.0  # one client call (join, state, describe); a slower one counts as failed
POLL_S = 0.02


def spec(run: str, n: int) -> SessionSpec:
    return SessionSpec.model_validate({
        "session_id": f"bench-cap-{run}-{n}",
        "kind": "interview",
        # `visitor` comes and goes in the probe session (event latency); `cand` stays, so the session stays live.
        "participants": [{"identity": "cand", "role": "candidate"}, {"identity": "visitor", "role": "observer"}],
        "max_duration": "PT30M",
        "no_show_timeout": "PT10M",
    })


class Run:
    def __init__(self, args: argparse.Namespace, settings: Settings, sessions: SessionClient,
                 hosts: list[ParticipantHost], workers: dict[str, WorkerProcess], stack_pids: dict[str, int]) -> None:
        self.args = args
        self.settings = settings
        self.sessions = sessions
        self.hosts = hosts
        self.workers = workers
        self.stack_pids = stack_pids
        self.id = uuid.uuid4().hex[:6]
        self.live: list[str] = []  # session ids with a participant in, oldest first
        self.started: list[str] = []  # every session id this run started (all ended at the end)
        self.count = 0

    def new_spec(self) -> SessionSpec:
        self.count += 1
        s = spec(self.id, self.count)
        self.started.append(s.session_id)
        return s

    def host(self, session_id: str) -> ParticipantHost:
        return self.hosts[hash(session_id) % len(self.hosts)]

    async def call(self, aw: Awaitable[T]) -> T:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return await aw

    async def populate(self, specs: list[SessionSpec], grants: dict[str, Any] | None = None) -> list[str]:
        """Join each session (unless `grants` has it) and put a participant in; returns the failures."""
        grants = dict(grants or {})

        async def one(s: SessionSpec) -> None:
            grant = grants[s.session_id] if s.session_id in grants else await self.call(self.sessions.join(s, "cand"))
            await self.host(s.session_id).join(s.session_id, grant.url, grant.token)
            self.live.append(s.session_id)

        results = await bounded(specs, self.args.concurrency, one)
        return [f"{s.session_id}: {r}" for s, r in zip(specs, results, strict=True) if isinstance(r, Exception)]

    async def ready(self, session_ids: list[str]) -> list[str]:
        """Wait until each session's state shows its participant (from its monitor: no webhook comes); returns
        those that did not within `--ready-timeout`."""
        waiting = list(session_ids)
        deadline = time.monotonic() + self.args.ready_timeout

        async def shown(session_id: str) -> bool:
            return (await self.call(self.sessions.state(session_id))).present == ["cand"]

        while waiting and time.monotonic() < deadline:
            results = await bounded(waiting, 4, shown)
            waiting = [s for s, r in zip(waiting, results, strict=True) if r is not True]
            if waiting:
                await asyncio.sleep(1.0)
        return waiting

    def snapshot(self) -> dict[str, Any]:
        pids = {name: w.proc.pid for name, w in self.workers.items()} | self.stack_pids
        pids |= {f"participants{i}": h.pid for i, h in enumerate(self.hosts)}
        return {"t": time.monotonic(), "machine": machine_cpu_s(),
                "procs": {name: (pid, usage(pid)) for name, pid in pids.items()}}

    def usage_between(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        seconds = b["t"] - a["t"]
        busy = 100 * (b["machine"] - a["machine"]) / seconds / (os.cpu_count() or 1)
        out: dict[str, Any] = {"seconds": seconds, "machine_busy_pct_of_all_cores": busy}
        for name, (pid, (cpu1, rss1)) in b["procs"].items():
            cpu0 = a["procs"][name][1][0]
            out[name] = {"cpu_pct": cpu_share({pid: (cpu0, 0)}, {pid: (cpu1, 0)}, seconds)[pid], "rss_mib": rss1}
        hosts = [k for k in out if k.startswith("participants")]
        out["participants"] = {"cpu_pct": sum(out[k]["cpu_pct"] for k in hosts),
                               "rss_mib": sum(out[k]["rss_mib"] for k in hosts)}
        return out

    async def monitors(self) -> dict[str, Any]:
        """Every live session described: its monitor activity running, retried (with why), or waiting for a slot."""
        reasons: list[str] = []

        async def one(session_id: str) -> str:
            d = await self.call(self.sessions.handle(session_id).describe())
            pending = [a for a in d.raw_description.pending_activities if a.activity_type.name == "monitor_room"]
            if not pending:
                return "missing"
            a = pending[0]
            if a.attempt > 1:
                reasons.append(a.last_failure.message[:200])
                return "retried"
            return "running" if a.state == 2 else "waiting"  # PENDING_ACTIVITY_STATE_STARTED

        results = await bounded(self.live, 4, one)
        counts: dict[str, Any] = {"running": 0, "retried": 0, "waiting": 0, "missing": 0, "unknown": 0}
        for r in results:
            counts[r if isinstance(r, str) else "unknown"] += 1
        counts["retry_reasons"] = sorted(set(reasons))[:5]
        return counts

    async def events(self, probe: SessionSpec, grant: Any) -> dict[str, list[float]]:
        """A visitor joins the probe session and leaves it, `--events` times: ms until the state says so."""
        host = self.hosts[0]
        key = f"{probe.session_id}-visitor"
        out: dict[str, list[float]] = {"join": [], "leave": [], "connect": []}

        async def until(present: list[str], started: float) -> float:
            while (await self.call(self.sessions.state(probe.session_id))).present != present:
                if time.perf_counter() - started > self.args.ready_timeout:
                    raise TimeoutError(f"the probe session never showed {present}")
                await asyncio.sleep(POLL_S)
            return (time.perf_counter() - started) * 1000

        for _ in range(self.args.events):
            started = time.perf_counter()
            out["connect"].append(await host.join(key, grant.url, grant.token))
            out["join"].append(await until(["cand", "visitor"], started))
            started = time.perf_counter()
            await host.leave(key)
            out["leave"].append(await until(["cand"], started))
        return out

    async def probe_joins(self) -> tuple[list[float], list[SessionSpec], dict[str, Any], int]:
        """`--probe` new sessions joined while the current ones are live; ms per join, and the grants."""
        specs = [self.new_spec() for _ in range(self.args.probe)]
        grants: dict[str, Any] = {}
        ms: list[float] = []

        async def one(s: SessionSpec) -> None:
            t = time.perf_counter()
            grants[s.session_id] = await self.call(self.sessions.join(s, "cand"))
            ms.append((time.perf_counter() - t) * 1000)

        results = await bounded(specs, self.args.probe_concurrency, one)
        failed = sum(isinstance(r, Exception) for r in results)
        return ms, [s for s in specs if s.session_id in grants], grants, failed

    async def warm_up(self) -> None:
        """Both workers polling, and `--warmup` sessions joined (monitor, participant) and ended, so the idle
        figure is a worker that has run sessions (its imports, workflow sandbox, rtc runtime loaded)."""
        queues = [(self.sessions.task_queue, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
                  (self.sessions.settings.media_task_queue, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY)]
        service = self.sessions.client.workflow_service
        for name, kind in queues:
            request = DescribeTaskQueueRequest(namespace=self.sessions.client.namespace, task_queue=TaskQueue(name=name),
                                               task_queue_type=kind)
            for _ in range(120):  # a minute at most: a worker that never polls shows in its log
                if (await service.describe_task_queue(request)).pollers:
                    break
                await asyncio.sleep(0.5)
        specs = [self.new_spec() for _ in range(self.args.warmup)]
        await self.populate(specs)
        await self.ready([s.session_id for s in specs])
        await bounded([s.session_id for s in specs], self.args.concurrency,
                      lambda s: self.call(self.sessions.end(s, "warm-up over")))
        await bounded([s.session_id for s in specs], self.args.concurrency, lambda s: self.host(s).leave(s))
        self.live.clear()
        await asyncio.sleep(3)  # the monitors' leaving done

    async def history(self, session_id: str) -> int:
        return len((await self.call(self.sessions.handle(session_id).fetch_history())).events)

    async def end_all(self) -> dict[str, int]:
        """End every session of the run (its room deleted); a failed end is retried twice."""
        todo = list(self.started)
        for _ in range(3):
            results = await bounded(todo, self.args.concurrency, lambda s: self.call(self.sessions.end(s, "bench over")))
            todo = [s for s, r in zip(todo, results, strict=True) if isinstance(r, Exception)]
            if not todo:
                break
        # Still not ended (Temporal or LiveKit overloaded past every retry): terminated, and their rooms are deleted
        # by `rooms_left`; a terminated session releases nothing itself, so nothing else of theirs is left (no avatar).
        terminated = await bounded(todo, self.args.concurrency,
                                   lambda s: self.call(self.sessions.handle(s).terminate("bench cleanup")))
        return {"ended": len(self.started) - len(todo), "not_ended_terminated": len(todo),
                "terminate_failed": sum(isinstance(r, Exception) for r in terminated)}

    async def rooms_left(self) -> int:
        """Rooms of this run still on LiveKit: deleted here, and counted (0 when every end released its room)."""
        s = self.settings
        async with api.LiveKitAPI(s.livekit_http_url, s.livekit_api_key, s.livekit_api_secret.get_secret_value()) as lk:
            listed = await lk.room.list_rooms(api.ListRoomsRequest())
            rooms = [r.name for r in listed.rooms if f"bench-cap-{self.id}-" in r.name]
            for name in rooms:
                with contextlib.suppress(Exception):
                    await lk.room.delete_room(api.DeleteRoomRequest(room=name))
        return len(rooms)


async def ramp(run: Run) -> dict[str, Any]:
    args = run.args
    out: dict[str, Any] = {"steps": [], "stopped_by": None, "largest_n_held": 0}
    await run.warm_up()
    a = run.snapshot()
    await asyncio.sleep(args.hold)
    out["idle"] = run.usage_between(a, run.snapshot())
    print(f"idle: workflow worker {out['idle']['workflow_worker']['rss_mib']:.0f} MiB "
          f"{out['idle']['workflow_worker']['cpu_pct']:.1f} %, media worker {out['idle']['media_worker']['rss_mib']:.0f} MiB "
          f"{out['idle']['media_worker']['cpu_pct']:.1f} %", flush=True)
    probe = run.new_spec()  # the session a visitor comes to and leaves (event latency); counts as live
    await run.populate([probe])
    probe_grant = await run.call(run.sessions.join(probe, "visitor"))
    pending: tuple[list[SessionSpec], dict[str, Any]] = ([], {})
    for target in args.steps:
        t_step = time.monotonic()
        carried, carried_grants = pending
        missing = max(0, target - len(run.live) - len(carried))
        before = len(run.live)
        failures = await run.populate(carried + [run.new_spec() for _ in range(missing)], carried_grants)
        n = len(run.live)
        not_ready = await run.ready(run.live[before:])
        a = run.snapshot()
        await asyncio.sleep(args.hold)
        used = run.usage_between(a, run.snapshot())
        monitors = await run.monitors()
        joins, probed, grants, join_failures = await run.probe_joins()
        pending = (probed, grants)
        event_error = None
        try:
            events = await run.events(probe, probe_grant)
        except Exception as e:
            events, event_error = {"join": [], "leave": [], "connect": []}, repr(e)
        histories = await bounded([run.live[0], run.live[-1]], 2, run.history)
        step: dict[str, Any] = {
            "n": n, "seconds": time.monotonic() - t_step, "populate_failures": failures, "not_ready": len(not_ready),
            "usage": used, "monitors": monitors,
            "join_ms": {"n": len(joins), "failed": join_failures,
                        **({"p50": pct(joins, 0.5), "p99": pct(joins, 0.99), "max": max(joins)} if joins else {})},
            "event_ms": {k: ({"p50": pct(v, 0.5), "p99": pct(v, 0.99)} if v else {}) for k, v in events.items()},
            "event_error": event_error,
            "history_events": {"oldest": histories[0] if isinstance(histories[0], int) else None,
                               "newest": histories[1] if isinstance(histories[1], int) else None},
        }
        for name in ("workflow_worker", "media_worker"):
            idle, now = out["idle"][name], used[name]
            step[f"{name}_per_session"] = {"rss_mib": (now["rss_mib"] - idle["rss_mib"]) / n,
                                           "cpu_pct": (now["cpu_pct"] - idle["cpu_pct"]) / n}
        out["steps"].append(step)
        print_step(step)
        broke = []
        if failures or join_failures:
            broke.append(f"{len(failures) + join_failures} joins or participants failed")
        if not_ready:
            broke.append(f"{len(not_ready)} sessions did not show their participant within {args.ready_timeout:.0f} s")
        if monitors["retried"] or monitors["waiting"] or monitors["missing"]:
            broke.append(f"monitors: {monitors['retried']} retried ({'; '.join(monitors['retry_reasons'])}), "
                         f"{monitors['waiting']} waiting for a slot, {monitors['missing']} missing")
        if joins and step["join_ms"]["p99"] > args.limit_ms:
            broke.append(f"join p99 {step['join_ms']['p99']:.0f} ms > {args.limit_ms:.0f} ms")
        if broke:
            out["stopped_by"] = "; ".join(broke)
            break
        out["largest_n_held"] = n
    else:
        out["stopped_by"] = f"the last step ({args.steps[-1]}) held"
    return out


def print_step(step: dict[str, Any]) -> None:
    u, j, e = step["usage"], step["join_ms"], step["event_ms"]
    ev = " ".join(f"{k} {v['p50']:.0f}/{v['p99']:.0f}" for k, v in e.items() if v)
    print(
        f"N={step['n']:>4}  join p50/p99 {j.get('p50', float('nan')):6.0f}/{j.get('p99', float('nan')):6.0f} ms  "
        f"events ms {ev or step['event_error']}  "
        f"wf {u['workflow_worker']['rss_mib']:4.0f} MiB {u['workflow_worker']['cpu_pct']:5.1f} %  "
        f"media {u['media_worker']['rss_mib']:4.0f} MiB {u['media_worker']['cpu_pct']:5.1f} %  "
        f"participants {u['participants']['cpu_pct']:5.1f} %  livekit {u.get('livekit', {}).get('cpu_pct', 0):5.1f} %  "
        f"machine {u['machine_busy_pct_of_all_cores']:.0f} %  monitors {step['monitors']}  "
        f"history {step['history_events']}  ({step['seconds']:.0f} s)",
        flush=True,
    )


def table(out: dict[str, Any]) -> str:
    rows = [
        "| live sessions | join p50 / p99 ms | event join / leave p50 ms | workflow worker RSS MiB, CPU % | media worker "
        "RSS MiB, CPU % | per session: workflow worker | per session: media worker | participants CPU % (share of "
        "machine) | LiveKit CPU % | machine busy % |",
        "|---:|---|---|---|---|---|---|---|---:|---:|",
    ]
    idle = out["idle"]
    rows.append(f"| 0 (idle) | | | {idle['workflow_worker']['rss_mib']:.0f}, {idle['workflow_worker']['cpu_pct']:.1f} | "
                f"{idle['media_worker']['rss_mib']:.0f}, {idle['media_worker']['cpu_pct']:.1f} | | | | "
                f"{idle.get('livekit', {}).get('cpu_pct', 0):.1f} | {idle['machine_busy_pct_of_all_cores']:.0f} |")
    cores = os.cpu_count() or 1
    for s in out["steps"]:
        u, j, e = s["usage"], s["join_ms"], s["event_ms"]
        wf, md = s["workflow_worker_per_session"], s["media_worker_per_session"]
        ev = (f"{e['join']['p50']:.0f} / {e['leave']['p50']:.0f}" if e.get("join") and e.get("leave") else "-")
        rows.append(
            f"| {s['n']} | {j.get('p50', 0):.0f} / {j.get('p99', 0):.0f} | {ev} | "
            f"{u['workflow_worker']['rss_mib']:.0f}, {u['workflow_worker']['cpu_pct']:.1f} | "
            f"{u['media_worker']['rss_mib']:.0f}, {u['media_worker']['cpu_pct']:.1f} | "
            f"{wf['rss_mib']:.2f} MiB, {wf['cpu_pct']:.2f} % | {md['rss_mib']:.2f} MiB, {md['cpu_pct']:.2f} % | "
            f"{u['participants']['cpu_pct']:.0f} ({u['participants']['cpu_pct'] / cores:.0f} %) | "
            f"{u.get('livekit', {}).get('cpu_pct', 0):.0f} | {u['machine_busy_pct_of_all_cores']:.0f} |"
        )
    return "\n".join(rows)


def plots(out: dict[str, Any], prefix: str) -> list[str]:
    steps = out["steps"]
    if not steps:
        return []
    ns = [0] + [s["n"] for s in steps]
    written = []

    def series(key: str, metric: str) -> list[float]:
        return [out["idle"].get(key, {}).get(metric, 0.0)] + [s["usage"].get(key, {}).get(metric, 0.0) for s in steps]

    fig, ax = figure("Memory against live monitored sessions", "live sessions (each: monitor + 1 participant)", "RSS (MiB)")
    for key, label in (("workflow_worker", "workflow worker"), ("media_worker", "media worker"),
                       ("participants", "participant hosts (load)")):
        ax.plot(ns, series(key, "rss_mib"), marker="o", label=label)
    ax.legend()
    written.append(str(save_plot(fig, f"{prefix}-memory")))
    fig, ax = figure("CPU against live monitored sessions", "live sessions (each: monitor + 1 participant)",
                     "CPU (% of one core)")
    for key, label in (("workflow_worker", "workflow worker"), ("media_worker", "media worker"),
                       ("participants", "participant hosts (load)"), ("livekit", "LiveKit server")):
        ax.plot(ns, series(key, "cpu_pct"), marker="o", label=label)
    ax.legend()
    written.append(str(save_plot(fig, f"{prefix}-cpu")))
    fig, ax = figure("Join latency while N sessions are live", "live sessions", "join call -> grant (ms)")
    joined = [s for s in steps if s["join_ms"].get("n")]
    ax.plot([s["n"] for s in joined], [s["join_ms"]["p50"] for s in joined], marker="o", label="p50")
    ax.plot([s["n"] for s in joined], [s["join_ms"]["p99"] for s in joined], marker="o", label="p99")
    ax.axhline(run_limit(out), color="red", linestyle="--", label=f"limit {run_limit(out):.0f} ms")
    ax.legend()
    written.append(str(save_plot(fig, f"{prefix}-join")))
    return written


def run_limit(out: dict[str, Any]) -> float:
    return float(out["args"]["limit_ms"])


@contextlib.asynccontextmanager
async def gateway_paused() -> AsyncIterator[dict[str, int]]:
    """No webhook reaches a session meanwhile; yields the pids of the stack's LiveKit and Temporal servers."""
    stack = LocalStack.attach()
    if stack is None:
        raise SystemExit("no local stack: run under `python -m sandbox exec -- python -m bench.capacity`")
    pids = {name: service.pid for name, (service, _) in stack.status().items()
            if service is not None and name in ("livekit", "temporal")}
    stack.pause("gateway")
    try:
        yield pids
    finally:
        stack.resume("gateway")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="10,25,50,75,100,125,150", help="live sessions at each step")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds each step is held while usage is read")
    parser.add_argument("--probe", type=int, default=10, help="new sessions joined (measured) at each step")
    parser.add_argument("--probe-concurrency", type=int, default=1)
    parser.add_argument("--events", type=int, default=3, help="participant join+leave events timed at each step")
    parser.add_argument("--hosts", type=int, default=2, help="participant host processes")
    parser.add_argument("--warmup", type=int, default=3, help="sessions run and ended before the idle figure")
    parser.add_argument("--concurrency", type=int, default=8, help="joins in flight while ramping (not measured)")
    parser.add_argument("--limit-ms", type=float, default=500.0, help="stop once join p99 passes this")
    parser.add_argument("--ready-timeout", type=float, default=90.0)
    parser.add_argument("--receive-audio", action="store_true",
                        help="the monitors receive each person's audio (SESSIONFLOW_MONITOR_RECEIVE_AUDIO): the 'before'")
    parser.add_argument("--json", default=str(RESULTS / "bench-capacity.json"))
    parser.add_argument("--plots", default="bench-capacity", help="plot name prefix in docs/img ('' for none)")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the plots from a run's JSON")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:  # noqa: ASYNC230  # nothing else runs yet
            print("\n".join(plots(json.load(f), args.plots)))
        return
    args.steps = sorted(int(n) for n in args.steps.split(",") if n)
    # SIGTERM (a `timeout`, a Ctrl-C of `sandbox exec`) cancels the run, so its cleanup still ends every session,
    # stops the workers and resumes the gateway.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    settings = Settings()
    client = await connect(settings)
    queue = f"bench-cap-{uuid.uuid4().hex[:8]}"
    sessions = SessionClient(client, settings.model_copy(update={"media_task_queue": f"{queue}-media"}), task_queue=queue)
    out: dict[str, Any] = {"bench": "capacity", "args": vars(args), "machine_at_start": machine(),
                           "load_avg_at_start": os.getloadavg(), "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    print(f"capacity: steps {args.steps}, hold {args.hold:.0f} s, probe {args.probe} joins, Temporal "
          f"{settings.temporal_address}, LiveKit {settings.livekit_url}, load {os.getloadavg()[0]:.1f}", flush=True)
    workers = {"workflow_worker": WorkerProcess(False, queue, f"{queue}-media"),
               "media_worker": WorkerProcess(True, queue, f"{queue}-media", args.receive_audio)}
    run: Run | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            hosts = [await stack.enter_async_context(ParticipantHost(RESULTS / f"bench-capacity-participants{i}.log"))
                     for i in range(args.hosts)]
            stack_pids = await stack.enter_async_context(gateway_paused())
            run = Run(args, settings, sessions, hosts, workers, stack_pids)
            try:
                out |= await ramp(run)
            finally:
                t = time.monotonic()
                out["cleanup"] = await run.end_all()
                out["cleanup"]["seconds"] = time.monotonic() - t
        out["cleanup"]["rooms_left_then_deleted"] = await run.rooms_left()
    finally:
        for w in workers.values():
            w.stop()
    out["machine"] = machine()
    print(f"\nlargest N held: {out.get('largest_n_held')}; stopped by: {out.get('stopped_by')}")
    print(f"cleanup: {out['cleanup']}; load average at start {out['load_avg_at_start'][0]:.1f}, "
          f"at end {out['machine']['load_avg_at_end'][0]:.1f}; commit {out['machine']['commit']}")
    if out.get("idle"):
        print(table(out))
        if args.plots:
            out["plots"] = plots(out, args.plots)
    write_json(Path(args.json), out)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # the Temporal runtime can crash at interpreter exit (sdk-python#300)
