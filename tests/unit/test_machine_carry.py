"""The state a long session carries into its next run (continue-as-new): nothing lost, nothing restarted.

The stories are `test_machine`'s (`World`: LiveKit and LiveAvatar as the session can tell, any order of answers),
with the room monitor's reports added. At a drawn moment the machine's state goes through the real payload
converter (as Temporal carries it to the next run) into a twin; from then on both get every event and must answer
with the same commands and the same state. And a world whose session switches runs at every quiet moment still
releases everything exactly once, without creating or starting anything again.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from temporalio.contrib.pydantic import pydantic_data_converter

from tests.unit.test_machine import (
    ROSTER,
    SPECS,
    T0,
    World,
    at,
    drain,
    external_step,
    live,
    live_world,
    make_spec,
    with_started_avatar,
)
from workflows.machine import (
    CarriedSession,
    Command,
    CreateAvatarSession,
    CreateRoom,
    Event,
    KeepAvatarAlive,
    ParticipantJoined,
    ParticipantLeft,
    PresenceObserved,
    QualityChanged,
    SessionMachine,
    StartAvatarSession,
    StartMonitor,
    TimerFired,
    TrackPublished,
    TrackUnpublished,
)
from workflows.models import ConnectionLevel, QualityPolicy

CONVERTER = pydantic_data_converter.payload_converter


def through_temporal(m: SessionMachine) -> SessionMachine:
    """`m`'s state as the next run gets it: carried, written to a payload and read back, restored."""
    payload = CONVERTER.to_payloads([m.carry()])[0]
    [carried] = CONVERTER.from_payloads([payload], [CarriedSession])
    assert isinstance(carried, CarriedSession)
    return SessionMachine.carried(carried)


def whole_state(m: SessionMachine) -> dict[str, object]:
    """Everything the machine knows (what it carries), bar the count of runs."""
    return m.carry().model_dump(mode="json", exclude={"runs"})


class TwinWorld(World):
    """A World whose machine may get a twin restored from its carried state; both then get every event."""

    twin: SessionMachine | None = None

    def apply(self, event: Event) -> list[Command]:
        twin_commands = self.twin.handle(event, self.now) if self.twin is not None else None
        commands = super().apply(event)
        if self.twin is not None:
            assert twin_commands == commands, f"the carried machine answered {event} otherwise"
            assert whole_state(self.twin) == whole_state(self.machine), f"the carried machine diverged on {event}"
            assert self.twin.state() == self.machine.state()
        return commands

    def admit(self, who: str) -> None:
        super().admit(who)
        if self.twin is not None and self.twin.join_decidable:
            try:
                self.twin.check_join(who)
            except Exception:
                return
            self.twin.admit(who)
            assert whole_state(self.twin) == whole_state(self.machine)


MONITOR_STEPS = ["quality", "track", "untrack", "presence", "left_with_sid", "joined_with_sid"]


def monitor_step(world: World, data: st.DataObject) -> None:
    """A report of the room monitor: quality, tracks, who is there, joins and leaves of one connection."""
    kind = data.draw(st.sampled_from(MONITOR_STEPS), label="monitor")
    who = data.draw(st.sampled_from(ROSTER), label="who")
    sid = f"PA_{who}_{data.draw(st.integers(1, 3), label='connection')}"
    world.now += timedelta(seconds=data.draw(st.integers(0, 90), label="monitor_wait_s"))
    event_id = f"mon-{world.event_id()}"
    match kind:
        case "quality":
            level = data.draw(st.sampled_from(list(ConnectionLevel)), label="level")
            world.webhook(QualityChanged(who, level, "rtt 300 ms", event_id))
        case "track":
            world.webhook(TrackPublished(who, f"TR_{who}", "audio", event_id))
        case "untrack":
            world.webhook(TrackUnpublished(who, f"TR_{who}", event_id))
        case "presence":
            present = tuple(p for p in ROSTER if data.draw(st.booleans(), label=f"{p} there"))
            world.webhook(PresenceObserved(present, world.now, event_id))
        case "left_with_sid":
            world.webhook(ParticipantLeft(who, event_id, sid, world.now))
        case "joined_with_sid":
            if world.room_exists:
                world.webhook(ParticipantJoined(who, event_id, sid, world.now))


POLICY = QualityPolicy.model_validate({"end_when_candidate_lost_for": 120})
STORY_SPECS = [*SPECS, make_spec().model_copy(update={"quality_policy": POLICY})]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.sampled_from(STORY_SPECS), data=st.data())
def test_a_machine_carried_at_any_moment_behaves_identically_afterwards(spec, data):
    world = TwinWorld(SessionMachine(spec, started_at=T0))
    world.start()
    steps = data.draw(st.integers(0, 60), label="steps")
    carry_at = data.draw(st.integers(0, steps), label="carry at")
    for n in range(steps):
        if n == carry_at:
            world.twin = through_temporal(world.machine)
            assert whole_state(world.twin) == whole_state(world.machine)
            assert world.twin.state() == world.machine.state()
            assert world.twin.next_deadline() == world.machine.next_deadline()
            assert world.twin.runs == world.machine.runs + 1
        if data.draw(st.integers(0, 3), label="monitor or world") == 0:
            monitor_step(world, data)
        else:
            external_step(world, data)
    drain(world, data)
    world.check_all_released()
    if world.twin is not None:
        assert world.twin.outcome() == world.machine.outcome()


class SwitchingWorld(World):
    """A World whose session continues as new at quiet moments: the old run's watchers are dropped (they find
    their run closed), the new run starts only what `resume` says."""

    switches: int = 0

    def switch(self) -> None:
        m = self.machine
        if not m.quiet or self.pending:
            return  # what the shell waits for: no one-shot work in flight
        for avatar_id, cancelled in list(self.keepalives.items()):
            assert not cancelled, "a quiet session has no keep-alive winding down"
            del self.keepalives[avatar_id]  # the old run's keep-alive stops, releasing nothing
        self.machine = through_temporal(m)
        commands = self.machine.resume()
        assert all(isinstance(c, KeepAvatarAlive | StartMonitor) for c in commands), commands
        assert not [c for c in commands if isinstance(c, CreateRoom | CreateAvatarSession | StartAvatarSession)]
        self.execute(commands)
        self.check_invariants()
        self.switches += 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.sampled_from(SPECS), data=st.data())
def test_a_session_that_continues_as_new_at_quiet_moments_releases_everything_once(spec, data):
    world = SwitchingWorld(**vars(live_world(spec)))  # the common path done (room, alice, avatar), then anything
    for _ in range(data.draw(st.integers(0, 60), label="steps")):
        if data.draw(st.integers(0, 4), label="switch?") == 0:
            world.switch()
        else:
            external_step(world, data)
    drain(world, data)
    world.check_all_released()


def test_the_carried_state_keeps_the_avatar_billing_and_restarts_only_the_watchers():
    m = with_started_avatar(live(make_spec()))
    m.enable_monitor()
    m.room_watch.running = True  # as after the room's create, in a session with a monitor
    assert m.quiet
    carried = through_temporal(m)
    assert carried.avatars == m.avatars and carried.avatars["av-1"].billed_from == at(1)
    assert [type(c) for c in carried.resume()] == [KeepAvatarAlive, StartMonitor]
    assert carried.state().present == ["alice"] and carried.deadline == m.deadline
    # A timer in the new run ends the session at the deadline the old run would have, with the same commands.
    assert carried.handle(TimerFired(), m.deadline) == m.handle(TimerFired(), m.deadline)
    assert carried.outcome() == m.outcome() if carried.released else carried.state() == m.state()


def test_a_session_with_an_avatar_start_in_flight_is_not_quiet():
    m = live(make_spec())  # alice joined: the avatar's create is in flight
    assert m.avatar.creating is not None and not m.quiet


@pytest.mark.parametrize("change", [{"version": 2}, {"surprise": 1}, {"runs": "1"}], ids=str)
def test_a_carried_state_of_another_version_or_shape_is_refused(change):
    data = with_started_avatar(live(make_spec())).carry().model_dump(mode="json")
    with pytest.raises(ValidationError):
        CarriedSession.model_validate_json(json.dumps({**data, **change}))
