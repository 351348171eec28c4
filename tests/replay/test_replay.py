"""Recorded session histories must replay against the current workflow code.

A failure here means a change would break sessions that are running while it deploys: guard the change with
`workflow.patched(...)`, or (for a deliberate, deploy-safe change) re-record with `make record-histories`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

from workers.temporal import data_converter
from workflows.models import SessionOutcome, SessionSpec
from workflows.session import QUICK, SessionWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def load(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(f"replay-{path.stem}", path.read_text())


def test_histories_are_recorded() -> None:
    names = {p.stem for p in HISTORIES}
    assert {"full_avatar_interview", "observer_only", "ended_then_join_refused"} <= names, (
        f"recorded histories missing (have {sorted(names)}): run `make record-histories`"
    )


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_recorded_history_replays(path: Path) -> None:
    result = await Replayer(workflows=[SessionWorkflow], data_converter=data_converter()).replay_workflow(load(path))
    assert result.replay_failure is None


@workflow.defn(name="SessionWorkflow")
class SessionWorkflowWithAnExtraStep(SessionWorkflow):
    """A careless change: one more activity before the room is created, without `workflow.patched`."""

    @workflow.run
    async def run(self, spec: SessionSpec) -> SessionOutcome:
        return await super().run(spec)

    async def _create_room(self) -> None:
        await workflow.execute_activity(
            "prewarm_avatar", start_to_close_timeout=timedelta(seconds=5), retry_policy=QUICK
        )
        await super()._create_room()


@pytest.mark.parametrize("path", HISTORIES[:1], ids=[p.stem for p in HISTORIES[:1]])
async def test_a_non_deterministic_change_fails_replay(path: Path) -> None:
    replayer = Replayer(workflows=[SessionWorkflowWithAnExtraStep], data_converter=data_converter())
    with pytest.raises(NondeterminismError):
        await replayer.replay_workflow(load(path))
