"""Fixtures of the cluster suite (`make cluster-test`): the multi-service Temporal cluster of sandbox/cluster.py (reused
if one is up, else started and stopped around the run), the rest of the local stack pointed at it on the chaos
suite's ports, and two worker processes on one task queue. Not part of `make test`: starting the cluster the first time builds the
Temporal server (minutes), and the scenarios kill its processes one by one.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from config.settings import Settings
from sandbox.cluster import ClusterPorts, StackOnCluster, TemporalCluster
from sandbox.stack import REPO_ROOT, StackPorts
from starters.client import SessionClient
from tests.support.chaos import TASK_QUEUE, WorkerPool
from workers.temporal import connect

STATE_DIR = Path(os.environ.get("SESSIONFLOW_STATE_DIR") or REPO_ROOT / ".sessionflow")


@pytest.fixture(scope="session")
def cluster() -> Iterator[TemporalCluster]:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    ours = TemporalCluster(ports=ClusterPorts(int(os.environ.get("SESSIONFLOW_PORT_OFFSET", "0"))),
                           state_dir=STATE_DIR / "cluster", console=console)
    started_here = not ours.recorded()
    if started_here or not all(ours.status().values()):
        ours.up()  # a fresh one, or the dead processes of a recorded one started again
    try:
        yield ours
    finally:
        if started_here:
            ours.down()


@pytest.fixture(scope="session")
def stack_on_cluster(cluster: TemporalCluster) -> Iterator[StackOnCluster]:
    offset = int(os.environ.get("SESSIONFLOW_CHAOS_PORT_OFFSET", "500"))
    stack = StackOnCluster(cluster, ports=StackPorts().shifted(offset), state_dir=STATE_DIR / "cluster-stack",
                           console=Console(stderr=True, highlight=False, soft_wrap=True))
    with stack:
        yield stack


@pytest.fixture(scope="session")
def cluster_settings(stack_on_cluster: StackOnCluster) -> Settings:
    values: dict[str, Any] = dict(stack_on_cluster.env)  # the variables' names, parsed as from the environment
    return Settings(**values)


@pytest.fixture(scope="session")
async def cluster_workers(stack_on_cluster: StackOnCluster) -> AsyncIterator[WorkerPool]:
    """Two `python -m workers` processes on the cluster, sharing one task queue; any may be killed."""
    log_dir = STATE_DIR / "cluster-workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = WorkerPool(stack_on_cluster.subprocess_env(), log_dir)
    try:
        await pool.ensure()
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="session")
async def cluster_sessions(cluster_settings: Settings, cluster_workers: WorkerPool) -> SessionClient:
    """A SessionClient on the cluster whose sessions run on the worker processes."""
    return SessionClient(await connect(cluster_settings), cluster_settings, task_queue=TASK_QUEUE)
