"""Request bodies of the emulated API, validated the way the real FastAPI service does (reference §3)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, Discriminator, Field, Tag


class SessionEndReason(StrEnum):
    """``SessionEndReasonEnum`` (reference §3.3): the reasons the emulated service records and accepts on stop.

    The server's own copy, kept apart from the client's: the emulator implements the contract, it does not
    share code with the client it is testing. ``DISPATCH_FAILED`` is not in the published enum but is reported
    by the real service, so it is accepted here too.
    """

    UNKNOWN = "UNKNOWN"
    USER_DISCONNECTED = "USER_DISCONNECTED"
    SERVER_ERROR = "SERVER_ERROR"
    IDLE_TIMEOUT = "IDLE_TIMEOUT"
    NO_CREDITS = "NO_CREDITS"
    USER_CLOSED = "USER_CLOSED"
    AVATAR_DELETED = "AVATAR_DELETED"
    MAX_DURATION_REACHED = "MAX_DURATION_REACHED"
    ZOMBIE_SESSION_REAP = "ZOMBIE_SESSION_REAP"
    AGENT_HANG_UP = "AGENT_HANG_UP"
    DISPATCH_FAILED = "DISPATCH_FAILED"


class VideoSettings(BaseModel):
    quality: Literal["very_high", "high", "medium", "low"] = "high"
    encoding: Literal["VP8", "H264"] = "H264"


class LiveKitConfig(BaseModel):
    """``livekit_config``: all three keys are required when the object is present."""

    livekit_url: str
    livekit_room: str
    livekit_client_token: str


class AgoraConfig(BaseModel):
    agora_app_id: str
    agora_token: str
    agora_channel: str
    agora_uid: str


class _TokenRequestBase(BaseModel):
    avatar_id: UUID
    is_sandbox: bool = False
    video_settings: VideoSettings | None = None
    max_session_duration: int | None = Field(None, gt=0)


class LiteTokenRequest(_TokenRequestBase):
    """``LiteSDKSessionTokenConfigDataSchema``. Voice-agent configs are accepted and ignored."""

    mode: Literal["LITE"]
    livekit_config: LiveKitConfig | None = None
    agora_config: AgoraConfig | None = None
    elevenlabs_agent_config: dict[str, Any] | None = None
    openai_realtime_config: dict[str, Any] | None = None
    gemini_realtime_config: dict[str, Any] | None = None


class AvatarPersona(BaseModel):
    voice_id: UUID | None = None
    context_id: UUID | None = None
    language: str = "en"
    voice_settings: dict[str, Any] | None = None
    stt_config: dict[str, Any] | None = None


class Memory(BaseModel):
    prev_session_id: UUID | None = None
    session_memory_id: UUID | None = None


class FullTokenRequest(_TokenRequestBase):
    """``FullSDKSessionTokenConfigDataSchema`` (the default when ``mode`` is absent)."""

    mode: Literal["FULL"] = "FULL"
    avatar_persona: AvatarPersona
    interactivity_type: Literal["CONVERSATIONAL", "PUSH_TO_TALK"] = "CONVERSATIONAL"
    llm_configuration_id: UUID | None = None
    dynamic_variables: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=1000)]] | None = (
        Field(None, max_length=50)
    )
    memory: Memory | None = None


def _token_mode(body: Any) -> str:
    """Discriminator: ``mode`` selects the schema and defaults to FULL."""
    mode = body.get("mode", "FULL") if isinstance(body, dict) else getattr(body, "mode", "FULL")
    return str(mode)


TokenRequest = Annotated[
    Annotated[LiteTokenRequest, Tag("LITE")] | Annotated[FullTokenRequest, Tag("FULL")],
    Discriminator(_token_mode),
]


class StopRequest(BaseModel):
    """``StopSessionSchema``: ``session_id`` is required when authenticating with the API key."""

    session_id: UUID | None = None
    # Validated strictly against the enum: unlike clients, the server rejects values it does not know.
    reason: SessionEndReason = SessionEndReason.UNKNOWN


class KeepAliveRequest(BaseModel):
    """``KeepSessionAliveSchema``."""

    session_id: UUID | None = None
