"""The room monitor on the real stack: a real participant joining, publishing, unpublishing and leaving shows in
the session's state within 2 s from the monitor alone (the gateway paused, so no webhook arrives), and again
from webhooks alone (no media worker); the late webhooks that arrive once the gateway resumes change nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from livekit import api
from temporalio.client import Client

from config.settings import DEFAULT_AVATAR_ID, Settings
from sandbox.media import SyntheticMedia, join_room
from sandbox.stack import REPO_ROOT, LocalStack
from starters.client import SessionClient
from starters.timeline import timeline
from tests.support.polling import eventually
from tests.support.specs import interview
from workers.codec import decode_history
from workers.worker import build_media_worker, build_worker
from workflows.models import SessionState, SessionStatus, monitor_identity_for

pytestmark = pytest.mark.stack

WITHIN_S = 2.0  # the bound: participant action to workflow state


@pytest.fixture(scope="module")
async def monitored(temporal: Client, stack: Settings) -> AsyncIterator[SessionClient]:
    """Sessions on a worker of this module's own, with a media worker of its own serving their monitors."""
    settings = stack.model_copy(update={"media_task_queue": f"media-{uuid.uuid4().hex[:10]}"})
    task_queue = f"it-{uuid.uuid4().hex[:10]}"
    async with build_worker(temporal, settings, task_queue=task_queue), build_media_worker(temporal, settings):
        yield SessionClient(temporal, settings, task_queue=task_queue)


@pytest.fixture(scope="module")
async def unmonitored(temporal: Client, stack: Settings) -> AsyncIterator[SessionClient]:
    """Sessions whose media task queue no worker serves: their monitor never runs, only webhooks arrive."""
    settings = stack.model_copy(update={"media_task_queue": f"nobody-{uuid.uuid4().hex[:10]}"})
    task_queue = f"it-{uuid.uuid4().hex[:10]}"
    async with build_worker(temporal, settings, task_queue=task_queue):
        yield SessionClient(temporal, settings, task_queue=task_queue)


@contextmanager
def gateway_paused() -> Iterator[None]:
    """No webhook reaches any session meanwhile (the gateway is frozen; LiveKit's deliveries wait or drop)."""
    stack = LocalStack.attach()
    if stack is None:
        pytest.fail("no stack state file: run under `python -m sandbox exec` (make test)", pytrace=False)
    stack.pause("gateway")
    try:
        yield
    finally:
        stack.resume("gateway")


async def _in_time(sessions: SessionClient, session_id: str, what: str, ok: Callable[[SessionState], bool]) -> float:
    """Seconds until the session's state satisfies `ok`; fails past WITHIN_S."""
    started = time.monotonic()

    async def check() -> SessionState | None:
        state = await sessions.state(session_id)
        return state if ok(state) else None

    await eventually(check, what=what, timeout=WITHIN_S, every=0.05)
    return time.monotonic() - started


async def _monitor_in(livekit: api.LiveKitAPI, room: str, session_id: str) -> bool:
    listed = await livekit.room.list_participants(api.ListParticipantsRequest(room=room))
    return any(p.identity == monitor_identity_for(session_id) for p in listed.participants)


async def _walk(sessions: SessionClient, livekit: api.LiveKitAPI, *, monitor: bool) -> tuple[str, dict[str, float]]:
    """Join, publish, unpublish, leave; each reflected within WITHIN_S. Returns the session id and the seconds
    each took."""
    spec = interview(avatar=None)
    grant = await sessions.join(spec, "cand")
    if monitor:
        in_room = lambda: _monitor_in(livekit, spec.room_name, spec.session_id)  # noqa: E731
        await eventually(in_room, what="the monitor in the room", timeout=20)
    took: dict[str, float] = {}
    # A real participant: camera and microphone from the moment they connect.
    async with join_room(grant.url, grant.token, publish_media=False) as room:
        media = SyntheticMedia()
        await media.start(room)
        took["joined"] = await _in_time(sessions, spec.session_id, "cand present", lambda s: s.present == ["cand"])
        if monitor:
            took["published"] = await _in_time(
                sessions, spec.session_id, "both tracks", lambda s: s.tracks == {"cand": ["audio", "video"]}
            )
            started = time.monotonic()
            await room.local_participant.unpublish_track(media.track_sids[0])  # the camera goes off
            took["unpublished"] = await _in_time(
                sessions, spec.session_id, "video unpublished", lambda s: s.tracks == {"cand": ["audio"]}
            ) + (time.monotonic() - started)
        await media.stop(unpublish=False)
    took["left"] = await _in_time(
        sessions, spec.session_id, "cand gone", lambda s: s.present == [] and s.reconnecting == ["cand"]
    )
    return spec.session_id, took


async def test_the_monitor_alone_reflects_a_participant_within_2_s_and_late_webhooks_change_nothing(
    monitored: SessionClient, livekit: api.LiveKitAPI
) -> None:
    with gateway_paused():
        spec_id, took = await _walk(monitored, livekit, monitor=True)
        state = await monitored.state(spec_id)
    # The webhooks LiveKit held back arrive now (joined, left: news older than the monitor's): nothing moves.
    await eventually(lambda: _gateway_answers(monitored.settings), what="the gateway answering again", timeout=20)
    after = await monitored.state(spec_id)
    assert after.present == state.present == [] and after.reconnecting == ["cand"]
    assert after.status is SessionStatus.DEGRADED
    print(f"monitor alone, seconds to state: {took}")
    await monitored.end(spec_id, "done")
    assert await _participant_lines(monitored, spec_id) == ["participant_joined, cand", "participant_left, cand"]


async def test_webhooks_alone_reflect_a_participant_within_2_s(unmonitored: SessionClient, livekit: api.LiveKitAPI) -> None:
    spec_id, took = await _walk(unmonitored, livekit, monitor=False)
    state = await unmonitored.state(spec_id)
    assert state.tracks == {} and state.present == []
    print(f"webhooks alone, seconds to state: {took}")
    await unmonitored.end(spec_id, "done")
    assert await _participant_lines(unmonitored, spec_id) == ["participant_joined, cand", "participant_left, cand"]


async def _participant_lines(sessions: SessionClient, session_id: str) -> list[str]:
    """The joins and leaves in the session's timeline (each happening once, whichever source told it)."""
    converter = sessions.client.data_converter  # payloads are encrypted at rest: decode before reading
    history = await decode_history(await sessions.handle(session_id).fetch_history(), converter.payload_codec)
    lines = [m.text for m in timeline(history, converter)]
    return [line.split("(", 1)[1].split(")")[0] for line in lines if "participant_" in line]


@contextmanager
def media_worker(task_queue: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m workers --media` on `task_queue`, as deployed (its own process, which a test may kill -9)."""
    env = os.environ | {"SESSIONFLOW_MEDIA_TASK_QUEUE": task_queue, "SESSIONFLOW_LOG_FORMAT": "json"}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workers", "--media"], env=env, stdout=out, stderr=out, cwd=REPO_ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def test_a_killed_media_worker_is_replaced_and_the_new_monitor_catches_up_without_doubles(
    temporal: Client, stack: Settings, livekit: api.LiveKitAPI, tmp_path: Path
) -> None:
    settings = stack.model_copy(update={"media_task_queue": f"media-{uuid.uuid4().hex[:10]}"})
    task_queue = f"it-{uuid.uuid4().hex[:10]}"
    sessions = SessionClient(temporal, settings, task_queue=task_queue)
    spec = interview(avatar=None)
    async with build_worker(temporal, settings, task_queue=task_queue):
        with media_worker(settings.media_task_queue, tmp_path / "media-1.log") as first, gateway_paused():
            cand = await sessions.join(spec, "cand")
            watcher = await sessions.join_running(spec.session_id, "watcher")
            in_room = lambda: _monitor_in(livekit, spec.room_name, spec.session_id)  # noqa: E731
            await eventually(in_room, what="the first monitor in the room", timeout=30)
            async with join_room(cand.url, cand.token, publish_media=True):
                await eventually(lambda: _state_has(sessions, spec.session_id, ["cand"]), what="cand present", timeout=5)
                await asyncio.sleep(1.5)  # the snapshot that says so is heartbeated (throttled to 1 s)
                first.send_signal(signal.SIGKILL)
                first.wait(10)
                # While no monitor runs: cand leaves and the watcher comes in. Nobody tells the session yet.
            async with join_room(watcher.url, watcher.token, publish_media=False):
                with media_worker(settings.media_task_queue, tmp_path / "media-2.log"):
                    state = await eventually(
                        lambda: _state_has(sessions, spec.session_id, ["watcher"]),
                        what="the new monitor to catch up (watcher in, cand gone)", timeout=30,
                    )
                    assert state.reconnecting == ["cand"]
                    await sessions.end(spec.session_id, "done")
    assert await _participant_lines(sessions, spec.session_id) == [
        "participant_joined, cand", "participant_left, cand", "participant_joined, watcher",
    ]


async def _state_has(sessions: SessionClient, session_id: str, present: list[str]) -> SessionState | None:
    state = await sessions.state(session_id)
    return state if state.present == present else None


async def _gateway_answers(s: Settings) -> bool:
    async with httpx.AsyncClient(timeout=1) as http:
        try:
            return (await http.get(f"http://{s.gateway_host}:{s.gateway_port}/healthz")).status_code == 200
        except httpx.HTTPError:
            return False


async def test_a_frozen_avatar_is_seen_by_the_monitor_and_replaced(monitored: SessionClient, stack: Settings) -> None:
    spec = interview(
        avatar={"avatar_id": DEFAULT_AVATAR_ID, "replace_backoff": "PT1S"}, quality={"avatar_frozen_after": "PT3S"}
    )
    grant = await monitored.join(spec, "cand")
    async with join_room(grant.url, grant.token, publish_media=True):
        first = await eventually(
            lambda: _state_where(monitored, spec.session_id, lambda s: s.avatar_present and "avatar" in str(s.tracks)),
            what="the avatar in the room with its video, seen by the monitor", timeout=45,
        )
        async with httpx.AsyncClient(base_url=stack.liveavatar_api_url, timeout=5) as http:
            response = await http.post(f"/_control/sessions/{first.avatar_session_id}/freeze")
            response.raise_for_status()
        replaced = await eventually(
            lambda: _state_where(
                monitored, spec.session_id,
                lambda s: s.avatar_present and s.avatar_session_id != first.avatar_session_id,
            ),
            what="a replacement avatar in the room", timeout=45,
        )
        assert replaced.avatar_billing[0].end_reason is not None and "froze" in replaced.avatar_billing[0].end_reason
        assert any("replacement 1 after: the avatar's video froze" in r for r in replaced.recoveries)
        await monitored.end(spec.session_id, "done")


async def _emulator_sessions(stack: Settings) -> dict[str, dict[str, object]]:
    """Every avatar session the emulator knows, by id (state, presence in the room)."""
    async with httpx.AsyncClient(base_url=stack.liveavatar_api_url, timeout=5) as http:
        listed = (await http.get("/_control/sessions")).json()["data"]["sessions"]
    return {str(s["id"]): s for s in listed}


async def _silence(stack: Settings, avatar_session_id: str, mode: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.liveavatar_api_url, timeout=5) as http:
        return await http.post(f"/_control/sessions/{avatar_session_id}/silence", json={"mode": mode})


async def _avatar_live_with_audio(sessions: SessionClient, session_id: str) -> SessionState | None:
    """The avatar in the room with both its tracks seen by the monitor, and its first frame timed."""
    state = await sessions.state(session_id)
    identity = state.avatar_identity
    ok = state.avatar_present and identity is not None and state.tracks.get(identity) == ["audio", "video"]
    return state if ok and state.handoff.avatar_first_frame_s else None


@pytest.mark.parametrize("mode", ["mute", "unpublish"])
async def test_a_silent_avatar_is_seen_by_the_monitor_and_replaced(
    monitored: SessionClient, stack: Settings, livekit: api.LiveKitAPI, mode: str
) -> None:
    """`mute`: its audio track stays published but no packet reaches the room; `unpublish`: no audio track."""
    spec = interview(
        avatar={"avatar_id": DEFAULT_AVATAR_ID, "replace_backoff": "PT1S"}, quality={"avatar_silent_after": "PT4S"}
    )
    grant = await monitored.join(spec, "cand")
    async with join_room(grant.url, grant.token, publish_media=True):
        first = await eventually(
            lambda: _avatar_live_with_audio(monitored, spec.session_id),
            what="the avatar in the room with audio and video, its first frame seen", timeout=45,
        )
        assert first.avatar_session_id is not None and first.avatar_identity is not None
        refused = await _silence(stack, first.avatar_session_id, "loud")
        assert refused.status_code == 422  # strict: nothing changed
        (await _silence(stack, first.avatar_session_id, mode)).raise_for_status()
        replaced = await eventually(
            lambda: _state_where(
                monitored, spec.session_id,
                lambda s: s.avatar_present and s.avatar_session_id != first.avatar_session_id
                and len(s.handoff.avatar_replacement_s) == 1,
            ),
            what="a replacement avatar in the room, its first frame seen", timeout=45,
        )
        old = replaced.avatar_billing[0]
        assert old.end_reason is not None and "went silent" in old.end_reason, old.end_reason
        assert old.ended_at is not None  # stopped: no longer billed
        assert any("replacement 1 after: the avatar went silent" in r for r in replaced.recoveries)
        # The new avatar is really in the room; the old one is not, and LiveAvatar has ended its session.
        listed = await livekit.room.list_participants(api.ListParticipantsRequest(room=spec.room_name))
        identities = {p.identity for p in listed.participants}
        assert replaced.avatar_identity in identities and first.avatar_identity not in identities
        emulated = await _emulator_sessions(stack)
        assert emulated[first.avatar_session_id]["state"] == "ended"
        assert emulated[str(replaced.avatar_session_id)]["state"] == "active"
        outcome = await monitored.end(spec.session_id, "done")
    # Nothing leaks: every avatar session ended, the room gone.
    emulated = await _emulator_sessions(stack)
    assert all(emulated[b.avatar_session_id]["state"] == "ended" for b in outcome.avatar_billing)
    rooms = await livekit.room.list_rooms(api.ListRoomsRequest(names=[spec.room_name]))
    assert not rooms.rooms
    handoff = outcome.handoff
    # One first frame per avatar that showed one; each replacement repaired one loss. (On a loaded machine a
    # replacement may itself be replaced: these count, they are not fixed.)
    assert len(handoff.avatar_first_frame_s) >= 2 and len(handoff.avatar_first_frame_s) <= len(outcome.avatar_billing)
    assert 1 <= len(handoff.avatar_replacement_s) < len(handoff.avatar_first_frame_s)
    # Replacement: from the loss, so at least the backoff (1 s); and it ends with the replacement's first frame.
    assert handoff.avatar_replacement_s[0] >= 1.0
    print(f"silent avatar ({mode}): first frames after {handoff.avatar_first_frame_s} s, "
          f"in the room after {handoff.avatar_join_s} s, replaced in {handoff.avatar_replacement_s} s")


async def test_a_quiet_avatar_is_not_silent_but_a_muted_one_is(monitored: SessionClient, stack: Settings) -> None:
    """An avatar that listens sends silence (a few packets a second): over three windows it is never reported;
    muted afterwards, it is, which shows the monitor was watching all along."""
    window_s = 3
    spec = interview(
        avatar={"avatar_id": DEFAULT_AVATAR_ID, "replace_backoff": "PT1S"},
        quality={"avatar_silent_after": f"PT{window_s}S"},
    )
    grant = await monitored.join(spec, "cand")
    async with join_room(grant.url, grant.token, publish_media=True):
        first = await eventually(
            lambda: _avatar_live_with_audio(monitored, spec.session_id),
            what="the avatar in the room with audio and video", timeout=45,
        )
        assert first.avatar_session_id is not None
        (await _silence(stack, first.avatar_session_id, "quiet")).raise_for_status()
        quiet_until = time.monotonic() + 3 * window_s
        while time.monotonic() < quiet_until:  # the whole time, the same avatar serves
            state = await monitored.state(spec.session_id)
            assert state.avatar_session_id == first.avatar_session_id and not state.recoveries, state.recoveries
            await asyncio.sleep(0.25)
        (await _silence(stack, first.avatar_session_id, "mute")).raise_for_status()
        replaced = await eventually(
            lambda: _state_where(monitored, spec.session_id, lambda s: s.avatar_session_id != first.avatar_session_id),
            what="the muted avatar replaced", timeout=30,
        )
        assert "went silent" in (replaced.avatar_billing[0].end_reason or "")
        await monitored.end(spec.session_id, "done")


async def _state_where(sessions: SessionClient, session_id: str, ok: Callable[[SessionState], bool]) -> SessionState | None:
    state = await sessions.state(session_id)
    return state if ok(state) else None


# ---- an impaired link: the participant in a network namespace of its own, its loopback shaped with tbf -------


@contextmanager
def own_namespace(stack: Settings, tmp: Path) -> Iterator[int]:
    """A relay in a network namespace of its own (tests/support/netns_relay.py); yields its pid."""
    running = LocalStack.attach()
    assert running is not None, "run under `python -m sandbox exec` (make test)"
    ready = tmp / "relay.pid"
    port = int(stack.livekit_url.rsplit(":", 1)[1])
    with (tmp / "relay.log").open("wb") as log:
        relay = subprocess.Popen(
            [sys.executable, "-m", "tests.support.netns_relay", "--tcp-port", str(port),
             "--udp-port", str(running.ports.livekit_rtc_udp), "--ready-file", str(ready)],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert relay.poll() is None and time.monotonic() < deadline, (tmp / "relay.log").read_text()
            time.sleep(0.05)
        yield relay.pid
    finally:
        relay.kill()
        relay.wait(10)


def shape(pid: int, *args: str) -> None:
    missing = [tool for tool in ("nsenter", "tc") if shutil.which(tool) is None]
    assert not missing, f"{missing} not found: install util-linux and iproute2 (apt-get install -y util-linux iproute2)"
    subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "tc", "qdisc", *args], check=True)


async def test_an_impaired_link_degrades_the_session_naming_who_and_lifting_it_clears(
    monitored: SessionClient, stack: Settings, tmp_path: Path
) -> None:
    spec = interview(avatar=None, quality={"sustain": "PT2S"})
    grant = await monitored.join(spec, "cand")
    with own_namespace(stack, tmp_path) as relay, (tmp_path / "participant.log").open("wb") as log:
        participant = subprocess.Popen(
            ["nsenter", f"--net=/proc/{relay}/ns/net", sys.executable, "-m", "tests.support.netns_participant",
             grant.url, grant.token], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            good = await eventually(
                lambda: _state_where(monitored, spec.session_id, lambda s: s.quality.get("cand") in ("excellent", "good")),
                what="cand in the room with a good connection", timeout=60,
            )
            assert good.status is SessionStatus.LIVE
            shape(relay, "add", "dev", "lo", "root", "tbf", "rate", "48kbit", "burst", "1600", "latency", "40ms")
            degraded = await eventually(
                lambda: _state_where(monitored, spec.session_id, lambda s: s.status is SessionStatus.DEGRADED),
                what="the session degraded by cand's link", timeout=60,
            )
            assert [d.identity for d in degraded.degraded] == ["cand"], degraded.degraded
            print(f"impaired: {degraded.degraded}")
            shape(relay, "del", "dev", "lo", "root")
            await eventually(
                lambda: _state_where(monitored, spec.session_id, lambda s: s.status is SessionStatus.LIVE and not s.degraded),
                what="the degradation cleared once the link is whole again", timeout=60,
            )
        finally:
            participant.terminate()
            participant.wait(15)
    await monitored.end(spec.session_id, "done")
