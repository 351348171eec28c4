"""`sessionflow show` and `sessionflow list` on a real avatar interview: what support reads, running and closed."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from livekit import api

from activities.liveavatar_client import LiveAvatarClient
from config.settings import DEFAULT_AVATAR_ID
from sandbox.media import join_room
from starters.client import SessionClient
from starters.report import SessionFilter, find_sessions, read_session, render_session, session_filter
from tests.support.livekit import room_names
from tests.support.polling import eventually
from tests.support.specs import interview
from workflows.models import AvatarEndedBy, SessionState, SessionStatus

pytestmark = pytest.mark.stack


async def sessionflow(*args: str) -> tuple[int, str, str]:
    """The CLI as support runs it, in a process of its own with the stack's environment (its `main` exits the
    process). Asynchronous, so this test's worker keeps running meanwhile."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from starters.cli import main; main()", *args,
        env=dict(os.environ), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_show_tells_an_avatar_interview_running_and_closed_and_list_finds_it(sessions: SessionClient) -> None:
    spec = interview()
    grant = await sessions.join(spec, "cand")
    async with join_room(grant.url, grant.token, publish_media=True) as _room:
        state = await eventually(
            lambda: _live_with_avatar(sessions, spec.session_id), what="the avatar to be in the room", timeout=45
        )
        avatar_id, avatar_identity = state.avatar_session_id, state.avatar_identity
        assert avatar_id is not None and avatar_identity is not None

        # Running: from the state query; the avatar is still billing.
        running = await read_session(sessions, spec.session_id)
        assert running.workflow_status == "RUNNING" and running.status == SessionStatus.LIVE.value
        [row] = running.billing
        assert row.avatar_session_id == avatar_id and row.ended_at is None and row.ended_by is None
        text = render_session(running)
        assert f"session {spec.session_id} (interview)" in text and "ends at:" in text
        assert f"{avatar_id}  {avatar_identity}" in text and " billing " in text, text
        assert "so far" in text and "total billed so far:" in text, text

        outcome = await sessions.end(spec.session_id, "interview over")

    # Closed (`end` answers once everything is released; the workflow closes just after): from the outcome
    # recorded in the memo.
    assert await asyncio.wait_for(sessions.handle(spec.session_id).result(), timeout=30) == outcome
    closed = await read_session(sessions, spec.session_id)
    assert closed.workflow_status == "COMPLETED" and closed.status == SessionStatus.ENDED.value
    assert closed.billing == outcome.avatar_billing
    [row] = closed.billing
    assert row.avatar_session_id == avatar_id and row.identity == avatar_identity
    assert row.started_at is not None and row.ended_at is not None and row.seconds > 0
    assert row.end_reason == "session ended: requested" and row.ended_by is AvatarEndedBy.SESSIONFLOW

    # The CLI prints exactly that report (a closed session's report does not change).
    rc, stdout, stderr = await sessionflow("show", spec.session_id)
    assert (rc, stderr) == (0, "")
    assert stdout == render_session(closed) + "\n"
    lines = stdout.splitlines()
    assert lines[0] == f"session {spec.session_id} (interview)"
    assert "  workflow:   COMPLETED" in lines and "  status:     ended" in lines
    assert "  end reason: requested (interview over)" in lines
    assert any(line.startswith("  started:    ") for line in lines) and any(line.startswith("  ended:      ") for line in lines)
    assert any("end requested (interview over)" in line for line in lines)  # the timeline
    assert any(f"done: start avatar {avatar_id} (billing starts)" in line for line in lines)
    [billing_row] = [line for line in lines if line.lstrip().startswith(avatar_id)]
    assert avatar_identity in billing_row and f"{row.seconds:.1f}" in billing_row
    assert billing_row.rstrip().endswith("session ended: requested  sessionflow")
    assert lines[-1] == f"Temporal UI: {sessions.ui_url(spec.session_id)}"

    # `list --status ended` finds it through visibility (which lags the close a little).
    ended_interviews = session_filter("ended", "interview", 1000)
    await eventually(
        lambda: _listed(sessions, ended_interviews, spec.session_id), what="the session in visibility as ended", timeout=20
    )
    rc, stdout, stderr = await sessionflow("list", "--status", "ended", "--kind", "interview", "--limit", "1000")
    assert (rc, stderr) == (0, "")
    header, *rows = stdout.splitlines()
    assert header.split() == ["SESSION", "KIND", "STATUS", "END", "REASON", "STARTED", "(UTC)"]
    [ours] = [r for r in rows if r.split()[0] == spec.session_id]
    assert ours.split()[1:4] == ["interview", "ended", "requested"]  # the end reason: its `end` request
    assert all(r.split()[1:3] == ["interview", "ended"] for r in rows)
    rc, stdout, _ = await sessionflow("list", "--status", "live", "--limit", "1000")
    assert rc == 0 and spec.session_id not in stdout


async def test_show_of_a_terminated_session_names_the_avatar_sessions_it_recorded(
    sessions: SessionClient, livekit: api.LiveKitAPI, liveavatar: LiveAvatarClient
) -> None:
    spec = interview(avatar={"avatar_id": DEFAULT_AVATAR_ID, "start": "immediately"})
    await sessions.join(spec, "cand")  # nobody connects: the avatar starts with the room all the same
    state = await eventually(
        lambda: _avatar_billing(sessions, spec.session_id), what="the avatar to start billing", timeout=45
    )
    avatar_id = state.avatar_session_id
    assert avatar_id is not None
    await sessions.handle(spec.session_id).terminate(reason="test: an operator terminated it")

    # A terminate records no outcome: show says so and names the avatar sessions from the search attribute.
    report = await read_session(sessions, spec.session_id)
    assert report.workflow_status == "TERMINATED" and report.billing == []
    assert report.billing_note is not None and "terminated by an operator and recorded no outcome" in report.billing_note
    assert report.billing_note.endswith(f"avatar sessions it recorded: {avatar_id}")
    text = render_session(report)
    assert "  no avatar sessions" in text and f"  {report.billing_note}" in text
    assert any(line.endswith("session workflow TERMINATED: test: an operator terminated it") for line in text.splitlines()), text

    async def released() -> bool:  # by the keep-alive net, as for any terminated session
        return await room_names(livekit, spec.room_name) == [] and (await liveavatar.get_session(avatar_id)).is_ended

    await eventually(released, what="the keep-alive net to release the room and the avatar", timeout=60)


async def test_show_of_a_session_that_never_existed_says_so(sessions: SessionClient) -> None:
    rc, stdout, stderr = await sessionflow("show", "never-started-0")
    assert rc == 2 and stdout == ""
    assert stderr.startswith("sessionflow: error: no session 'never-started-0'") and "never started" in stderr


async def _live_with_avatar(sessions: SessionClient, session_id: str) -> SessionState | None:
    """The state once the avatar is in the room and its start is recorded (it may join before its start returns)."""
    state = await sessions.state(session_id)
    started = [b for b in state.avatar_billing if b.started_at is not None]
    return state if state.status is SessionStatus.LIVE and state.avatar_present and started else None


async def _avatar_billing(sessions: SessionClient, session_id: str) -> SessionState | None:
    state = await sessions.state(session_id)
    return state if any(b.started_at is not None for b in state.avatar_billing) else None


async def _listed(sessions: SessionClient, which: SessionFilter, session_id: str) -> bool:
    return session_id in [r.session_id for r in await find_sessions(sessions.client, which)]
