"""Stand-ins for LiveKit and LiveAvatar behind the session's activities, for workflow tests on the
time-skipping server: the real `SessionWorkflow` runs, only the outside world is faked.

- `StubWorld` answers every call at once and records it; a test sets faults up front.
- `ScriptedWorld` holds every call until the test decides how it ends (succeed, fail for good, fail and be
  retried, reach the service and then fail), so a test can drive any interleaving of results, and checks the
  ordering rules the session promises as the calls happen.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from workflows.models import (
    AvatarCreated,
    AvatarRef,
    CreateAvatarInput,
    CreateRoomInput,
    JoinGrant,
    MintTokenInput,
    StartAvatarInput,
)


def fake_grant(inp: MintTokenInput) -> JoinGrant:
    """A grant as `mint_participant_token` returns it, with a token that is no secret of anything."""
    assert inp.role is not None
    return JoinGrant(
        url="ws://fake", room=inp.room, identity=inp.identity, role=inp.role, token="fake-token",
        expires_at=datetime.now(UTC) + inp.ttl,
    )


@dataclass
class StubWorld:
    """Stand-ins for LiveKit and LiveAvatar that record every call; faults are set per test."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    create_room_error: ApplicationError | None = None
    start_avatar_error: ApplicationError | None = None
    avatar_ends_after: float | None = None  # keep-alive reports the avatar ended after this many seconds
    keepalive_returns: bool = False  # keep-alive ends at once (the test server skips no time while it runs)
    create_room_gate: asyncio.Event | None = None  # create_room waits for it (the room is still being created)
    delete_room_gate: asyncio.Event | None = None  # delete_room waits for it (a cleanup still running)
    start_avatar_gate: asyncio.Event | None = None  # start_avatar_session waits for it (billing about to start)
    avatars: int = 0

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    @activity.defn(name="create_room")
    async def create_room(self, inp: CreateRoomInput) -> None:
        self.calls.append(("create_room", inp.room))
        await _wait_for(self.create_room_gate)
        if self.create_room_error:
            raise self.create_room_error

    @activity.defn(name="delete_room")
    async def delete_room(self, room: str) -> None:
        self.calls.append(("delete_room", room))
        await _wait_for(self.delete_room_gate)

    @activity.defn(name="mint_participant_token")
    async def mint_participant_token(self, inp: MintTokenInput) -> JoinGrant:
        self.calls.append(("mint_participant_token", inp.identity))
        return fake_grant(inp)

    @activity.defn(name="create_avatar_session")
    async def create_avatar_session(self, inp: CreateAvatarInput) -> AvatarCreated:
        self.avatars += 1
        avatar_id = f"avatar-{self.avatars}"
        self.calls.append(("create_avatar_session", avatar_id))
        return AvatarCreated(avatar_session_id=avatar_id, session_token="stub")

    @activity.defn(name="start_avatar_session")
    async def start_avatar_session(self, inp: StartAvatarInput) -> None:
        self.calls.append(("start_avatar_session", inp.avatar_session_id))
        await _wait_for(self.start_avatar_gate)
        if self.start_avatar_error:
            raise self.start_avatar_error

    @activity.defn(name="keep_avatar_alive")
    async def keep_avatar_alive(self, ref: AvatarRef) -> None:
        self.calls.append(("keep_avatar_alive", ref.avatar_session_id))
        if self.keepalive_returns:
            return
        waited = 0.0
        while self.avatar_ends_after is None or waited < self.avatar_ends_after:
            activity.heartbeat()
            await asyncio.sleep(0.1)  # a polling period, not a wait for something
            waited += 0.1
        raise ApplicationError("avatar session ended (IDLE_TIMEOUT)", type="AvatarSessionEnded", non_retryable=True)

    @activity.defn(name="stop_avatar_session")
    async def stop_avatar_session(self, ref: AvatarRef) -> None:
        self.calls.append(("stop_avatar_session", ref.avatar_session_id))

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.create_room, self.delete_room, self.mint_participant_token, self.create_avatar_session,
            self.start_avatar_session, self.keep_avatar_alive, self.stop_avatar_session,
        ]


async def _wait_for(gate: asyncio.Event | None) -> None:
    """Hold an activity until the test opens `gate`, heartbeating so that a cancel reaches it meanwhile."""
    if gate is None:
        return
    opened = asyncio.ensure_future(gate.wait())
    try:
        while not opened.done():
            activity.heartbeat()
            await asyncio.wait({opened}, timeout=0.1)
    finally:
        opened.cancel()


class Outcome(StrEnum):
    OK = "ok"
    FAIL = "fail"  # fails for good (non-retryable), the service did nothing
    RETRY = "retry"  # fails, Temporal retries it (a new call comes)
    REACHED_FAIL = "reached_fail"  # the service acted, then the answer was lost: fails for good
    ENDED = "ended"  # keep-alive only: LiveAvatar says the avatar session has ended


# What each call may be answered with. Cleanup calls never fail for good (their retry policy is endless).
OUTCOMES: dict[str, tuple[Outcome, ...]] = {
    "create_room": (Outcome.OK, Outcome.FAIL, Outcome.RETRY, Outcome.REACHED_FAIL),
    "delete_room": (Outcome.OK, Outcome.RETRY),
    "create_avatar_session": (Outcome.OK, Outcome.FAIL, Outcome.RETRY),
    "start_avatar_session": (Outcome.OK, Outcome.FAIL, Outcome.RETRY, Outcome.REACHED_FAIL),
    "keep_avatar_alive": (Outcome.ENDED,),
    "stop_avatar_session": (Outcome.OK, Outcome.RETRY),
}


@dataclass
class Call:
    """One activity attempt the world is holding until the test (or `settle`) answers it."""

    activity: str
    key: str  # the room, or the avatar session id
    answer: asyncio.Future[Outcome]


@dataclass
class ScriptedWorld:
    """LiveKit and LiveAvatar as the activities see them; every call waits for the test to answer it.

    `rooms` and `avatars` are what exists at the services; `first_calls` counts each operation once (attempt
    1), so retries of one command are not mistaken for a second release; `violations` collects every broken
    ordering promise as it happens. With `settle` set, every call (already held or new) succeeds at once, and
    keep-alives run until they are cancelled.
    """

    rooms: set[str] = field(default_factory=set)
    avatars: dict[str, str] = field(default_factory=dict)  # id -> created | started | stopped
    held: list[Call] = field(default_factory=list)
    first_calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Operations the workflow is still waiting on: from the first attempt until one that ends it for good.
    unsettled: set[tuple[str, str]] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    settle: bool = False
    _next_avatar: int = 0

    # -- the test's side ---------------------------------------------------------------------------------

    def answerable(self) -> list[Call]:
        return [c for c in self.held if not c.answer.done()]

    def answer(self, call: Call, outcome: Outcome) -> None:
        if not call.answer.done():
            call.answer.set_result(outcome)

    def settle_all(self) -> None:
        self.settle = True
        for call in self.answerable():
            if call.activity != "keep_avatar_alive":
                self.answer(call, Outcome.OK)

    def in_flight(self, activity_name: str, key: str) -> bool:
        return (activity_name, key) in self.unsettled

    # -- the activities' side ----------------------------------------------------------------------------

    async def _hold(self, activity_name: str, key: str) -> Outcome:
        info = activity.info()
        # A local activity (the room create) cut short by a worker's loss runs again from attempt 1 on the next
        # worker: the same operation, still unsettled, not a second one. And one that ran to the end but whose
        # workflow task was not recorded (timed out, or its completion refused) runs again too: asking LiveKit for a
        # room that exists is idempotent, not a second room.
        again = activity_name == "create_room" and key in self.rooms
        if info.attempt == 1 and (activity_name, key) not in self.unsettled and not again:
            self.first_calls[(activity_name, key)] += 1
            self.unsettled.add((activity_name, key))
        call = Call(activity_name, key, asyncio.get_running_loop().create_future())
        if self.settle and activity_name != "keep_avatar_alive":
            call.answer.set_result(Outcome.OK)
        self.held.append(call)
        try:
            while not call.answer.done():
                activity.heartbeat()  # how a cancel (end, worker shutdown) reaches the activity
                await asyncio.wait({call.answer}, timeout=0.1)
            outcome = call.answer.result()
            last_attempt = info.retry_policy is not None and 0 < info.retry_policy.maximum_attempts <= info.attempt
            if outcome is not Outcome.RETRY or last_attempt:
                self.unsettled.discard((activity_name, key))
            return outcome
        finally:
            self.held.remove(call)

    @staticmethod
    def _raise(outcome: Outcome, what: str) -> None:
        if outcome is Outcome.RETRY:
            raise ApplicationError(f"{what}: service unavailable (retryable)", type="Unavailable")
        if outcome in (Outcome.FAIL, Outcome.REACHED_FAIL):
            raise ApplicationError(f"{what}: refused", type="Refused", non_retryable=True)

    @activity.defn(name="create_room")
    async def create_room(self, inp: CreateRoomInput) -> None:
        outcome = await self._hold("create_room", inp.room)
        if outcome in (Outcome.OK, Outcome.REACHED_FAIL):
            self.rooms.add(inp.room)
        self._raise(outcome, f"create room {inp.room}")

    @activity.defn(name="delete_room")
    async def delete_room(self, room: str) -> None:
        if self.in_flight("create_room", room):
            self.violations.append(f"delete_room {room} while its create was in flight")
        outcome = await self._hold("delete_room", room)
        self._raise(outcome, f"delete room {room}")
        self.rooms.discard(room)

    @activity.defn(name="mint_participant_token")
    async def mint_participant_token(self, inp: MintTokenInput) -> JoinGrant:
        if inp.room not in self.rooms:
            self.violations.append(f"a token for {inp.identity} was minted for room {inp.room}, which does not exist")
        return fake_grant(inp)

    @activity.defn(name="create_avatar_session")
    async def create_avatar_session(self, inp: CreateAvatarInput) -> AvatarCreated:
        outcome = await self._hold("create_avatar_session", inp.identity)
        self._raise(outcome, "create an avatar session")
        self._next_avatar += 1
        avatar_id = f"av-{self._next_avatar}"
        self.avatars[avatar_id] = "created"
        return AvatarCreated(avatar_session_id=avatar_id, session_token=f"token-{avatar_id}")

    @activity.defn(name="start_avatar_session")
    async def start_avatar_session(self, inp: StartAvatarInput) -> None:
        avatar_id = inp.avatar_session_id
        if self.avatars.get(avatar_id) == "stopped":
            self.violations.append(f"avatar {avatar_id} started after it was stopped")
        outcome = await self._hold("start_avatar_session", avatar_id)
        if outcome in (Outcome.OK, Outcome.REACHED_FAIL) and self.avatars.get(avatar_id) != "stopped":
            self.avatars[avatar_id] = "started"
        self._raise(outcome, f"start avatar {avatar_id}")

    @activity.defn(name="keep_avatar_alive")
    async def keep_avatar_alive(self, ref: AvatarRef) -> None:
        outcome = await self._hold("keep_avatar_alive", ref.avatar_session_id)
        assert outcome is Outcome.ENDED
        self.avatars[ref.avatar_session_id] = "stopped"  # LiveAvatar ended it: it bills no more
        raise ApplicationError(f"avatar session {ref.avatar_session_id} ended", type="AvatarSessionEnded", non_retryable=True)

    @activity.defn(name="stop_avatar_session")
    async def stop_avatar_session(self, ref: AvatarRef) -> None:
        avatar_id = ref.avatar_session_id
        if self.in_flight("start_avatar_session", avatar_id):
            self.violations.append(f"stop of avatar {avatar_id} while its start was in flight")
        outcome = await self._hold("stop_avatar_session", avatar_id)
        self._raise(outcome, f"stop avatar {avatar_id}")
        self.avatars[avatar_id] = "stopped"

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.create_room, self.delete_room, self.mint_participant_token, self.create_avatar_session,
            self.start_avatar_session, self.keep_avatar_alive, self.stop_avatar_session,
        ]
