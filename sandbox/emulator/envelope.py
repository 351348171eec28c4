"""The ``{code, data, message}`` envelope every emulator response uses (reference §2), and the error it carries.

Success uses ``code`` 1000 (what HeyGen's JS SDK expects); errors use the HTTP status as ``code`` and ``data: null``.
The one exception is 422, which keeps FastAPI's ``{"detail": [...]}`` shape as the real service does.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

SUCCESS_CODE = 1000


class ApiError(Exception):
    """Refuse a call with ``status`` and a readable ``message`` (rendered in the envelope)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def ok(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse({"code": SUCCESS_CODE, "data": data, "message": "success"}, status_code=status)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "data": None, "message": message}, status_code=status, headers=headers)
