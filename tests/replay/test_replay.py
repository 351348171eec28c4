"""Every recorded session history must replay against the current workflow code.

The corpus (tests/replay/histories) only grows: `make record-histories` adds `<path>.<version>.json` files and
never overwrites one. A failure here means a change would break sessions that are running while it deploys:
guard the change with `workflow.patched(...)` (see `workflows/session.py`), never re-record to make this pass.
The second half shows the corpus catches regressions: each deliberate mutation of the decision core makes the
history of the path it changes fail to replay.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

from tests.support.mutations import MUTATIONS
from workflows.machine import CarriedSession, SessionMachine
from workflows.models import SessionOutcome, SessionSpec
from workflows.session import QUICK, SessionWorkflow

# This module defines a workflow (below), so the workflow sandbox re-imports it; the codec's native crypto
# library cannot be imported twice and has no business in a workflow: it passes through.
with workflow.unsafe.imports_passed_through():
    from tests.support.codec import corpus_data_converter

HISTORY_DIR = Path(__file__).parent / "histories"
HISTORIES = sorted(HISTORY_DIR.glob("*.json"))
# Every path a running session can take (tests/support/replay_scenarios.py), plus the first three recorded (v1).
EXPECTED = {
    "full_avatar_interview", "observer_only", "ended_then_join_refused",
    *(f"{name}.v2" for name in (
        "interview_happy_path", "coaching_happy_path", "avatar_crash_and_replacement", "avatar_rotation",
        "participant_lost", "no_show", "max_duration", "extend", "end_during_avatar_start", "cancel",
        "terminate_live", "worker_killed_mid_start", "livekit_down", "room_create_fails", "cancel_after_end",
    )),
    # The join's token minted by a local activity (workflow.patched("local-token")).
    *(f"{name}.v3" for name in ("interview_happy_path", "coaching_happy_path", "livekit_down")),
    # Participant tokens bounded by the hard cap (workflow.patched("token-ttl-within-session")), rooms named with
    # the deployment.
    # ...and recording only with consent (spec.recording, the `consent` update).
    *(f"{name}.v5" for name in ("interview_happy_path", "coaching_happy_path", "consent_recording", "consent_recording_refused")),
    # The status upsert carries SessionDegraded, SessionEndReason, AvatarBilledSeconds ("support-search-attributes").
    *(f"{name}.v6" for name in ("interview_happy_path", "avatar_crash_and_replacement", "cancel")),
    # The room created by a local activity, the join answered in the first workflow task ("local-room-create"):
    # update-with-start, LiveKit down at the create (retried in the worker), a final refusal, a lost room re-created.
    *(f"{name}.v7-local-room" for name in (
        "join_with_start", "interview_happy_path", "livekit_down", "room_create_fails", "monitor_room_lost",
    )),
    # The room monitor (workflow.patched("room-monitor")): its reports, a lost room, a frozen avatar.
    *(f"{name}.v4" for name in ("monitor_quality_and_tracks", "monitor_room_lost", "monitor_avatar_frozen")),
    # The monitor watches the avatar's audio and first frames (workflow.patched("avatar-media-watch")).
    "monitor_avatar_silent.v7",
    # Continue-as-new (workflow.patched("continue-as-new")): a first run ending in the switch, a last run started
    # from the carried state.
    "continue_as_new.v7", "continued_as_new.v7",
}


def load(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(f"replay-{path.stem}", path.read_text())


async def replay(path: Path, workflow_class: type = SessionWorkflow) -> BaseException | None:
    replayer = Replayer(workflows=[workflow_class], data_converter=corpus_data_converter())
    return (await replayer.replay_workflow(load(path), raise_on_replay_failure=False)).replay_failure


def test_the_corpus_holds_every_path() -> None:
    names = {p.stem for p in HISTORIES}
    assert names >= EXPECTED, f"recorded histories missing: {sorted(EXPECTED - names)}; run `make record-histories`"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_recorded_history_replays(path: Path) -> None:
    assert await replay(path) is None


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
async def test_each_mutation_of_the_decision_core_fails_the_replay_of_its_path(
    mutation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    method, replacement, history = MUTATIONS[mutation]
    path = HISTORY_DIR / f"{history}.json"
    assert await replay(path) is None  # the history itself is fine
    monkeypatch.setattr(SessionMachine, method, replacement)
    failure = await replay(path)
    assert isinstance(failure, NondeterminismError), f"{mutation!r} went unnoticed by {history}: {failure!r}"


@workflow.defn(name="SessionWorkflow")
class SessionWorkflowWithAnExtraStep(SessionWorkflow):
    """A careless change: one more activity before the session starts, without `workflow.patched`."""

    @workflow.run
    async def run(self, start: SessionSpec | CarriedSession) -> SessionOutcome:
        await workflow.execute_activity("prewarm_avatar", start_to_close_timeout=timedelta(seconds=5), retry_policy=QUICK)
        return await super().run(start)


@pytest.mark.parametrize("history", ["full_avatar_interview", "interview_happy_path.v2"])
async def test_a_careless_change_fails_replay(history: str) -> None:
    failure = await replay(HISTORY_DIR / f"{history}.json", SessionWorkflowWithAnExtraStep)
    assert isinstance(failure, NondeterminismError)
