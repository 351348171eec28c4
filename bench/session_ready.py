"""Session-ready time: `SessionClient.join` (update-with-start) until the grant is back, against a baseline.

    make bench        (or: python -m sandbox exec -- python -m bench.session_ready --sessions 30)

The baseline, measured in the same run on the same stack, is an update-with-start of a workflow whose update
returns at once: Temporal's own floor for "start or join in one call". The session adds room creation on the
real LiveKit server and token minting, each an activity. Also measured: `end` until the room and avatar are
released. Prints percentiles and the ratio to the baseline; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid

from temporalio import workflow
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.worker import Worker

from config.settings import Settings
from starters.client import SessionClient
from workers.temporal import connect
from workers.worker import build_worker
from workflows.models import SessionSpec


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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(name: str, ms: list[float], base: float | None) -> str:
    p50 = pct(ms, 0.5)
    ratio = f"{p50 / base:5.1f}x" if base else "  1.0x"
    return f"{name:<28} {p50:8.1f} {pct(ms, 0.9):8.1f} {pct(ms, 0.99):8.1f} {statistics.mean(ms):8.1f}   {ratio}"


async def floor(client: Client, n: int) -> list[float]:
    tq = f"bench-floor-{uuid.uuid4().hex[:6]}"
    out = []
    async with Worker(client, task_queue=tq, workflows=[FloorWorkflow]):
        for _ in range(n):
            op = WithStartWorkflowOperation(
                FloorWorkflow.run, id=f"floor-{uuid.uuid4().hex}", task_queue=tq,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )
            t = time.perf_counter()
            await client.execute_update_with_start_workflow(FloorWorkflow.join, "x", start_workflow_operation=op)
            out.append((time.perf_counter() - t) * 1000)
    return out


async def sessions(client: Client, settings: Settings, n: int) -> tuple[list[float], list[float]]:
    tq = f"bench-session-{uuid.uuid4().hex[:6]}"
    join_ms, end_ms = [], []
    async with build_worker(client, settings, task_queue=tq):
        sc = SessionClient(client, settings, task_queue=tq)
        for _ in range(n):
            spec = SessionSpec.model_validate(
                {"session_id": f"bench-{uuid.uuid4().hex[:10]}", "kind": "coaching",
                 "participants": [{"identity": "coachee", "role": "candidate"}, {"identity": "coach", "role": "coach"}]}
            )
            t = time.perf_counter()
            await sc.join(spec, "coachee")
            join_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            await sc.end(spec.session_id, "bench")
            end_ms.append((time.perf_counter() - t) * 1000)
    return join_ms, end_ms


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    settings = Settings()
    client = await connect(settings)
    await floor(client, args.warmup)
    await sessions(client, settings, args.warmup)
    base = await floor(client, args.sessions)
    join_ms, end_ms = await sessions(client, settings, args.sessions)
    b50 = pct(base, 0.5)
    print(f"n={args.sessions} sequential, after {args.warmup} warm-ups; milliseconds")
    print(f"{'measure':<28} {'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8}   vs baseline p50")
    print(row("baseline update-with-start", base, None))
    print(row("session join -> grant", join_ms, b50))
    print(row("session end -> released", end_ms, b50))


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # the Temporal runtime can crash at interpreter exit in short scripts (sdk-python#300)
