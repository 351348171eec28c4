"""Typed async client for the LiveAvatar HTTP API (real service or ``sandbox.emulator``).

Contract (reference/liveavatar-api.md §1–3, §10):

- Methods mirror the endpoints and return pydantic models; sessions are always created in ``LITE`` mode with our
  own LiveKit room (``livekit_config``).
- Success is decided on HTTP 2xx only; the envelope's ``code`` is never consulted.
- Every other outcome raises a ``LiveAvatarError`` subclass naming the failure kind (auth, validation, not found,
  conflict, rate limited with ``retry_after``, concurrency limit, insufficient credits, server error, unavailable).
- No retries here: callers are Temporal activities and retries belong to their retry policies.
- Session tokens are credentials: keep them out of logs and workflow history (§10.1).
"""

from __future__ import annotations

import email.utils
import time
from datetime import datetime
from enum import StrEnum
from types import TracebackType
from typing import Any, Literal, Self

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

# -- models ---------------------------------------------------------------------------------------------------------


class SessionEndReason(StrEnum):
    """``SessionEndReasonEnum``. The real enum grows over time: unknown values parse as ``UNKNOWN``."""

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

    @classmethod
    def parse(cls, value: object) -> SessionEndReason:
        """Lenient parse: anything that is not a known member becomes ``UNKNOWN``."""
        try:
            return cls(str(value).upper())
        except ValueError:
            return cls.UNKNOWN


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class VideoSettings(_Lenient):
    quality: Literal["very_high", "high", "medium", "low"] = "high"
    encoding: Literal["VP8", "H264"] = "H264"


class SessionToken(_Lenient):
    """``POST /v1/sessions/token`` result. ``session_token`` is a credential (Bearer for session calls)."""

    session_id: str
    session_token: str


class StartedSession(_Lenient):
    """``POST /v1/sessions/start`` result (201)."""

    session_id: str
    livekit_url: str | None = None
    livekit_client_token: str | None = None
    livekit_agent_token: str | None = None
    max_session_duration: int | None = None
    ws_url: str | None = None


class SessionEntry(_Lenient):
    """An active or historic session entry (§3.5). ``end_at``/``end_reason`` are set only once it has ended."""

    id: str
    created_at: datetime | None = None
    updated_at: datetime | None = None
    duration: int = 0
    source: str | None = None
    mode: str | None = None
    is_sandbox: bool = False
    credits_consumed: float = 0.0
    end_at: datetime | None = None
    end_reason: SessionEndReason | None = None

    @field_validator("end_reason", mode="before")
    @classmethod
    def _lenient_end_reason(cls, value: object) -> SessionEndReason | None:
        return None if value is None else SessionEndReason.parse(value)

    @property
    def is_ended(self) -> bool:
        """The only documented "ended" signal: ``end_at`` or ``end_reason`` present."""
        return self.end_at is not None or self.end_reason is not None


class SessionPage(_Lenient):
    """One page of ``GET /v1/sessions``."""

    count: int
    next: str | None = None
    previous: str | None = None
    results: list[SessionEntry] = Field(default_factory=list)


class Credits(_Lenient):
    credits_left: float


class StopOutcome(StrEnum):
    """How ``stop_session_confirmed`` established that a session is no longer running."""

    STOPPED = "STOPPED"  # the stop call itself succeeded
    ALREADY_ENDED = "ALREADY_ENDED"  # stop failed, GET shows end_at/end_reason
    UNKNOWN_SESSION = "UNKNOWN_SESSION"  # stop failed, GET answers 404


# -- errors ---------------------------------------------------------------------------------------------------------


class LiveAvatarError(Exception):
    """A LiveAvatar call did not succeed. ``status`` is the HTTP status (None when no response arrived)."""

    def __init__(
        self, status: int | None, message: str, retry_after: float | None = None, *, request: str = ""
    ) -> None:
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.request = request
        where = f"{request} " if request else ""
        answer = f"answered HTTP {status}" if status is not None else "got no answer"
        super().__init__(f"LiveAvatar {where}{answer}: {message}")


class LiveAvatarUnavailable(LiveAvatarError):
    """No HTTP response: connection refused/reset, DNS, or timeout. The call may or may not have taken effect."""


class LiveAvatarAuthError(LiveAvatarError):
    """401/403: wrong or missing API key, or a session token used where the API key is required (or vice versa)."""


class LiveAvatarValidationError(LiveAvatarError):
    """422 (FastAPI validation) or 400: the request is wrong and will fail the same way again."""


class LiveAvatarNotFound(LiveAvatarError):
    """404: unknown session (or already stopped, for stop/keep-alive)."""


class LiveAvatarConflict(LiveAvatarError):
    """409: the session is in the wrong state for this call (e.g. already started)."""


class LiveAvatarRateLimited(LiveAvatarError):
    """429: over the per-second budget; ``retry_after`` holds the server's ``Retry-After`` in seconds."""


class LiveAvatarConcurrencyLimit(LiveAvatarError):
    """A non-422 4xx about concurrent sessions / limits (§5.7): sweep orphans, then retry with backoff."""


class LiveAvatarInsufficientCredits(LiveAvatarError):
    """402: the balance cannot cover a minute; an operator must add credits."""


class LiveAvatarServerError(LiveAvatarError):
    """5xx. On ``start`` a 500 may be a bad ``livekit_config`` (e.g. token without canPublishData)."""


def classify_error(
    status: int, message: str, retry_after: float | None = None, *, request: str = ""
) -> LiveAvatarError:
    """Map an HTTP error status (and message) to the exception class for that failure kind."""
    lowered = message.lower()
    cls: type[LiveAvatarError]
    if status in (401, 403):
        cls = LiveAvatarAuthError
    elif status == 429:
        cls = LiveAvatarRateLimited
    elif status == 422:
        cls = LiveAvatarValidationError
    elif status == 404:
        cls = LiveAvatarNotFound
    elif 400 <= status < 500 and ("concurren" in lowered or "limit" in lowered):
        cls = LiveAvatarConcurrencyLimit
    elif status == 400:
        cls = LiveAvatarValidationError
    elif status == 402:
        cls = LiveAvatarInsufficientCredits
    elif status == 409:
        cls = LiveAvatarConflict
    elif status >= 500:
        cls = LiveAvatarServerError
    else:
        cls = LiveAvatarError
    return cls(status, message, retry_after, request=request)


def error_message(response: httpx.Response) -> str:
    """Best human-readable message from an error body of any of the shapes seen in the wild (§2)."""
    try:
        body: Any = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:300] if text else response.reason_phrase or "no error body"
    if isinstance(body, dict):
        detail = body.get("detail")
        if isinstance(detail, list) and detail:  # FastAPI 422
            return "; ".join(_describe_validation_error(item) for item in detail)
        if isinstance(detail, str) and detail:
            return detail
        data, error = body.get("data"), body.get("error")
        for candidate in (
            data.get("message") if isinstance(data, dict) else None,
            data[0].get("message") if isinstance(data, list) and data and isinstance(data[0], dict) else None,
            error.get("message") if isinstance(error, dict) else error,
            body.get("message"),
        ):
            if isinstance(candidate, str) and candidate:
                return candidate
    return str(body)[:300]


def _describe_validation_error(item: object) -> str:
    if not isinstance(item, dict):
        return str(item)
    loc = ".".join(str(part) for part in item.get("loc", []))
    return f"{loc}: {item.get('msg', 'invalid')}" if loc else str(item.get("msg", "invalid"))


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None if absent or unparseable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# -- client ---------------------------------------------------------------------------------------------------------


class LiveAvatarClient:
    """Async context manager over an ``httpx.AsyncClient`` bound to one LiveAvatar base URL and API key.

    ``transport`` is for tests (e.g. ``httpx.MockTransport``); ``timeout`` bounds every call (seconds).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._api_key = api_key
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            transport=transport,
            headers={"Accept": "application/json"},
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- endpoints --

    async def create_session_token(
        self,
        avatar_id: str,
        *,
        livekit_url: str,
        livekit_room: str,
        livekit_client_token: str,
        max_session_duration: int,
        is_sandbox: bool = False,
        video_settings: VideoSettings | None = None,
    ) -> SessionToken:
        """``POST /v1/sessions/token`` in LITE mode with our own LiveKit room. Does not bill."""
        body: dict[str, Any] = {
            "mode": "LITE",
            "avatar_id": avatar_id,
            "is_sandbox": is_sandbox,
            "max_session_duration": max_session_duration,
            "livekit_config": {
                "livekit_url": livekit_url,
                "livekit_room": livekit_room,
                "livekit_client_token": livekit_client_token,
            },
        }
        if video_settings is not None:
            body["video_settings"] = video_settings.model_dump()
        return SessionToken.model_validate(await self._call("POST", "/v1/sessions/token", json=body))

    async def start_session(self, session_token: str) -> StartedSession:
        """``POST /v1/sessions/start`` with the session's Bearer token. Billing starts; the avatar joins the room."""
        data = await self._call("POST", "/v1/sessions/start", json={}, bearer=session_token)
        return StartedSession.model_validate(data)

    async def stop_session(self, session_id: str, reason: SessionEndReason | str = SessionEndReason.USER_CLOSED) -> None:
        """``POST /v1/sessions/stop`` with the API key. Raises ``LiveAvatarNotFound`` if unknown or already ended."""
        await self._call("POST", "/v1/sessions/stop", json={"session_id": str(session_id), "reason": str(reason)})

    async def stop_session_confirmed(
        self, session_id: str, reason: SessionEndReason | str = SessionEndReason.USER_CLOSED
    ) -> StopOutcome:
        """Stop, treating "already over" as success (§10.4).

        On a 4xx other than 401/422/429 the session is looked up: ended (``end_at``/``end_reason``) or unknown
        (404) counts as stopped; if it is still running the original stop error is raised. Auth, validation,
        rate-limit, server and transport errors propagate unchanged.
        """
        try:
            await self.stop_session(session_id, reason)
        except LiveAvatarError as stop_error:
            status = stop_error.status
            if status is None or not 400 <= status < 500 or status in (401, 422, 429):
                raise
            try:
                entry = await self.get_session(session_id)
            except LiveAvatarNotFound:
                return StopOutcome.UNKNOWN_SESSION
            if entry.is_ended:
                return StopOutcome.ALREADY_ENDED
            raise
        return StopOutcome.STOPPED

    async def keep_alive(self, session_id: str) -> None:
        """``POST /v1/sessions/keep-alive`` with the API key: resets the session's idle timer."""
        await self._call("POST", "/v1/sessions/keep-alive", json={"session_id": str(session_id)})

    async def get_session(self, session_id: str) -> SessionEntry:
        """``GET /v1/sessions/{id}``. Raises ``LiveAvatarNotFound`` for an unknown id."""
        return SessionEntry.model_validate(await self._call("GET", f"/v1/sessions/{session_id}"))

    async def list_sessions(
        self, type: Literal["active", "historic"], page: int = 1, page_size: int = 20
    ) -> SessionPage:
        """``GET /v1/sessions?type=…`` (page ≥ 1, page_size 1–100)."""
        params = {"type": type, "page": page, "page_size": page_size}
        return SessionPage.model_validate(await self._call("GET", "/v1/sessions", params=params))

    async def credits(self) -> Credits:
        """``GET /v1/users/credits``: balance, and a cheap check that the API key works."""
        return Credits.model_validate(await self._call("GET", "/v1/users/credits"))

    # -- plumbing --

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        bearer: str | None = None,
    ) -> Any:
        """Send one request; return the envelope's ``data`` on 2xx, raise the classified error otherwise."""
        headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {"X-API-KEY": self._api_key}
        request = f"{method} {path}"
        try:
            response = await self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.TimeoutException as exc:
            raise LiveAvatarUnavailable(None, f"timed out ({type(exc).__name__})", request=request) from exc
        except httpx.TransportError as exc:
            raise LiveAvatarUnavailable(None, f"{type(exc).__name__}: {exc}", request=request) from exc
        if not response.is_success:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise classify_error(response.status_code, error_message(response), retry_after, request=request)
        try:
            body = response.json()
        except ValueError as exc:
            raise LiveAvatarServerError(
                response.status_code, f"2xx answer is not JSON: {response.text[:200]!r}", request=request
            ) from exc
        return body.get("data") if isinstance(body, dict) and "data" in body else body
