"""Continue-as-new in the middle of a session on the real stack (issue 8, item 6): a real participant in the room,
the emulator's avatar live, the room monitor watching. With a lowered threshold the session switches runs; nothing
is restarted, leaked or lost: the same LiveKit room (its sid), the same avatar session billing on, the participant
still present, what happens after the switch reflected, no event lost or doubled in the timeline across the runs,
and `end` releases everything with an outcome that covers the whole session."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from livekit import api
from temporalio.client import Client, WorkflowHistory

from activities.liveavatar_client import LiveAvatarClient, SessionEndReason
from config.settings import Settings
from sandbox.media import join_room
from starters.client import SessionClient
from starters.report import read_session
from starters.timeline import session_histories, timeline
from tests.support.polling import eventually
from tests.support.specs import interview
from workers.codec import decode_history
from workers.worker import build_media_worker, build_worker
from workflows.models import SessionState, SessionStatus, avatar_identity_prefix, monitor_identity_for

pytestmark = pytest.mark.stack

THRESHOLD = 60  # history events: a few minutes of a real session, instead of thousands


@pytest.fixture(scope="module")
async def long_sessions(temporal: Client, stack: Settings) -> AsyncIterator[SessionClient]:
    """Sessions that continue as new after THRESHOLD events, on workers of this module's own (a media one too)."""
    settings = stack.model_copy(
        update={"media_task_queue": f"media-{uuid.uuid4().hex[:10]}", "continue_as_new_after_events": THRESHOLD}
    )
    task_queue = f"it-{uuid.uuid4().hex[:10]}"
    async with build_worker(temporal, settings, task_queue=task_queue), build_media_worker(temporal, settings):
        yield SessionClient(temporal, settings, task_queue=task_queue)


async def _runs(sessions: SessionClient, workflow_id: str) -> list[WorkflowHistory]:
    return await session_histories(sessions.client, workflow_id)


async def _room(livekit: api.LiveKitAPI, name: str) -> api.Room | None:
    listed = await livekit.room.list_rooms(api.ListRoomsRequest(names=[name]))
    return next((r for r in listed.rooms if r.name == name), None)


async def _in_room(livekit: api.LiveKitAPI, name: str) -> list[str]:
    listed = await livekit.room.list_participants(api.ListParticipantsRequest(room=name))
    return sorted(p.identity for p in listed.participants)


async def _state_when(sessions: SessionClient, session_id: str, ok: object) -> SessionState | None:
    state = await sessions.state(session_id)
    return state if ok(state) else None  # type: ignore[operator]  # a predicate on the state


async def test_a_session_continues_as_new_with_a_participant_and_the_avatar_live_and_nothing_is_lost(
    long_sessions: SessionClient, livekit: api.LiveKitAPI, liveavatar: LiveAvatarClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    sessions = long_sessions
    spec = interview()
    grant = await sessions.join(spec, "cand")
    async with join_room(grant.url, grant.token, publish_media=True):
        before = await eventually(
            lambda: _state_when(sessions, spec.session_id, lambda s: s.status is SessionStatus.LIVE and s.avatar_present
                                and s.present == ["cand"] and s.monitored and s.tracks.get("cand") == ["audio", "video"]
                                and bool(s.avatar_billing) and s.avatar_billing[0].started_at is not None),
            what="cand, the avatar and the monitor in the room", timeout=60,
        )
        avatar_id, avatar_identity = before.avatar_session_id, before.avatar_identity
        assert avatar_id is not None and avatar_identity is not None
        room_before = await _room(livekit, spec.room_name)
        assert room_before is not None
        run_before = (await sessions.handle(spec.session_id).describe()).run_id
        runs_before = len(await _runs(sessions, spec.workflow_id))
        # Push the history over the threshold with what a session really gets: extends (updates) here.
        extended = 0
        while len(await _runs(sessions, spec.workflow_id)) == runs_before:
            assert extended < 30, "the session never continued as new"
            await sessions.extend(spec.session_id, timedelta(seconds=30))
            extended += 1
        runs = await _runs(sessions, spec.workflow_id)
        switched_at = datetime.now(UTC)
        assert (await sessions.handle(spec.session_id).describe()).run_id != run_before

        # The new run watches the same room: its monitor is in (the old one gave it the place), nothing restarted.
        monitor = monitor_identity_for(spec.session_id)
        await eventually(
            lambda: _state_when(sessions, spec.session_id, lambda s: s.monitored), what="the new run's monitor", timeout=30
        )
        after = await sessions.state(spec.session_id)
        assert after.present == ["cand"] and after.avatar_present and after.status is SessionStatus.LIVE
        assert after.avatar_session_id == avatar_id and len(after.avatar_billing) == 1
        assert after.avatar_billing[0].started_at == before.avatar_billing[0].started_at
        assert after.started_at == before.started_at
        assert after.ends_at == before.ends_at + timedelta(seconds=30 * extended)
        room_after = await _room(livekit, spec.room_name)
        assert room_after is not None and room_after.sid == room_before.sid, "the room was re-created"
        in_room = await eventually(
            lambda: _only_one_monitor(livekit, spec.room_name, monitor), what="one monitor in the room", timeout=30
        )
        avatars_in_room = [i for i in in_room if i.startswith(avatar_identity_prefix(spec.session_id))]
        assert avatars_in_room == [avatar_identity] and "cand" in in_room
        # The old run's keep-alive found its run closed and left the avatar alone (the session runs on).
        await eventually(
            lambda: any("the session runs on in another run" in r.getMessage() for r in caplog.records),
            what="the old run's keep-alive to stop without releasing anything", timeout=30,
        )
        assert not (await liveavatar.get_session(avatar_id)).is_ended, "the avatar was stopped by the switch"

        # After the switch: a second person comes and goes, and the session is extended once more.
        watcher = await sessions.join_running(spec.session_id, "watcher")
        async with join_room(watcher.url, watcher.token, publish_media=False):
            await eventually(
                lambda: _state_when(sessions, spec.session_id, lambda s: s.present == ["cand", "watcher"]),
                what="the watcher present", timeout=20,
            )
        await eventually(
            lambda: _state_when(sessions, spec.session_id, lambda s: s.present == ["cand"] and s.reconnecting == ["watcher"]),
            what="the watcher gone", timeout=20,
        )
        extended_state = await sessions.extend(spec.session_id, timedelta(minutes=1))
        assert extended_state.ends_at == after.ends_at + timedelta(minutes=1)
        ended_at = datetime.now(UTC)
        outcome = await sessions.end(spec.session_id, "interview over")

    # Everything released: the room, the one avatar session (stopped by our end, not before).
    assert await _room(livekit, spec.room_name) is None
    entry = await liveavatar.get_session(avatar_id)
    assert entry.is_ended and entry.end_reason is SessionEndReason.USER_CLOSED
    assert entry.end_at is None or entry.end_at >= ended_at - timedelta(seconds=2)
    active = await liveavatar.list_sessions("active", page_size=100)
    assert avatar_id not in [s.id for s in active.results]
    # The outcome covers the whole session, from the first run's start.
    assert outcome.started_at == before.started_at and outcome.avatar_sessions == [avatar_id]
    billed = outcome.avatar_billing[0]
    assert billed.started_at == before.avatar_billing[0].started_at and billed.ended_at is not None
    assert billed.ended_at > switched_at and outcome.avatar_seconds == pytest.approx(billed.seconds)
    assert outcome.participants_joined == ["cand", "watcher"]
    assert set(outcome.handoff.participants) >= {"cand", "watcher"} and outcome.handoff.avatar_join_s
    assert outcome.handoff.participants["watcher"].connect_s is not None

    # Support's story reads across the runs: each happening once.
    histories = await _runs(sessions, spec.workflow_id)
    lengths = [len(h.events) for h in histories]
    print(f"\nhistory events per run: {lengths} (threshold {THRESHOLD}); first switch after {len(runs[0].events)}")
    converter = sessions.client.data_converter
    decoded = [await decode_history(h, converter.payload_codec) for h in histories]
    lines = [m.text for m in timeline(decoded, converter)]
    participant_lines = [line.split("(", 1)[1].split(")")[0] for line in lines if "participant_" in line]
    assert participant_lines.count("participant_joined, cand") == 1
    assert participant_lines.count("participant_joined, watcher") == 1
    assert participant_lines.count("participant_left, watcher") == 1
    assert participant_lines.count(f"participant_joined, {avatar_identity}") == 1
    assert sum("continued as new" in line for line in lines) == len(histories) - 1 >= 1
    assert sum(line.startswith("extend requested") for line in lines) == extended + 1
    assert sum("create room" in line for line in lines) == 1, "the room was created again"
    assert sum("(billing starts)" in line for line in lines) == 1, "an avatar was started again"
    report = await read_session(sessions, spec.session_id)
    assert report.moments == timeline(decoded, converter) and report.status == "ended"


async def _only_one_monitor(livekit: api.LiveKitAPI, room: str, monitor: str) -> list[str] | None:
    in_room = await _in_room(livekit, room)
    return in_room if in_room.count(monitor) == 1 else None
