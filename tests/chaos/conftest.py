"""Fixtures of the chaos suite: its own stack on shifted ports, worker processes, one Scenario per test, and the
summary table printed at the end of the run (and written to .sessionflow/chaos-summary.md).

`make chaos` runs every scenario; `make test` runs the short ones (the long ones are marked `chaos_long`).
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pluggy
import pytest

from sandbox.stack import REPO_ROOT
from starters.client import SessionClient
from tests.support.chaos import (
    RESULTS,
    STACK_ENV,
    SUMMARY_FILE,
    TASK_QUEUE,
    ChaosStack,
    Scenario,
    WorkerPool,
    summary_details,
    summary_table,
)
from workers.temporal import connect


@pytest.fixture(scope="session")
async def chaos_stack() -> AsyncIterator[ChaosStack]:
    """Temporal, LiveKit, the emulator and the gateway on ports shifted by SESSIONFLOW_CHAOS_PORT_OFFSET (500),
    in a fresh state dir (its logs stay there for post-mortems; `make clean` removes them)."""
    base = REPO_ROOT / ".sessionflow"
    base.mkdir(exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix="chaos-", dir=base))
    stack = ChaosStack(extra_env=STACK_ENV, ports=ChaosStack.ports_for_chaos(), state_dir=state_dir)
    async with stack:
        yield stack


@pytest.fixture(scope="session")
async def chaos_client(chaos_stack: ChaosStack) -> SessionClient:
    settings = chaos_stack.settings()
    return SessionClient(await connect(settings), settings, task_queue=TASK_QUEUE)


@pytest.fixture(scope="session")
def workers(chaos_stack: ChaosStack) -> Iterator[WorkerPool]:
    pool = WorkerPool(chaos_stack.subprocess_env(), chaos_stack.state_dir)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture
async def chaos(
    request: pytest.FixtureRequest, chaos_stack: ChaosStack, workers: WorkerPool, chaos_client: SessionClient
) -> AsyncIterator[Scenario]:
    name = request.node.name.removeprefix("test_")
    scenario = Scenario(name, request.node.nodeid, chaos_stack, workers, chaos_client)
    try:
        await scenario.restore()  # every service up and unpaused, no faults, a full worker pool
        yield scenario
    finally:
        await scenario.close()


# Set on a test's item when its call (or setup) failed, so the teardown report can record it.
CHAOS_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "teardown":
        failed = item.stash.get(CHAOS_FAILED, False) or report.failed
        for result in RESULTS:
            if result.nodeid == item.nodeid:
                result.outcome = "FAIL" if failed else "pass"
    elif report.failed:
        item.stash[CHAOS_FAILED] = True


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    table = summary_table(RESULTS)
    terminalreporter.section("chaos summary")
    terminalreporter.write_line(table)
    terminalreporter.write_line("")
    terminalreporter.write_line(summary_details(RESULTS))
    command = "python -m pytest " + shlex.join(sys.argv[1:])
    SUMMARY_FILE.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY_FILE.write_text(f"Produced by: `{command}`\n\n{table}\n\n{summary_details(RESULTS)}\n")
    terminalreporter.write_line(f"(written to {SUMMARY_FILE})")
