"""The reaper's data: what one sweep is asked to do, and what it found and released.

The reaper removes LiveKit rooms and LiveAvatar sessions of ours that no running session workflow owns (DESIGN.md,
"What catches what the workflow cannot see"). These models travel through Temporal with the pydantic data
converter; they import nothing of ours.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class ReapRequest(BaseModel):
    """One sweep. `grace_seconds`: spare anything younger, so a session that is still recording its resources
    is never reaped; `dry_run`: release nothing, only report what would be released."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grace_seconds: Annotated[float, Field(ge=0, le=24 * 3600)] = 60.0
    dry_run: bool = False


class ReapReport(BaseModel):
    """What one sweep saw and did. With `dry_run`, the `*_released` lists hold what it *would* release."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = False
    rooms_seen: int = 0
    rooms_released: list[str] = []
    avatars_seen: int = 0
    avatars_released: list[str] = []
    # Left alone because nothing proves them ours: rooms without this deployment's prefix, avatar sessions no
    # workflow of this namespace recorded (counts only: another app's resource names stay out of our history).
    rooms_not_ours: int = 0
    avatars_not_ours: int = 0
    # Unowned, but younger than the grace period: looked at again on the next sweep.
    skipped_young: list[str] = []
    # One readable line per item (or listing) that could not be checked or released; the next sweep retries.
    errors: list[str] = []
