"""All runtime configuration, in one pydantic-settings class.

Every process (worker, gateway, CLI, tests) reads its settings from here, so an environment variable means the
same thing everywhere. The defaults describe the embedded local stack on 127.0.0.1 (see ``sandbox.stack``);
setting ``LIVEKIT_URL`` / ``LIVEAVATAR_API_KEY`` / ``TEMPORAL_ADDRESS`` points the same code at real services.
Secrets have no production defaults: the only ones here are the local LiveKit dev key and the emulator's key.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# The local LiveKit server runs with --dev and no keys, which gives exactly this pair (reference/livekit.md §4.1).
LOCAL_LIVEKIT_API_KEY = "devkey"
LOCAL_LIVEKIT_API_SECRET = "secret"
# The LiveAvatar emulator accepts this key; it is not a credential for anything real.
LOCAL_LIVEAVATAR_API_KEY = "emulator-dev-key"
# LiveAvatar's public sandbox avatar ("Wayne"); the emulator accepts any uuid.
DEFAULT_AVATAR_ID = "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a"


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    # Temporal
    temporal_address: str = Field("127.0.0.1:7233", validation_alias=_env("TEMPORAL_ADDRESS"))
    temporal_namespace: str = Field("default", validation_alias=_env("TEMPORAL_NAMESPACE"))
    temporal_api_key: SecretStr | None = Field(None, validation_alias=_env("TEMPORAL_API_KEY"))
    temporal_tls: bool = Field(False, validation_alias=_env("TEMPORAL_TLS"))
    temporal_tls_cert: Path | None = Field(None, validation_alias=_env("TEMPORAL_TLS_CERT"))
    temporal_tls_key: Path | None = Field(None, validation_alias=_env("TEMPORAL_TLS_KEY"))
    temporal_ui_url: str = Field("http://127.0.0.1:8233", validation_alias=_env("TEMPORAL_UI_URL"))
    task_queue: str = Field("sessionflow", validation_alias=_env("SESSIONFLOW_TASK_QUEUE"))
    # The room monitors run here (`sessionflow worker --media`), apart from workflow work; starters pass it on.
    # Empty: sessions started with these settings run no room monitor (webhooks only).
    media_task_queue: str = Field("session-media", validation_alias=_env("SESSIONFLOW_MEDIA_TASK_QUEUE"))
    # How many rooms one media worker watches at once (each monitor is one long-running activity).
    media_max_sessions: int = Field(200, ge=1, validation_alias=_env("SESSIONFLOW_MEDIA_MAX_SESSIONS"))

    # LiveKit
    livekit_url: str = Field("ws://127.0.0.1:7880", validation_alias=_env("LIVEKIT_URL"))
    livekit_api_key: str = Field(LOCAL_LIVEKIT_API_KEY, validation_alias=_env("LIVEKIT_API_KEY"))
    livekit_api_secret: SecretStr = Field(
        SecretStr(LOCAL_LIVEKIT_API_SECRET), validation_alias=_env("LIVEKIT_API_SECRET")
    )
    # livekit-api ignores its own timeout (reference/livekit.md §1.4): every call is bounded by this.
    livekit_call_timeout_s: float = Field(10.0, validation_alias=_env("SESSIONFLOW_LIVEKIT_CALL_TIMEOUT"))

    # LiveAvatar
    liveavatar_api_url: str = Field("http://127.0.0.1:8090", validation_alias=_env("LIVEAVATAR_API_URL"))
    liveavatar_api_key: SecretStr = Field(
        SecretStr(LOCAL_LIVEAVATAR_API_KEY), validation_alias=_env("LIVEAVATAR_API_KEY")
    )
    liveavatar_call_timeout_s: float = Field(15.0, validation_alias=_env("SESSIONFLOW_LIVEAVATAR_CALL_TIMEOUT"))

    # Reaper (workers/schedules.py): how often it sweeps, and how old an unowned room or avatar must be to go.
    reaper_every_s: float = Field(30.0, gt=0, validation_alias=_env("SESSIONFLOW_REAPER_EVERY"))
    reaper_grace_s: float = Field(60.0, ge=0, validation_alias=_env("SESSIONFLOW_REAPER_GRACE"))

    # Gateway (LiveKit webhook receiver)
    gateway_host: str = Field("127.0.0.1", validation_alias=_env("SESSIONFLOW_GATEWAY_HOST"))
    gateway_port: int = Field(8099, validation_alias=_env("SESSIONFLOW_GATEWAY_PORT"))

    # Logging
    log_format: str = Field("auto", validation_alias=_env("SESSIONFLOW_LOG_FORMAT"))  # auto | json | console
    log_level: str = Field("INFO", validation_alias=_env("SESSIONFLOW_LOG_LEVEL"))

    @property
    def livekit_http_url(self) -> str:
        """The same server as ``livekit_url``, for the Twirp API."""
        return self.livekit_url.replace("wss://", "https://", 1).replace("ws://", "http://", 1)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
