"""The room monitor: a hidden participant that watches a session's room from inside and tells the session
what webhooks cannot (reference/livekit.md §2, §5).

One long-running activity per session, on the media task queue (`sessionflow worker --media`). It joins as
`monitor-<session>` (hidden, agent kind, subscribe only: a retried monitor replaces a leftover one) and
follows who is in the room, what they publish, their connection quality, and the avatar's video frames. It
signals the session only on changes (joined, left, track published or unpublished, a quality level that
outlasted the debounce window, the avatar's video frozen or its audio silent, an avatar's first video frame, the
room lost, who is really there after a gap)
and heartbeats a compact snapshot of what it has told the session, so a retried attempt on another worker
resumes from it: it tells the session only what changed meanwhile, never the same thing twice.

It never cancels `room.connect()` midway (the SDK leaks sockets, livekit/rust-sdks#1340), always leaves the
room on cancel, and tears nothing else down: on a worker shutdown it just stops, and the session's heartbeat
timeout hands it to another media worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from livekit import api, rtc
from livekit.rtc._ffi_client import FfiClient
from livekit.rtc._proto import ffi_pb2 as proto_ffi
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.livekit import mint_monitor_token
from activities.rtc_connect import connect_shielded
from config.settings import Settings
from workflows.models import (
    ConnectionLevel,
    MonitorInput,
    RoomEvent,
    RoomEventKind,
    RoomEventSource,
    monitor_identity_for,
)

TICK_S = 0.25  # how often debounce windows, frozen video and the heartbeat are looked at
STATS_EVERY_S = 5.0  # RTC stats (RTT, jitter, loss) are sampled this often, never signalled on their own
# The avatar's inbound audio packets are counted this often. A quiet avatar still sends some (Opus DTX: about 5 a
# second measured through LiveKit), a muted or stalled track none, so a window of seconds tells them apart.
AUDIO_EVERY_S = 1.0
ROOM_POLL_S = 1.0  # while the room is missing or LiveKit is down
BEAT_WHILE_WAITING_S = 1.0  # heartbeats while a connect or a call is in flight (the timeout is 5 s)
TOKEN_TTL = timedelta(minutes=15)  # LiveKit refreshes a connected participant's token; a reconnect mints anew
MONITOR_PREFIX = "monitor-"
ROOM_GONE = -1  # `_follow`'s answer when the room was found missing while our connection was being resumed

_LEVELS: dict[int, ConnectionLevel] = {
    rtc.ConnectionQuality.QUALITY_EXCELLENT: ConnectionLevel.EXCELLENT,
    rtc.ConnectionQuality.QUALITY_GOOD: ConnectionLevel.GOOD,
    rtc.ConnectionQuality.QUALITY_POOR: ConnectionLevel.POOR,
    rtc.ConnectionQuality.QUALITY_LOST: ConnectionLevel.LOST,
}
_KINDS: dict[int, str] = {rtc.TrackKind.KIND_AUDIO: "audio", rtc.TrackKind.KIND_VIDEO: "video"}


class Peer(BaseModel):
    """One participant as the session was told: its connection, its tracks, its last sustained quality."""

    sid: str
    tracks: dict[str, str] = Field(default_factory=dict)  # track sid -> kind
    quality: ConnectionLevel = ConnectionLevel.UNKNOWN
    jitter_ms: float | None = None
    loss_pct: float | None = None


class Snapshot(BaseModel):
    """What the session has been told (the heartbeat's details): a retried monitor resumes from it."""

    room_sid: str | None = None
    peers: dict[str, Peer] = Field(default_factory=dict)
    lost_reported: bool = False  # ROOM_LOST sent for room_sid
    frozen_reported: list[str] = Field(default_factory=list)  # avatar video track sids reported frozen
    silent_reported: list[str] = Field(default_factory=list)  # avatar identities reported silent
    first_frames: list[str] = Field(default_factory=list)  # avatar video track sids whose first frame was reported
    rtt_ms: float | None = None  # the monitor's own link to LiveKit


class SessionGone(Exception):
    """The session's workflow has closed: nothing left to watch for."""


Signal = Callable[[RoomEvent], Awaitable[None]]


class RoomMonitor:
    """Watches one room for one session. `signal` hands an event to the session; `heartbeat` records the
    snapshot. Kept apart from the activity so its rules read on their own."""

    def __init__(self, settings: Settings, inp: MonitorInput, snapshot: Snapshot, signal: Signal,
                 heartbeat: Callable[[dict[str, Any]], None]) -> None:
        self._settings = settings
        self._inp = inp
        self.snapshot = snapshot
        self._signal = signal
        self._heartbeat = heartbeat
        self._told: dict[str, Any] = snapshot.model_dump(mode="json")  # the snapshot as last heartbeated
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._pending: dict[str, tuple[ConnectionLevel, float]] = {}  # identity -> (level, since): debouncing
        self._frames: dict[str, float] = {}  # avatar video track sid -> when its last frame came
        self._watchers: list[asyncio.Task[None]] = []
        self._stats_at = 0.0
        self._ticked = 0.0
        self._counters: dict[str, tuple[int, int]] = {}  # identity -> packets received, lost (last stats sample)
        self._heard: dict[str, tuple[int, float]] = {}  # avatar identity -> audio packets, when they last grew
        self._audio_at = 0.0
        self._reconnecting = False  # our own connection is being resumed: is the room still there?
        self._probed = 0.0

    # ---- the loop: join, follow, and after a disconnect find out whether the room is gone ----------------

    async def run(self) -> None:
        while True:
            await self._await_room()
            room = await self._connect()
            try:
                reason = await self._follow(room)
            finally:
                await self._leave(room)
            if reason == rtc.DisconnectReason.DUPLICATE_IDENTITY:
                # Another monitor of this session joined in our place: a retried attempt, or the next run's monitor
                # once the session continued as new. Never fight back (each rejoin would kick the other out); fail
                # retryably instead: a stale attempt's failure goes nowhere, a current one's retry takes the room back.
                raise ApplicationError(
                    f"another room monitor of {self._inp.room} joined in this one's place", type="MonitorReplaced"
                )
            if reason == rtc.DisconnectReason.ROOM_DELETED:
                # Deleted on purpose (the session's end, or someone else): the webhook's room_finished, in case
                # it never comes. The session cancels this monitor when it ends.
                await self._emit(RoomEventKind.ROOM_FINISHED, None, f"finished:{self.snapshot.room_sid}")
                while True:
                    self._beat()
                    await asyncio.sleep(ROOM_POLL_S)

    async def _await_room(self) -> None:
        """Return once the room exists. LiveKit answering that it does not is a lost room (told once)."""
        while True:
            exists = await self._room_exists()
            if exists:
                return
            if exists is False and not self.snapshot.lost_reported:
                seen = self.snapshot.room_sid or "unseen"
                await self._emit(RoomEventKind.ROOM_LOST, None, f"lost:{seen}", detail="the room is missing on LiveKit")
                self.snapshot.lost_reported = True
            self._beat()
            await asyncio.sleep(ROOM_POLL_S)

    @contextlib.asynccontextmanager
    async def _beating(self) -> AsyncIterator[None]:
        """Heartbeat every BEAT_WHILE_WAITING_S while the block waits on something slow but bounded (a connect, a
        call to LiveKit or Temporal): on a loaded machine those took longer than the heartbeat timeout, and the
        session then retried a monitor that was working."""
        async def beat() -> None:
            # The snapshot as last heartbeated, not as it is now: in `_emit` it already says told what the signal
            # in flight is telling, and a worker killed before that lands must leave a retry to tell it again.
            while True:
                self._heartbeat(self._told)
                await asyncio.sleep(BEAT_WHILE_WAITING_S)

        task = asyncio.get_running_loop().create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _room_exists(self) -> bool | None:
        """True or False as LiveKit says; None if LiveKit does not answer (down, restarting)."""
        s = self._settings
        try:
            secret = s.livekit_api_secret.get_secret_value()
            async with self._beating(), api.LiveKitAPI(s.livekit_http_url, s.livekit_api_key, secret) as lk:
                async with asyncio.timeout(s.livekit_call_timeout_s):
                    listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[self._inp.room]))
        except Exception as e:  # unreachable or failing: keep waiting, the heartbeat goes on
            activity.logger.info("LiveKit not answering while the monitor waits for the room", extra={"error": str(e)})
            return None
        return any(r.name == self._inp.room for r in listed.rooms)

    async def _connect(self) -> rtc.Room:
        """Join the room. A cancel during the connect waits for it to finish, then leaves (never cut short)."""
        token = mint_monitor_token(self._settings, self._inp.room, monitor_identity_for(self._inp.session_id), TOKEN_TTL)
        room = rtc.Room()
        self._listen(room)
        async with self._beating():
            await connect_shielded(room, self._settings.livekit_url, token, rtc.RoomOptions(auto_subscribe=False))
        sid = await room.sid
        if sid != self.snapshot.room_sid:
            self.snapshot.room_sid, self.snapshot.lost_reported = sid, False
        return room

    async def _leave(self, room: rtc.Room) -> None:
        for task in self._watchers:
            task.cancel()
        self._watchers.clear()
        self._frames.clear()
        self._heard.clear()
        with contextlib.suppress(Exception):
            await asyncio.shield(room.disconnect())

    def _listen(self, room: rtc.Room) -> None:
        """rtc callbacks are synchronous: each becomes an item on the queue `_follow` works through in order."""
        put = self._events.put_nowait
        room.on("participant_connected", lambda p: put(("joined", p)))
        room.on("participant_disconnected", lambda p: put(("left", p)))
        room.on("track_published", lambda pub, p: put(("published", (pub, p))))
        room.on("track_unpublished", lambda pub, p: put(("unpublished", (pub, p))))
        room.on("track_subscribed", lambda track, pub, p: put(("subscribed", (track, pub, p))))
        room.on("connection_quality_changed", lambda p, q: put(("quality", (p, q))))
        room.on("reconnecting", lambda: put(("reconnecting", None)))
        room.on("reconnected", lambda: put(("reconnected", room)))
        room.on("disconnected", lambda reason: put(("disconnected", reason)))

    async def _follow(self, room: rtc.Room) -> int:
        """Tell the session what changed since the snapshot, then every change, until the room drops us or is
        found gone while our connection is being resumed. Returns the disconnect reason (ROOM_GONE for that)."""
        self._reconnecting = False
        await self._reconcile(room)
        while True:
            what: str | None = None
            item: Any = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    what, item = await self._events.get()
            if what == "disconnected":
                return int(item)
            if what is not None:
                await self._on(what, item, room)
            if time.monotonic() - self._ticked >= TICK_S and await self._tick(room):
                return ROOM_GONE

    # ---- what the session is told ------------------------------------------------------------------------

    async def _reconcile(self, room: rtc.Room) -> None:
        """After any gap (start, retry, reconnect): joins and leaves the snapshot missed, then who is there."""
        seen = {p.identity: p for p in room.remote_participants.values() if not p.identity.startswith(MONITOR_PREFIX)}
        for identity, peer in list(self.snapshot.peers.items()):
            current = seen.get(identity)
            if current is None or current.sid != peer.sid:
                await self._left(identity, peer.sid)
        for participant in seen.values():
            if participant.identity not in self.snapshot.peers:
                await self._joined(participant)
            known = self.snapshot.peers[participant.identity]
            publications = participant.track_publications
            for track_sid in [t for t in known.tracks if t not in publications]:
                await self._unpublished(participant.identity, track_sid)
            for publication in publications.values():
                await self._published(participant, publication)
            self._quality(participant, participant.connection_quality)
        await self._emit(RoomEventKind.PRESENCE, None, f"presence:{self.snapshot.room_sid}:{time.time_ns()}",
                         present=sorted(seen))

    async def _on(self, what: str, item: Any, room: rtc.Room) -> None:
        if self._reconnecting and what not in ("reconnecting", "reconnected"):
            # Our own connection is being resumed or restarted: the SDK drops and re-adds every remote participant
            # meanwhile, which says nothing about them. Once back, `_reconcile` tells what really changed (or the
            # room is found gone, and the new room's reconcile does).
            return
        match what:
            case "joined" if not item.identity.startswith(MONITOR_PREFIX):
                known = self.snapshot.peers.get(item.identity)
                if known is not None and known.sid != item.sid:
                    await self._left(item.identity, known.sid)  # a new connection replaced the one we knew
                if known is None or known.sid != item.sid:
                    await self._joined(item)
            case "left" if item.identity in self.snapshot.peers and self.snapshot.peers[item.identity].sid == item.sid:
                await self._left(item.identity, item.sid)
            case "published":
                publication, participant = item
                await self._published(participant, publication)
            case "unpublished":
                publication, participant = item
                await self._unpublished(participant.identity, publication.sid)
            case "subscribed":
                track, publication, participant = item
                if self._is_avatar(participant.identity) and publication.kind == rtc.TrackKind.KIND_VIDEO:
                    self._watch_frames(track, publication.sid, participant.identity)
                elif (publication.kind == rtc.TrackKind.KIND_AUDIO and not self._is_avatar(participant.identity)
                      and not self._settings.monitor_receive_audio):
                    _pause(publication)  # a person's audio: the subscription brings their quality, not the media
            case "first_frame":
                identity, track_sid, at = item
                if track_sid not in self.snapshot.first_frames and identity in self.snapshot.peers:
                    self.snapshot.first_frames.append(track_sid)
                    await self._emit(RoomEventKind.AVATAR_FIRST_FRAME, identity, f"first-frame:{track_sid}", at=at,
                                     track_sid=track_sid, track_kind="video")
            case "quality":
                participant, quality = item
                self._quality(participant, quality)
            case "reconnecting":
                self._reconnecting = True
            case "reconnected":
                self._reconnecting = False
                await self._reconcile(room)

    async def _joined(self, participant: rtc.RemoteParticipant) -> None:
        self.snapshot.peers[participant.identity] = Peer(sid=participant.sid)
        await self._emit(RoomEventKind.PARTICIPANT_JOINED, participant.identity, f"joined:{participant.sid}",
                         sid=participant.sid)

    async def _left(self, identity: str, sid: str) -> None:
        self.snapshot.peers.pop(identity, None)
        self._pending.pop(identity, None)
        self._heard.pop(identity, None)
        if identity in self.snapshot.silent_reported:
            self.snapshot.silent_reported.remove(identity)
        await self._emit(RoomEventKind.PARTICIPANT_LEFT, identity, f"left:{sid}", sid=sid)

    async def _published(self, participant: rtc.RemoteParticipant, publication: rtc.RemoteTrackPublication) -> None:
        if self._wanted(participant.identity, publication):
            publication.set_subscribed(True)
        peer = self.snapshot.peers.get(participant.identity)
        if peer is None or publication.sid in peer.tracks:
            return
        kind = _KINDS.get(publication.kind, "unknown")
        peer.tracks[publication.sid] = kind
        await self._emit(RoomEventKind.TRACK_PUBLISHED, participant.identity, f"published:{publication.sid}",
                         track_sid=publication.sid, track_kind=kind)

    async def _unpublished(self, identity: str, track_sid: str) -> None:
        peer = self.snapshot.peers.get(identity)
        kind = peer.tracks.pop(track_sid, None) if peer is not None else None
        if kind is None:
            return
        self._frames.pop(track_sid, None)
        await self._emit(RoomEventKind.TRACK_UNPUBLISHED, identity, f"unpublished:{track_sid}", track_sid=track_sid,
                         track_kind=kind)

    def _wanted(self, identity: str, publication: rtc.RemoteTrackPublication) -> bool:
        """Subscribe only to what is watched: the avatar's video (frames) and, if its silence is watched, its audio
        (packets, never decoded); each person's audio (LiveKit sends a participant's quality only to those subscribed
        to one of their tracks), which is then paused (`_pause`) unless `monitor_receive_audio`: the subscription is
        what brings the quality."""
        if self._is_avatar(identity):
            audio = self._inp.avatar_silent_after_s is not None and publication.kind == rtc.TrackKind.KIND_AUDIO
            return publication.kind == rtc.TrackKind.KIND_VIDEO or audio
        return publication.kind == rtc.TrackKind.KIND_AUDIO

    def _is_avatar(self, identity: str) -> bool:
        return identity.startswith(self._inp.avatar_identity_prefix)

    def _quality(self, participant: rtc.RemoteParticipant, quality: int) -> None:
        """A new level starts the debounce window; going back to the told level before it ends cancels it."""
        peer = self.snapshot.peers.get(participant.identity)
        level = _LEVELS.get(quality)
        if peer is None or level is None:
            return
        if level == peer.quality:
            self._pending.pop(participant.identity, None)
        elif self._pending.get(participant.identity, (None, 0.0))[0] != level:
            self._pending[participant.identity] = (level, time.monotonic())

    async def _tick(self, room: rtc.Room) -> bool:
        """Debounce windows, frozen video, stats and the heartbeat. True if the room was found gone."""
        now = self._ticked = time.monotonic()
        if self._reconnecting and now - self._probed >= ROOM_POLL_S:
            # LiveKit restarted? Its rooms vanish with it: ask, rather than wait out the SDK's reconnect attempts.
            self._probed = now
            if await self._room_exists() is False:
                return True
        if now - self._stats_at >= STATS_EVERY_S:
            self._stats_at = now
            await self._sample_stats(room)
        for identity, (level, since) in list(self._pending.items()):
            peer = self.snapshot.peers.get(identity)
            if peer is None or now - since < self._inp.quality_sustain_s:
                continue
            del self._pending[identity]
            peer.quality = level
            await self._emit(RoomEventKind.QUALITY_CHANGED, identity, f"quality:{peer.sid}:{level.value}:{time.time_ns()}",
                             quality=level, detail=self._describe_link(peer))
        await self._check_frames(now)
        if self._inp.avatar_silent_after_s is not None and not self._reconnecting and now - self._audio_at >= AUDIO_EVERY_S:
            self._audio_at = now
            await self._check_audio(room, now, self._inp.avatar_silent_after_s)
        self._beat()
        return False

    def _watch_frames(self, track: rtc.Track, track_sid: str, identity: str) -> None:
        self._frames[track_sid] = time.monotonic()
        first = self._inp.avatar_first_frame and track_sid not in self.snapshot.first_frames

        async def watch() -> None:
            nonlocal first
            stream = rtc.VideoStream(track)
            try:
                async for _ in stream:
                    self._frames[track_sid] = time.monotonic()
                    if first:  # told from the loop (`_on`), with the time it came
                        first = False
                        self._events.put_nowait(("first_frame", (identity, track_sid, datetime.now(UTC))))
            finally:
                await stream.aclose()

        self._watchers.append(asyncio.get_running_loop().create_task(watch()))

    async def _check_frames(self, now: float) -> None:
        for track_sid, last in list(self._frames.items()):
            frozen = now - last >= self._inp.avatar_frozen_after_s
            reported = track_sid in self.snapshot.frozen_reported
            if frozen and not reported:
                owner = next((i for i, p in self.snapshot.peers.items() if track_sid in p.tracks), None)
                if owner is None:
                    continue
                self.snapshot.frozen_reported.append(track_sid)
                await self._emit(RoomEventKind.AVATAR_FROZEN, owner, f"frozen:{track_sid}:{time.time_ns()}",
                                 detail=f"no video frame for {now - last:.0f} s")
            elif not frozen and reported:
                self.snapshot.frozen_reported.remove(track_sid)

    async def _check_audio(self, room: rtc.Room, now: float, silent_after_s: float) -> None:
        """Each avatar's audio: silent once its track carried no packet (stalled, or muted: LiveKit forwards
        nothing then), or no audio track was published, for `silent_after_s`; heard again once packets flow."""
        for identity in [i for i in self.snapshot.peers if self._is_avatar(i)]:
            participant = next((p for p in room.remote_participants.values() if p.identity == identity), None)
            if participant is None:
                continue
            audio = next((p for p in participant.track_publications.values() if p.kind == rtc.TrackKind.KIND_AUDIO), None)
            packets = -1
            if audio is not None and audio.track is not None:
                with contextlib.suppress(Exception):
                    for s in await audio.track.get_stats():
                        if s.WhichOneof("stats") == "inbound_rtp":
                            packets = s.inbound_rtp.received.packets_received
            before, since = self._heard.get(identity, (-1, now))
            flowing = packets > before and (before >= 0 or identity not in self._heard)
            self._heard[identity] = (max(packets, before), now if flowing or identity not in self._heard else since)
            quiet_for = now - self._heard[identity][1]
            reported = identity in self.snapshot.silent_reported
            if flowing and reported:
                self.snapshot.silent_reported.remove(identity)
            elif quiet_for >= silent_after_s and not reported:
                self.snapshot.silent_reported.append(identity)
                if audio is None:
                    why = "no audio track published"
                else:
                    why = "its audio track carried no packets" + (" (muted)" if audio.muted else "")
                await self._emit(RoomEventKind.AVATAR_SILENT, identity, f"silent:{identity}:{time.time_ns()}",
                                 detail=f"{why} for {quiet_for:.0f} s")

    async def _sample_stats(self, room: rtc.Room) -> None:
        """RTT of the monitor's link, and per watched participant the jitter and loss of the track we receive."""
        try:
            stats = await room.get_rtc_stats()
        except Exception:
            return  # not connected right now: the next sample will do
        for s in [*stats.publisher_stats, *stats.subscriber_stats]:  # one peer connection: all in the first
            pair = s.candidate_pair.candidate_pair if s.WhichOneof("stats") == "candidate_pair" else None
            if pair is not None and pair.nominated and pair.responses_received:
                self.snapshot.rtt_ms = round(1000 * pair.total_round_trip_time / pair.responses_received, 1)
        for participant in room.remote_participants.values():
            peer = self.snapshot.peers.get(participant.identity)
            track = next((p.track for p in participant.track_publications.values() if p.subscribed and p.track), None)
            if peer is None or track is None:
                continue
            with contextlib.suppress(Exception):
                for s in await track.get_stats():
                    if s.WhichOneof("stats") == "inbound_rtp":
                        received = s.inbound_rtp.received
                        got, lost = received.packets_received, received.packets_lost
                        got_before, lost_before = self._counters.get(participant.identity, (0, 0))
                        self._counters[participant.identity] = (got, lost)
                        total = (got - got_before) + (lost - lost_before)  # since the last sample
                        peer.jitter_ms = round(received.jitter * 1000, 1)
                        peer.loss_pct = round(100 * (lost - lost_before) / total, 2) if total > 0 else None

    def _describe_link(self, peer: Peer) -> str | None:
        parts = [
            f"rtt {self.snapshot.rtt_ms:.0f} ms" if self.snapshot.rtt_ms is not None else None,
            f"jitter {peer.jitter_ms:.0f} ms" if peer.jitter_ms is not None else None,
            f"loss {peer.loss_pct:.1f}%" if peer.loss_pct is not None else None,
        ]
        return ", ".join(p for p in parts if p) or None

    async def _emit(self, kind: RoomEventKind, identity: str | None, key: str, **fields: Any) -> None:
        """Tell the session, then heartbeat at once: the snapshot says it was told."""
        fields.setdefault("at", datetime.now(UTC))  # when it happened: now, unless the caller knows better
        event = RoomEvent(
            event_id=f"mon:{key}"[:128], kind=kind, identity=identity, source=RoomEventSource.MONITOR, **fields
        )
        async with self._beating():
            await self._signal(event)
        self._beat()

    def _beat(self) -> None:
        self._told = self.snapshot.model_dump(mode="json")
        self._heartbeat(self._told)


def _pause(publication: rtc.RemoteTrackPublication) -> None:
    """Ask LiveKit to stop forwarding a subscribed track's media (the subscription, and with it the publisher's
    connection quality, stays). A subscribed audio track is otherwise received and decoded, 100 times a second,
    for nothing: 43 % of a media worker's CPU samples in a profile (docs/benchmarks.md, capacity).
    The rtc SDK (1.2) has this request in its FFI but no Python method for it yet; failing, the audio flows."""
    try:
        request = proto_ffi.FfiRequest()
        request.enable_remote_track_publication.track_publication_handle = publication._ffi_handle.handle
        request.enable_remote_track_publication.enabled = False
        FfiClient.instance.request(request)
    except Exception as e:
        activity.logger.warning("could not pause a monitored audio track; it is received", extra={"error": str(e)})


class MonitorActivities:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    @activity.defn
    async def monitor_room(self, inp: MonitorInput) -> None:
        """Watch the session's room until cancelled (the session's end); resumes from the last heartbeat."""
        info = activity.info()
        snapshot = Snapshot.model_validate(info.heartbeat_details[0]) if info.heartbeat_details else Snapshot()
        handle = activity.client().get_workflow_handle(inp.workflow_id)

        async def signal(event: RoomEvent) -> None:
            try:
                await handle.signal("room_event", event)
            except RPCError as e:
                if e.status == RPCStatusCode.NOT_FOUND:
                    raise SessionGone(inp.workflow_id) from e
                raise

        def heartbeat(told: dict[str, Any]) -> None:
            activity.heartbeat(told)

        activity.logger.info("room monitor starting", extra={"room": inp.room, "resumed": bool(info.heartbeat_details)})
        try:
            await RoomMonitor(self._settings, inp, snapshot, signal, heartbeat).run()
        except SessionGone:
            activity.logger.info("room monitor stops: the session has closed", extra={"room": inp.room})
