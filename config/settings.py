"""All runtime configuration, in one pydantic-settings class.

Every process (worker, gateway, CLI, tests) reads its settings from here, so an environment variable means the
same thing everywhere. The defaults describe the embedded local stack on 127.0.0.1 (see ``sandbox.stack``);
setting ``LIVEKIT_URL`` / ``LIVEAVATAR_API_KEY`` / ``TEMPORAL_ADDRESS`` points the same code at real services.
Secrets have no production defaults: the only ones here are the local LiveKit dev key and the emulator's key.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The local LiveKit server runs with --dev and no keys, which gives exactly this pair (reference/livekit.md §4.1).
LOCAL_LIVEKIT_API_KEY = "devkey"
LOCAL_LIVEKIT_API_SECRET = "secret"
# The LiveAvatar emulator accepts this key; it is not a credential for anything real.
LOCAL_LIVEAVATAR_API_KEY = "emulator-dev-key"
# LiveAvatar's public sandbox avatar ("Wayne"); the emulator accepts any uuid.
DEFAULT_AVATAR_ID = "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a"


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class ApiKeyHash(BaseModel):
    """One API key the sessions HTTP API accepts, as configured: only its SHA-256 digest, never the key itself
    (`sessionflow api-key` makes a key and prints both), and a name for logs."""

    model_config = ConfigDict(frozen=True)

    name: str
    sha256: bytes


_API_KEY_ENTRY = re.compile(r"^(?:(?P<name>[A-Za-z0-9_.-]{1,64}):)?(?P<digest>[0-9a-f]{64})$")


def parse_api_keys(value: Any) -> tuple[ApiKeyHash, ...]:
    """`SESSIONFLOW_API_KEYS`: comma-separated `[name:]<sha256 hex>` entries (names default to key-1, key-2, ...)."""
    if isinstance(value, tuple | list):
        return tuple(value)
    keys = []
    for n, entry in enumerate(e.strip() for e in str(value or "").split(",") if e.strip()):
        match = _API_KEY_ENTRY.match(entry)
        if match is None:
            raise ValueError(
                f"SESSIONFLOW_API_KEYS entry {n + 1} is not `[name:]<64 lowercase hex digits>` (the SHA-256 of a key, "
                "as `sessionflow api-key` prints it)"
            )
        keys.append(ApiKeyHash(name=match["name"] or f"key-{n + 1}", sha256=bytes.fromhex(match["digest"])))
    return tuple(keys)


# The local stack's ports (sandbox/stack.py StackPorts); SESSIONFLOW_PORT_OFFSET moves every one of them.
_OFFSET_FIELDS = ("temporal_address", "temporal_ui_url", "livekit_url", "liveavatar_api_url", "gateway_port")


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

    # Sessions HTTP API (starters/api.py): the keys it accepts (hashed), and the largest request body it reads.
    api_keys: Annotated[tuple[ApiKeyHash, ...], NoDecode] = Field((), validation_alias=_env("SESSIONFLOW_API_KEYS"))
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024, validation_alias=_env("SESSIONFLOW_MAX_BODY_BYTES"))

    # The local stack's port offset (as `python -m sandbox` applies it): moves the default local addresses, so
    # every process (worker, CLI, gateway) finds a stack started with the same offset. Explicit addresses win.
    port_offset: int = Field(0, ge=0, le=50000, validation_alias=_env("SESSIONFLOW_PORT_OFFSET"))

    # Logging
    log_format: str = Field("auto", validation_alias=_env("SESSIONFLOW_LOG_FORMAT"))  # auto | json | console
    log_level: str = Field("INFO", validation_alias=_env("SESSIONFLOW_LOG_LEVEL"))

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, value: Any) -> tuple[ApiKeyHash, ...]:
        return parse_api_keys(value)

    @model_validator(mode="after")
    def _apply_port_offset(self) -> Self:
        if not self.port_offset:
            return self
        for name in _OFFSET_FIELDS:
            if name in self.model_fields_set:
                continue  # set explicitly (TEMPORAL_ADDRESS=...): used as given
            default = type(self).model_fields[name].default
            if isinstance(default, int):
                setattr(self, name, default + self.port_offset)
            else:
                setattr(self, name, re.sub(r":(\d+)$", lambda m: f":{int(m[1]) + self.port_offset}", default))
        return self

    @property
    def livekit_http_url(self) -> str:
        """The same server as ``livekit_url``, for the Twirp API."""
        return self.livekit_url.replace("wss://", "https://", 1).replace("ws://", "http://", 1)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
