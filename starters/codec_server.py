"""The codec server: lets the Temporal UI and CLI read (and write) encrypted payloads (workers/codec.py).

Temporal's remote codec protocol: ``POST <endpoint>/decode`` and ``POST <endpoint>/encode`` with JSON
``{"payloads": [...]}`` (protobuf JSON of Payloads) and an ``X-Namespace`` header; the answer has the same
shape. Served by the gateway under ``/codec``:

- Bearer auth on every call (``Authorization: Bearer <token>``), compared in constant time. Two roles:
  ``SESSIONFLOW_CODEC_SUPPORT_TOKEN`` gets decoded payloads with every token masked (participant JWTs, the
  LiveAvatar session token), ``SESSIONFLOW_CODEC_ADMIN_TOKEN`` sees everything. No token configured: no access.
- ``/codec/ui/<token>/...``: the same, with the token in the path, for a Temporal UI that cannot send an
  Authorization header (the dev server's; see sandbox/stack.py). It is the endpoint URL the UI is given.
- CORS only for ``SESSIONFLOW_CODEC_CORS_ORIGIN`` (the UI's origin): any other origin gets no allow header,
  so a page elsewhere cannot read the answers even with a token in hand.
"""

from __future__ import annotations

import hmac
import json
import re
from enum import StrEnum
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from config.settings import Settings
from workers.codec import EncryptionCodec, UndecryptablePayload
from workers.logging import JWT_PATTERN, MASK
from workers.temporal import codec_keys

# Payload fields that hold a credential (JoinGrant.token, AvatarCreated.session_token, LiveAvatar's own name).
TOKEN_FIELDS = frozenset({"token", "session_token", "livekit_client_token"})
MAX_BODY_BYTES = 4 * 1024 * 1024
_ALLOWED_HEADERS = "Authorization, Content-Type, X-Namespace"
_JWT_BYTES = re.compile(JWT_PATTERN.pattern.encode())


class Role(StrEnum):
    ADMIN = "admin"  # sees every decoded value
    SUPPORT = "support"  # sees tokens masked


def codec_router(settings: Settings, codec: EncryptionCodec | None = None) -> APIRouter:
    """The ``/codec`` routes (see the module docstring), with the settings' keys unless ``codec`` is given."""
    codec = codec or EncryptionCodec(codec_keys(settings))
    tokens = _tokens(settings)
    router = APIRouter(prefix="/codec", tags=["codec"])

    def cors(request: Request) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if origin is None or origin != settings.codec_cors_origin:
            return {}
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true", "Vary": "Origin"}

    def refuse(request: Request, status: int, detail: str) -> HTTPException:
        challenge = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        return HTTPException(status_code=status, detail=detail, headers={**cors(request), **challenge})

    def role_for(request: Request, path_token: str | None) -> Role:
        offered = path_token
        if offered is None:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            offered = value.strip() if scheme.lower() == "bearer" else None
        matched = _match(tokens, offered)
        if matched is None:
            raise refuse(request, 401, "codec server: a valid bearer token is required")
        namespace = request.headers.get("X-Namespace")
        if namespace is not None and namespace != settings.temporal_namespace:
            raise refuse(request, 403, f"codec server: this server serves namespace {settings.temporal_namespace!r}")
        return matched

    async def payloads_of(request: Request) -> list[Payload]:
        declared = request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise refuse(request, 413, f"codec server: body over {MAX_BODY_BYTES} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise refuse(request, 413, f"codec server: body over {MAX_BODY_BYTES} bytes")
        try:
            return list(json_format.Parse(bytes(body), Payloads(), ignore_unknown_fields=False).payloads)
        except (json_format.ParseError, UnicodeDecodeError, ValueError) as error:
            raise refuse(request, 400, f"codec server: body is not {{\"payloads\": [...]}}: {error}") from None

    async def answer(request: Request, response: Response, path_token: str | None, decode: bool) -> dict[str, Any]:
        role = role_for(request, path_token)  # before the body is read
        payloads = await payloads_of(request)
        try:
            out = await (codec.decode(payloads) if decode else codec.encode(payloads))
        except UndecryptablePayload as error:
            raise refuse(request, 400, f"codec server: {error}") from None
        if decode and role is not Role.ADMIN:
            out = [mask_tokens(p) for p in out]
        response.headers.update(cors(request))
        return json_format.MessageToDict(Payloads(payloads=out))

    @router.post("/decode")
    async def decode(request: Request, response: Response) -> dict[str, Any]:
        return await answer(request, response, None, decode=True)

    @router.post("/encode")
    async def encode(request: Request, response: Response) -> dict[str, Any]:
        return await answer(request, response, None, decode=False)

    @router.post("/ui/{token}/decode", include_in_schema=False)
    async def ui_decode(token: str, request: Request, response: Response) -> dict[str, Any]:
        return await answer(request, response, token, decode=True)

    @router.post("/ui/{token}/encode", include_in_schema=False)
    async def ui_encode(token: str, request: Request, response: Response) -> dict[str, Any]:
        return await answer(request, response, token, decode=False)

    @router.options("/{path:path}", include_in_schema=False)
    async def preflight(path: str, request: Request) -> Response:
        """The browser asks before a POST with Authorization / X-Namespace: only the UI's origin is told yes."""
        headers = cors(request)
        if headers:
            headers |= {"Access-Control-Allow-Methods": "POST, OPTIONS", "Access-Control-Allow-Headers": _ALLOWED_HEADERS,
                        "Access-Control-Max-Age": "600"}
        return Response(status_code=204 if headers else 403, headers=headers)

    return router


def _tokens(settings: Settings) -> list[tuple[Role, bytes]]:
    configured = [(Role.ADMIN, settings.codec_admin_token), (Role.SUPPORT, settings.codec_support_token)]
    return [(role, secret.get_secret_value().encode()) for role, secret in configured if secret is not None
            and secret.get_secret_value()]


def _match(tokens: list[tuple[Role, bytes]], offered: str | None) -> Role | None:
    """The role of ``offered``; every configured token is compared (in constant time), whichever matches."""
    if not offered:
        return None
    found = None
    for role, token in tokens:
        if hmac.compare_digest(token, offered.encode()):
            found = found or role
    return found


def mask_tokens(payload: Payload) -> Payload:
    """``payload`` with every credential masked: values of token fields and JWT-shaped strings (JSON payloads),
    or JWT-shaped text in any other payload."""
    if payload.metadata.get("encoding") != b"json/plain":
        masked = _JWT_BYTES.sub(MASK.encode(), payload.data)
        return payload if masked == payload.data else Payload(metadata=payload.metadata, data=masked)
    try:
        value = json.loads(payload.data)
    except ValueError:
        return payload
    return Payload(metadata=payload.metadata, data=json.dumps(_masked(value), separators=(",", ":")).encode())


def _masked(value: object, key: str | None = None) -> object:
    if isinstance(value, dict):
        return {k: _masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, str):
        return MASK if key in TOKEN_FIELDS and value else JWT_PATTERN.sub(MASK, value)
    return value
