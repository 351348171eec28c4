"""No call is lost to a short Temporal outage: `end` sent while the server is down returns the outcome once it is
back (the SDK's own retry budget, about 10 s, is shorter than the outage here), and the session is released once.
Past `temporal_retry_deadline_s` the caller gets `TemporalUnavailable`, and retrying the same call then succeeds."""

from __future__ import annotations

import asyncio
import time

import pytest
from temporalio.api.enums.v1 import EventType

from starters.client import SessionClient, TemporalUnavailable
from tests.support.chaos import TASK_QUEUE, Scenario, bounded
from workflows.models import EndReason, SessionSpec

# Longer than the SDK's own client retry budget (10 retries within 10 s): without our retry, `end` would fail.
OUTAGE_S = 12
LOWERED_DEADLINE_S = 3.0


async def released_once(chaos: Scenario, spec: SessionSpec) -> None:
    """The history holds one accepted `end` and one `delete_room`: the retries reached the session once."""
    history = await chaos.client.handle(spec.session_id).fetch_history()
    deletes = [
        e for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "delete_room"
    ]
    ends = [
        e for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
        and e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name == "end"
    ]
    assert (len(ends), len(deletes)) == (1, 1), f"{len(ends)} end updates accepted, {len(deletes)} room deletes"


async def test_end_sent_during_a_temporal_outage_returns_the_outcome(chaos: Scenario) -> None:
    spec = chaos.spec()
    await chaos.join_human(spec)
    await chaos.live_with_avatar(spec)
    await chaos.kill_service("temporal")
    down = time.monotonic()
    ending = chaos.end_soon(spec, "ended during an outage")  # in flight the whole outage
    # A backend starting meanwhile: its connect waits for the server instead of failing.
    connecting = asyncio.create_task(SessionClient.connect(chaos.settings, task_queue=TASK_QUEUE, wait=60))
    await asyncio.sleep(OUTAGE_S)  # the outage itself, not a wait for something
    assert not ending.done(), f"`end` gave up during the outage: {ending.exception() if ending.done() else ''!r}"
    assert not connecting.done(), f"connect gave up during the outage: {connecting.exception() if connecting.done() else ''!r}"
    took = await chaos.start_service("temporal")
    back = time.monotonic() - down
    outcome = await chaos.ended(ending, timeout=60)
    answered = time.monotonic() - down
    late_client = await bounded("connect to return", connecting, 30)
    # `end` answers once the room and avatar are released; the workflow closes a moment later.
    assert await bounded("the session to close", late_client.outcome(spec.session_id), 30) == outcome
    chaos.note(f"Temporal back {back:.1f} s after the kill ({took:.1f} s to start); `end` answered {answered:.1f} s "
               "after the kill")
    assert outcome.end_reason is EndReason.REQUESTED
    await chaos.settle()
    await released_once(chaos, spec)


@pytest.mark.chaos_long
async def test_an_outage_past_the_deadline_is_a_typed_error_and_a_retry_succeeds(chaos: Scenario) -> None:
    spec = chaos.spec()
    await chaos.join_human(spec)
    await chaos.live_with_avatar(spec)
    impatient = SessionClient(
        chaos.client.client, chaos.settings.model_copy(update={"temporal_retry_deadline_s": LOWERED_DEADLINE_S}),
        task_queue=TASK_QUEUE,
    )
    await chaos.kill_service("temporal")
    chaos.expected[spec.session_id] = "requested"
    chaos.ended_at[spec.session_id] = time.monotonic()
    started = time.monotonic()
    with pytest.raises(TemporalUnavailable, match=rf"session '{spec.session_id}' within 3 s .*safe to retry"):
        await bounded("`end` to give up", impatient.end(spec.session_id, "first try, during the outage"), 60)
    gave_up = time.monotonic() - started
    # The first attempt fails after the SDK's own ~10 s of retries, past the deadline: no second attempt.
    assert gave_up < LOWERED_DEADLINE_S + 15, f"gave up after {gave_up:.1f} s"
    took = await chaos.start_service("temporal")
    outcome = await bounded("the retried `end`", impatient.end(spec.session_id, "retried after the outage"), 60)
    chaos.note(f"TemporalUnavailable after {gave_up:.1f} s (deadline {LOWERED_DEADLINE_S:g} s); Temporal back in "
               f"{took:.1f} s; the retry returned the outcome")
    assert outcome.end_reason is EndReason.REQUESTED
    await chaos.settle()
    await released_once(chaos, spec)
