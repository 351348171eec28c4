"""All runtime configuration, in one pydantic-settings class.

Every process (worker, gateway, CLI, tests) reads its settings from here, so an environment variable means the
same thing everywhere. The defaults describe the embedded local stack on 127.0.0.1 (see ``sandbox.stack``);
setting ``LIVEKIT_URL`` / ``LIVEAVATAR_API_KEY`` / ``TEMPORAL_ADDRESS`` points the same code at real services.
Secrets have no defaults: LiveKit credentials and the codec keys must be set (the local stack generates its
own in its state directory and exports them); the only built-in key is the LiveAvatar emulator's.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from workflows.models import CONTINUE_AS_NEW_MIN_EVENTS

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
    # A self-hosted cluster's own CA (Temporal Cloud's certificate chains to a public root: leave unset), and the
    # name its certificate carries when that is not the host in TEMPORAL_ADDRESS (e.g. an address by IP).
    temporal_tls_ca: Path | None = Field(None, validation_alias=_env("TEMPORAL_TLS_CA"))
    temporal_tls_server_name: str | None = Field(None, validation_alias=_env("TEMPORAL_TLS_SERVER_NAME"))
    # How long a request (join, end, extend, ...) keeps being retried while Temporal is unreachable, counted from
    # its start: one history or frontend process restarting takes 5-15 s (reference/temporal-cluster.md),
    # longer than the SDK's own 10 s retry budget. After it the caller gets `TemporalUnavailable` (safe to retry).
    temporal_retry_deadline_s: float = Field(60.0, gt=0, validation_alias=_env("SESSIONFLOW_TEMPORAL_RETRY_DEADLINE"))
    temporal_ui_url: str = Field("http://127.0.0.1:8233", validation_alias=_env("TEMPORAL_UI_URL"))
    task_queue: str = Field("sessionflow", validation_alias=_env("SESSIONFLOW_TASK_QUEUE"))
    # Every room and workflow id this deployment creates starts with `session-<deployment>-`, so the reaper can
    # tell ours from another app's or another deployment's on a shared LiveKit project (no '-': the prefix of
    # one deployment is never the prefix of another's).
    deployment: str = Field("local", pattern=r"^[a-z0-9]{1,20}$", validation_alias=_env("SESSIONFLOW_DEPLOYMENT"))
    # The room monitors run here (`sessionflow worker --media`), apart from workflow work; starters pass it on.
    # Empty: sessions started with these settings run no room monitor (webhooks only).
    media_task_queue: str = Field("session-media", validation_alias=_env("SESSIONFLOW_MEDIA_TASK_QUEUE"))
    # How many rooms one media worker watches at once (each monitor is one long-running activity).
    media_max_sessions: int = Field(200, ge=1, validation_alias=_env("SESSIONFLOW_MEDIA_MAX_SESSIONS"))
    # Whether the monitor receives each person's audio (for per-participant jitter and loss from RTC stats) or
    # only subscribes to it (for LiveKit's connection quality) with the media paused: receiving it was 43 % of a
    # media worker's CPU in a profile (docs/benchmarks.md, capacity).
    monitor_receive_audio: bool = Field(True, validation_alias=_env("SESSIONFLOW_MONITOR_RECEIVE_AUDIO"))

    # The session worker's tuning (workers/worker.build_worker; measured in docs/benchmarks.md, "worker tuning").
    # The defaults are the SDK's: on the 2-core development machine no other setting measured faster.
    # Workflow tasks (and activities) one worker runs at once.
    worker_max_concurrent_workflow_tasks: int = Field(100, ge=2, validation_alias=_env("SESSIONFLOW_WORKER_WORKFLOW_TASKS"))
    worker_max_concurrent_activities: int = Field(100, ge=1, validation_alias=_env("SESSIONFLOW_WORKER_ACTIVITIES"))
    # Local activities at once: every join runs two (the room create and the token) inside its first workflow task.
    worker_max_concurrent_local_activities: int = Field(
        100, ge=1, validation_alias=_env("SESSIONFLOW_WORKER_LOCAL_ACTIVITIES")
    )
    # Long polls kept open for workflow and activity tasks; with poller autoscaling on, these are the most, and the
    # server's feedback decides how many (the SDK starts with 5 or fewer, keeps at least 1).
    worker_workflow_task_pollers: int = Field(5, ge=2, validation_alias=_env("SESSIONFLOW_WORKER_WORKFLOW_POLLERS"))
    worker_activity_task_pollers: int = Field(5, ge=1, validation_alias=_env("SESSIONFLOW_WORKER_ACTIVITY_POLLERS"))
    worker_poller_autoscaling: bool = Field(False, validation_alias=_env("SESSIONFLOW_WORKER_POLLER_AUTOSCALING"))
    # Sessions kept in the worker's memory between their workflow tasks (sticky cache): one not cached is replayed
    # from its whole history at its next task. Each live session is one entry; more than this costs replays.
    worker_max_cached_workflows: int = Field(1000, ge=0, validation_alias=_env("SESSIONFLOW_WORKER_CACHED_SESSIONS"))
    # A session continues as new once its history has this many events (carried to it in the memo, like the media
    # task queue); 0: only when the Temporal server suggests it (about 4k events or 4 MB by default).
    continue_as_new_after_events: int = Field(
        0, ge=0, validation_alias=_env("SESSIONFLOW_CONTINUE_AS_NEW_AFTER_EVENTS")
    )

    # LiveKit
    livekit_url: str = Field("ws://127.0.0.1:7880", validation_alias=_env("LIVEKIT_URL"))
    # No default: the well-known `devkey`/`secret` pair would sign valid tokens for anyone (issue 9). The local
    # stack generates a pair in its state directory and exports it (sandbox/secrets.py).
    livekit_api_key: str = Field(validation_alias=_env("LIVEKIT_API_KEY"))
    livekit_api_secret: SecretStr = Field(validation_alias=_env("LIVEKIT_API_SECRET"))
    # Where the egress service writes a session's recording (its own storage settings apply); LiveKit fills in
    # {room_name} and {time}.
    recording_filepath: str = Field(
        "sessionflow/{room_name}-{time}.mp4", min_length=1, validation_alias=_env("SESSIONFLOW_RECORDING_FILEPATH")
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
    # The reaper's own task queue: its Schedule always targets this one (never whichever worker started last),
    # and its runs stay out of the sessions' queue and list (docs/support.md).
    reaper_task_queue: str = Field(
        "sessionflow-reaper", min_length=1, validation_alias=_env("SESSIONFLOW_REAPER_TASK_QUEUE")
    )

    # Support (workflows/search_attributes.py): the key of the opaque participant ids in `ParticipantIds`. Set a
    # random one per deployment in production (the default is for the local stack); changing it makes the
    # sessions started before unfindable by participant.
    participant_id_key: SecretStr = Field(
        SecretStr("sessionflow-local-participant-ids"), validation_alias=_env("SESSIONFLOW_PARTICIPANT_ID_KEY")
    )
    # Operators (workers/metrics.py): each worker serves Prometheus metrics on this loopback port (0: none).
    metrics_host: str = Field("127.0.0.1", validation_alias=_env("SESSIONFLOW_METRICS_HOST"))
    metrics_port: int = Field(9464, ge=0, le=65535, validation_alias=_env("SESSIONFLOW_METRICS_PORT"))

    # Gateway (LiveKit webhook receiver)
    gateway_host: str = Field("127.0.0.1", validation_alias=_env("SESSIONFLOW_GATEWAY_HOST"))
    gateway_port: int = Field(8099, validation_alias=_env("SESSIONFLOW_GATEWAY_PORT"))

    # Payload encryption (workers/codec.py): `id:base64key,...` newest first, or a JSON key file. One is required
    # by every Temporal client; the local stack generates a key in its state directory.
    codec_keys: SecretStr | None = Field(None, validation_alias=_env("SESSIONFLOW_CODEC_KEYS"))
    codec_key_file: Path | None = Field(None, validation_alias=_env("SESSIONFLOW_CODEC_KEY_FILE"))
    # Codec server (starters/codec_server.py): bearer tokens by role, and the one browser origin (the Temporal UI)
    # allowed to call it. `support` sees tokens masked; `admin` sees everything.
    codec_admin_token: SecretStr | None = Field(None, validation_alias=_env("SESSIONFLOW_CODEC_ADMIN_TOKEN"))
    codec_support_token: SecretStr | None = Field(None, validation_alias=_env("SESSIONFLOW_CODEC_SUPPORT_TOKEN"))
    codec_cors_origin: str | None = Field(None, validation_alias=_env("SESSIONFLOW_CODEC_CORS_ORIGIN"))

    # Sessions HTTP API (starters/api.py): the keys it accepts (hashed), and the largest request body it reads.
    api_keys: Annotated[tuple[ApiKeyHash, ...], NoDecode] = Field((), validation_alias=_env("SESSIONFLOW_API_KEYS"))
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024, validation_alias=_env("SESSIONFLOW_MAX_BODY_BYTES"))

    # The local stack's port offset (as `python -m sandbox` applies it): moves the default local addresses, so
    # every process (worker, CLI, gateway) finds a stack started with the same offset. Explicit addresses win.
    port_offset: int = Field(0, ge=0, le=50000, validation_alias=_env("SESSIONFLOW_PORT_OFFSET"))

    # Logging
    log_format: str = Field("auto", validation_alias=_env("SESSIONFLOW_LOG_FORMAT"))  # auto | json | console
    log_level: str = Field("INFO", validation_alias=_env("SESSIONFLOW_LOG_LEVEL"))

    @field_validator("continue_as_new_after_events")
    @classmethod
    def _continue_as_new_floor(cls, value: int) -> int:
        if 0 < value < CONTINUE_AS_NEW_MIN_EVENTS:
            raise ValueError(
                f"SESSIONFLOW_CONTINUE_AS_NEW_AFTER_EVENTS must be 0 (the server decides) or at least "
                f"{CONTINUE_AS_NEW_MIN_EVENTS}: a new run's own first events must not make it continue again"
            )
        return value

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
