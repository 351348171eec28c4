"""The per-app emulator state, reachable from handlers as a FastAPI dependency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from .config import EmulatorConfig
from .faults import FaultInjector, FixedWindowRateLimiter
from .sessions import SessionRegistry


@dataclass
class EmulatorState:
    config: EmulatorConfig
    registry: SessionRegistry = field(init=False)
    faults: FaultInjector = field(default_factory=FaultInjector)
    limiter: FixedWindowRateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.registry = SessionRegistry(self.config)
        self.limiter = FixedWindowRateLimiter(self.config.rate_limit_per_s)


def _state(request: Request) -> EmulatorState:
    state: EmulatorState = request.app.state.emulator
    return state


Emulator = Annotated[EmulatorState, Depends(_state)]
