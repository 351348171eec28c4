"""Turn failures of outside calls into retryable or non-retryable activity errors.

Retries belong to Temporal's retry policies, never to loops written by hand: an activity either succeeds,
raises a retryable error (Temporal tries again with backoff), or raises a non-retryable `ApplicationError`
whose `type` names the failure for the workflow and for support reading the history.
"""

from __future__ import annotations

import asyncio

import aiohttp
from livekit import api
from temporalio.exceptions import ApplicationError

# LiveKit (reference/livekit.md §1.3-1.4): classify by HTTP status first, then by Twirp code.
_LIVEKIT_FINAL_STATUSES = {400, 401, 403, 404, 412, 501}
_LIVEKIT_PERMANENT_MESSAGES = ("redis required",)


def classify_livekit_error(exc: BaseException, what: str) -> BaseException:
    """The error an activity should raise for `exc`, a failure of the LiveKit call described by `what`.

    The original ServerError stays reachable as `__cause__` (the caller raises `from exc`), so a caller may
    look at its status (404 on delete is success).
    """
    if isinstance(exc, api.ServerError):
        permanent = exc.status in _LIVEKIT_FINAL_STATUSES or any(m in exc.message for m in _LIVEKIT_PERMANENT_MESSAGES)
        kind = "LiveKitAuthError" if exc.status == 401 else f"LiveKit_{exc.code or exc.status}"
        hint = " (check LIVEKIT_API_KEY / LIVEKIT_API_SECRET)" if exc.status == 401 else ""
        return ApplicationError(
            f"LiveKit refused to {what}: {exc.status} {exc.code} {exc.message}{hint}",
            type=kind,
            non_retryable=permanent,
        )
    if isinstance(exc, (aiohttp.ClientError, OSError, asyncio.TimeoutError, TimeoutError)):
        return ApplicationError(
            f"LiveKit unreachable while trying to {what}: {type(exc).__name__}: {exc}",
            type="LiveKitUnavailable",
        )
    return exc


def never_final(err: BaseException) -> BaseException:
    """For cleanup steps, which must never give up: the same error, but retryable.

    Even a failure that is final elsewhere (a wrong key) is retried, so fixing the configuration lets a
    session finish releasing what it holds; the climbing attempt count shows support that it is stuck.
    """
    if isinstance(err, ApplicationError) and err.non_retryable:
        return ApplicationError(err.message, *err.details, type=err.type)
    return err
