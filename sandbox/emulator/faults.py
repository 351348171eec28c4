"""Fault injection and rate limiting, applied to every ``/v1`` call before it reaches its handler."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, Field

# Fault/latency/hang rules name endpoints by these short names; "*" matches every endpoint.
ENDPOINT_NAMES: dict[str, str] = {
    "/v1/sessions/token": "token",
    "/v1/sessions/start": "start",
    "/v1/sessions/stop": "stop",
    "/v1/sessions/keep-alive": "keep-alive",
    "/v1/sessions": "list",
    "/v1/sessions/{session_id}": "get",
    "/v1/users/credits": "credits",
}
Endpoint = Literal["token", "start", "stop", "keep-alive", "list", "get", "credits", "*"]


class FaultRule(BaseModel):
    """The next ``count`` calls to ``endpoint`` answer ``status`` (with ``Retry-After`` if given, or for 429)."""

    endpoint: Endpoint
    status: int = Field(ge=400, le=599)
    count: int = Field(1, ge=1)
    retry_after: int | None = Field(None, ge=0)
    message: str | None = None


class LatencyRule(BaseModel):
    """Calls to ``endpoint`` are delayed ``seconds`` before the handler runs, or after it ("after": the effect
    happens but the answer is late, as when a client times out on a call that succeeded). Until reset."""

    endpoint: Endpoint
    seconds: float = Field(ge=0)
    phase: Literal["before", "after"] = "before"


class HangRule(BaseModel):
    """The next ``count`` calls to ``endpoint`` never answer until ``/_control/reset`` (then 503, no effect)."""

    endpoint: Endpoint
    count: int = Field(1, ge=1)


class FaultInjector:
    def __init__(self) -> None:
        self._faults: dict[str, FaultRule] = {}
        self._latency: dict[str, LatencyRule] = {}
        self._hangs: dict[str, int] = {}
        self._release = asyncio.Event()
        self.hung_calls = 0

    def add_fault(self, rule: FaultRule) -> None:
        self._faults[rule.endpoint] = rule

    def set_latency(self, rule: LatencyRule) -> None:
        self._latency[rule.endpoint] = rule

    def add_hang(self, rule: HangRule) -> None:
        self._hangs[rule.endpoint] = self._hangs.get(rule.endpoint, 0) + rule.count

    def reset(self) -> None:
        """Clear every rule and release every hung call."""
        self._faults.clear()
        self._latency.clear()
        self._hangs.clear()
        self._release.set()
        self._release = asyncio.Event()

    def take_fault(self, endpoint: str) -> FaultRule | None:
        """Consume one armed fault for ``endpoint`` (specific rules before "*")."""
        for key in (endpoint, "*"):
            rule = self._faults.get(key)
            if rule is not None:
                if rule.count <= 1:
                    del self._faults[key]
                else:
                    self._faults[key] = rule.model_copy(update={"count": rule.count - 1})
                return rule
        return None

    async def delay(self, endpoint: str, phase: Literal["before", "after"]) -> None:
        rule = self._latency.get(endpoint) or self._latency.get("*")
        if rule is not None and rule.phase == phase and rule.seconds > 0:
            await asyncio.sleep(rule.seconds)

    async def hang_if_armed(self, endpoint: str) -> bool:
        """If a hang is armed for ``endpoint``, block until reset and return True."""
        for key in (endpoint, "*"):
            if self._hangs.get(key, 0) > 0:
                self._hangs[key] -= 1
                self.hung_calls += 1
                try:
                    await self._release.wait()
                finally:
                    self.hung_calls -= 1
                return True
        return False


class FixedWindowRateLimiter:
    """At most ``limit`` calls per key in each fixed 1-second window (window boundaries on whole seconds)."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self._clock = clock
        self._window = -1
        self._counts: dict[tuple[str, str], int] = {}

    def hit(self, key: tuple[str, str]) -> tuple[bool, int]:
        """Count one call; return (allowed, whole seconds until the window resets, at least 1)."""
        now = self._clock()
        window = math.floor(now)
        if window != self._window:
            self._window, self._counts = window, {}
        self._counts[key] = self._counts.get(key, 0) + 1
        return self._counts[key] <= self.limit, max(1, math.ceil(window + 1 - now))

    def reset(self) -> None:
        self._counts.clear()
