"""Session state and lifecycle of the emulator (reference §3–§5).

A session exists from ``/token`` (unstarted), becomes active on ``/start`` (billing, avatar in the room) and ends
exactly once (``end``), recording ``end_at``/``end_reason``; its avatar then leaves in the background. ``tick``
applies the timers: idle timeout, max duration (sandbox length for sandbox sessions), zombie reap (avatar alone in
its room), and per-period billing with ``NO_CREDITS`` when the balance runs out.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import jwt

from .avatar import Avatar, AvatarJoinError
from .config import EmulatorConfig
from .envelope import ApiError
from .schemas import LiveKitConfig, SessionEndReason

CREDITS_PER_PERIOD = {"LITE": 1.0, "FULL": 2.0}


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False)
class EmulatedSession:
    id: uuid.UUID
    token: str
    mode: Literal["LITE", "FULL"]
    is_sandbox: bool
    avatar_id: uuid.UUID
    livekit: LiveKitConfig | None
    max_session_duration: int
    created_at: datetime = field(default_factory=_now)
    updated_at: datetime = field(default_factory=_now)
    started_at: datetime | None = None
    started_mono: float | None = None
    last_activity_mono: float = field(default_factory=time.monotonic)
    alone_since_mono: float | None = None
    periods_billed: int = 0
    end_at: datetime | None = None
    end_reason: SessionEndReason | None = None
    avatar: Avatar | None = None
    starting: bool = False  # /start is waiting for the avatar to join

    @property
    def state(self) -> Literal["created", "active", "ended"]:
        if self.end_at is not None:
            return "ended"
        return "active" if self.started_at is not None else "created"

    @property
    def credits_consumed(self) -> float:
        return 0.0 if self.is_sandbox else self.periods_billed * CREDITS_PER_PERIOD[self.mode]

    def duration_s(self) -> int:
        if self.started_at is None:
            return 0
        return int(((self.end_at or _now()) - self.started_at).total_seconds())

    def entry(self) -> dict[str, Any]:
        """``ListSessionEntrySchema``, plus ``end_at``/``end_reason`` (``ListHistoricEntrySchema``) once ended."""
        entry: dict[str, Any] = {
            "id": str(self.id),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "duration": self.duration_s(),
            "source": "API",
            "mode": self.mode,
            "is_sandbox": self.is_sandbox,
            "credits_consumed": self.credits_consumed,
        }
        if self.end_at is not None:
            entry["end_at"] = self.end_at.isoformat()
            entry["end_reason"] = self.end_reason.value if self.end_reason else None
        return entry

    def control_view(self) -> dict[str, Any]:
        """Everything, for ``GET /_control/sessions``."""
        return {
            **self.entry(),
            "state": self.state,
            "max_session_duration": self.max_session_duration,
            "livekit_room": self.livekit.livekit_room if self.livekit else None,
            "avatar_identity": self.avatar.identity if self.avatar else None,
            "avatar_present": bool(self.avatar and self.avatar.present),
            "livekit_client_token_expires_at": _expiry(self.livekit.livekit_client_token) if self.livekit else None,
        }


def _expiry(token: str) -> str | None:
    """When the LiveKit token a caller handed in expires (its `exp`), never the token itself: tests check how long
    the tokens they give LiveAvatar stay usable."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return datetime.fromtimestamp(exp, UTC).isoformat() if isinstance(exp, int | float) else None


class SessionRegistry:
    """All sessions of one emulator instance, and the account's credit balance."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self._sessions: dict[uuid.UUID, EmulatedSession] = {}
        self._by_token: dict[str, EmulatedSession] = {}
        self._departures: set[asyncio.Task[None]] = set()

    # -- queries --

    def get(self, session_id: uuid.UUID) -> EmulatedSession | None:
        return self._sessions.get(session_id)

    def by_token(self, token: str) -> EmulatedSession | None:
        return self._by_token.get(token)

    def all(self) -> list[EmulatedSession]:
        """Newest first."""
        return sorted(self._sessions.values(), key=lambda s: s.created_at, reverse=True)

    def credits_left(self) -> float:
        return self.config.credits - sum(s.credits_consumed for s in self._sessions.values())

    # -- lifecycle --

    def create(
        self,
        *,
        mode: Literal["LITE", "FULL"],
        avatar_id: uuid.UUID,
        is_sandbox: bool,
        livekit: LiveKitConfig | None,
        max_session_duration: int | None,
    ) -> EmulatedSession:
        """``/token``: allocate an unstarted session; the requested duration is clamped to the plan cap."""
        cap = self.config.max_session_duration_s
        limit = min(max_session_duration or cap, cap)
        if is_sandbox:
            limit = min(limit, math.ceil(self.config.sandbox_session_s))
        session = EmulatedSession(
            id=uuid.uuid4(),
            token=secrets.token_urlsafe(32),
            mode=mode,
            is_sandbox=is_sandbox,
            avatar_id=avatar_id,
            livekit=livekit if mode == "LITE" else None,  # FULL mode ignores livekit_config
            max_session_duration=limit,
        )
        self._sessions[session.id] = session
        self._by_token[session.token] = session
        return session

    async def start(self, session: EmulatedSession) -> None:
        """``/start``: check state, concurrency and credits, put the avatar in the room, start billing."""
        if session.state == "ended":
            raise ApiError(404, "Session not found")
        if session.state == "active" or session.starting:
            raise ApiError(409, f"Session {session.id} is already started")
        active = sum(1 for s in self._sessions.values() if s.state == "active" or s.starting)
        if active >= self.config.max_concurrent_sessions:
            raise ApiError(
                400, f"Concurrent session limit reached ({active}/{self.config.max_concurrent_sessions} active)"
            )
        rate = CREDITS_PER_PERIOD[session.mode]
        if not session.is_sandbox and self.credits_left() < rate:
            raise ApiError(
                402, f"Insufficient credits: {self.credits_left():g} left, a {session.mode} session needs {rate:g}"
            )
        if session.livekit is not None:
            session.starting = True
            try:
                avatar = Avatar(session.livekit, join_timeout_s=self.config.avatar_join_timeout_s)
                await avatar.join()
            except AvatarJoinError as exc:
                # Nothing was billed (the escrow is refunded); the session stays unstarted.
                raise ApiError(500, f"Failed to start session: {exc}") from exc
            finally:
                session.starting = False
            if session.end_at is not None:  # ended (stopped) while the avatar was joining
                self._depart(avatar)
                raise ApiError(404, "Session not found")
            session.avatar = avatar
        session.started_at = session.updated_at = _now()
        session.started_mono = session.last_activity_mono = time.monotonic()
        session.periods_billed = 1  # start escrows one period

    def keep_alive(self, session: EmulatedSession) -> None:
        if session.state == "ended":
            raise ApiError(404, "Session not found")
        session.last_activity_mono = time.monotonic()
        session.updated_at = _now()

    def end(self, session: EmulatedSession, reason: SessionEndReason) -> None:
        """End a live session once: record the end, make its avatar leave in the background."""
        if session.state == "ended":
            raise ApiError(404, "Session not found")
        session.end_at = session.updated_at = _now()
        session.end_reason = reason
        if session.avatar is not None:
            self._depart(session.avatar)

    def crash_avatar(self, session: EmulatedSession) -> None:
        """Fault injection: the avatar leaves the room but the session stays active."""
        if session.avatar is None:
            raise ApiError(404, f"Session {session.id} has no avatar in a room")
        self._depart(session.avatar)

    def end_all(self, reason: SessionEndReason) -> int:
        live = [s for s in self._sessions.values() if s.state != "ended"]
        for session in live:
            self.end(session, reason)
        return len(live)

    async def close(self) -> None:
        """App shutdown: every avatar leaves; wait for the departures."""
        for session in self._sessions.values():
            if session.avatar is not None:
                self._depart(session.avatar)
        await asyncio.gather(*self._departures, return_exceptions=True)

    def _depart(self, avatar: Avatar) -> None:
        task = asyncio.create_task(avatar.leave(), name=f"avatar-leave-{avatar.identity}")
        self._departures.add(task)
        task.add_done_callback(self._departures.discard)

    # -- timers --

    def tick(self) -> None:
        """Apply every timer once; called every ``config.tick_s`` by the app."""
        now = time.monotonic()
        cfg = self.config
        for session in list(self._sessions.values()):
            if session.state == "ended":
                continue
            if now - session.last_activity_mono >= cfg.idle_timeout_s:
                self.end(session, SessionEndReason.IDLE_TIMEOUT)
                continue
            if session.started_mono is None:
                continue
            elapsed = now - session.started_mono
            if elapsed >= session.max_session_duration:
                self.end(session, SessionEndReason.MAX_DURATION_REACHED)
                continue
            if self._reap_if_zombie(session, now):
                continue
            due = int(elapsed // cfg.billing_period_s) + 1
            if due > session.periods_billed and not session.is_sandbox:
                if self.credits_left() < CREDITS_PER_PERIOD[session.mode]:
                    self.end(session, SessionEndReason.NO_CREDITS)
                    continue
                session.periods_billed = due

    def _reap_if_zombie(self, session: EmulatedSession, now: float) -> bool:
        if session.avatar is None or self.config.zombie_reap_s is None or not session.avatar.alone:
            session.alone_since_mono = None
            return False
        if session.alone_since_mono is None:
            session.alone_since_mono = now
        if now - session.alone_since_mono >= self.config.zombie_reap_s:
            self.end(session, SessionEndReason.ZOMBIE_SESSION_REAP)
            return True
        return False
