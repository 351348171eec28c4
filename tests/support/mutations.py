"""Deliberate regressions of the decision core, to show the tests catch them (tests/replay/test_replay.py,
docs/testing.md). Each is a replacement for one `SessionMachine` method, applied with monkeypatch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from workflows.machine import AvatarPhase, Command, Ending, Room, RoomPhase, SessionMachine
from workflows.models import EndReason, SessionStatus

_recover = SessionMachine._recover
_end = SessionMachine._end
_on_avatar_started = SessionMachine._on_avatar_started


def no_backoff_before_replacement(self: SessionMachine, detail: str, now: datetime) -> list[Command]:
    """A lost avatar is replaced at once, with no backoff."""
    commands = _recover(self, detail, now)
    if self.avatar.retry_at is not None:
        self.avatar.retry_at = None
        commands += self._start_replacement(now, rotation=False)
    return commands


def lost_participant_always_ends(self: SessionMachine, now: datetime) -> list[Command]:
    """A participant who misses the reconnect grace ends the session, whatever `when_participant_lost` says."""
    missed = sorted(i for i, t in self.people.reconnect_by.items() if now >= t)
    for identity in missed:
        del self.people.reconnect_by[identity]
    return self._end(EndReason.PARTICIPANT_LOST, f"{', '.join(missed)} lost", now) if missed else []


def no_cleanup_on_cancel(self: SessionMachine, reason: EndReason, detail: str | None, now: datetime) -> list[Command]:
    """A cancel marks everything released without releasing anything."""
    if reason is not EndReason.CANCELLED or self.ending:
        return _end(self, reason, detail, now)
    self.ending = Ending(reason, detail, now)
    self.status = SessionStatus.ENDING
    self.room = Room(RoomPhase.GONE)
    self.avatars = {k: replace(a, phase=AvatarPhase.STOPPED, keepalive=False) for k, a in self.avatars.items()}
    return []


def rotation_disabled(self: SessionMachine, avatar_id: str, now: datetime) -> list[Command]:
    """An avatar session is never rotated before its duration cap."""
    commands = _on_avatar_started(self, avatar_id, now)
    self.avatar.rotate_at = None
    return commands


# mutation -> (the SessionMachine method it replaces, the replacement, the recorded history it changes)
MUTATIONS: dict[str, tuple[str, Callable[..., Any], str]] = {
    "no backoff before an avatar replacement": ("_recover", no_backoff_before_replacement, "avatar_crash_and_replacement.v2"),
    "a lost participant always ends the session": ("_participants_lost", lost_participant_always_ends, "participant_lost.v2"),
    "cleanup skipped on cancel": ("_end", no_cleanup_on_cancel, "cancel.v2"),
    "rotation disabled": ("_on_avatar_started", rotation_disabled, "avatar_rotation.v2"),
}
