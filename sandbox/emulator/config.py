"""Emulator configuration: every timing and limit is overridable so tests can shrink minutes to seconds."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.settings import LOCAL_LIVEAVATAR_API_KEY


class EmulatorConfig(BaseSettings):
    """Read from ``EMULATOR_*`` environment variables (the API key also from ``LIVEAVATAR_API_KEY``).

    Defaults follow reference/liveavatar-api.md §5: a 5-minute idle timeout, zombie reap ~3.5 minutes after the
    avatar was left alone, 60-second sandbox sessions, per-minute billing at 1 credit (LITE) / 2 (FULL).
    """

    model_config = SettingsConfigDict(env_prefix="EMULATOR_", extra="ignore", populate_by_name=True)

    api_key: str = Field(
        LOCAL_LIVEAVATAR_API_KEY, validation_alias=AliasChoices("EMULATOR_API_KEY", "LIVEAVATAR_API_KEY")
    )
    idle_timeout_s: float = Field(300.0, gt=0, description="No keep-alive for this long ends with IDLE_TIMEOUT.")
    zombie_reap_s: float | None = Field(
        200.0, gt=0, description="Avatar alone in its room this long ends with ZOMBIE_SESSION_REAP; None disables."
    )
    sandbox_session_s: float = Field(60.0, gt=0, description="Sandbox sessions end after this (MAX_DURATION_REACHED).")
    max_session_duration_s: int = Field(
        3600, gt=0, description="Plan cap and default for max_session_duration; larger requests are clamped."
    )
    credits: float = Field(1000.0, ge=0, description="Starting balance of the account.")
    billing_period_s: float = Field(60.0, gt=0, description="Length of a billed 'minute'.")
    max_concurrent_sessions: int = Field(20, ge=1, description="Active sessions allowed at once.")
    rate_limit_per_s: int = Field(20, ge=1, description="Calls per caller x endpoint per 1-second window.")
    avatar_join_timeout_s: float = Field(10.0, gt=0, description="How long /start waits for the avatar to join.")
    tick_s: float = Field(0.1, gt=0, description="How often timers (idle, max duration, billing) are checked.")
