"""The codec server (starters/codec_server.py, in the gateway): bearer auth on every call, CORS for the
Temporal UI's origin only, decoding with a retired key, and tokens masked unless the caller is admin."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload

from config.settings import Settings
from starters.codec_server import MAX_BODY_BYTES, codec_router
from starters.gateway import create_app
from workers.codec import CodecKey, EncryptionCodec
from workers.logging import MASK

OLD, NEW = CodecKey.generate("k-old"), CodecKey.generate("k-new")
ADMIN, SUPPORT = "admin-token-" + "a" * 32, "support-token-" + "s" * 32
UI = "http://127.0.0.1:8233"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYW5kIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
GRANT = {"identity": "cand", "token": JWT, "note": f"avatar joined with {JWT}", "session_token": "opaque-la-token"}


def _settings() -> Settings:
    return Settings.model_validate({
        "LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s", "SESSIONFLOW_CODEC_KEYS": f"{NEW.encoded()},{OLD.encoded()}",
        "SESSIONFLOW_CODEC_ADMIN_TOKEN": ADMIN, "SESSIONFLOW_CODEC_SUPPORT_TOKEN": SUPPORT,
        "SESSIONFLOW_CODEC_CORS_ORIGIN": UI, "TEMPORAL_NAMESPACE": "default",
    })


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.include_router(codec_router(_settings()))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://codec.test") as client:
        yield client


def _body(*payloads: Payload) -> dict[str, object]:
    return {"payloads": [
        {"metadata": {k: base64.b64encode(v).decode() for k, v in p.metadata.items()},
         "data": base64.b64encode(p.data).decode()} for p in payloads
    ]}


def _values(response: httpx.Response) -> list[object]:
    return [json.loads(base64.b64decode(p["data"])) for p in response.json()["payloads"]]


def _sealed(value: object, *keys: CodecKey) -> Payload:
    plain = Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(value).encode())
    return EncryptionCodec(keys or [NEW]).encrypt(plain)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "X-Namespace": "default"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"},
                                     {"Authorization": "Bearer "}])
async def test_no_or_wrong_token_is_401(http: httpx.AsyncClient, headers: dict[str, str]) -> None:
    for path in ("/codec/decode", "/codec/encode", "/codec/ui/wrong/decode"):
        response = await http.post(path, json=_body(_sealed(GRANT)), headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert JWT not in response.text and "cand" not in response.text


async def test_support_sees_tokens_masked_and_admin_sees_everything(http: httpx.AsyncClient) -> None:
    sealed = _sealed(GRANT)
    support = await http.post("/codec/decode", json=_body(sealed), headers=_auth(SUPPORT))
    admin = await http.post("/codec/decode", json=_body(sealed), headers=_auth(ADMIN))
    assert support.status_code == admin.status_code == 200
    assert _values(support) == [{"identity": "cand", "token": MASK, "note": f"avatar joined with {MASK}", "session_token": MASK}]
    assert _values(admin) == [GRANT]


async def test_a_payload_encrypted_with_a_retired_key_decodes(http: httpx.AsyncClient) -> None:
    response = await http.post("/codec/decode", json=_body(_sealed({"before": "rotation"}, OLD)), headers=_auth(ADMIN))
    assert response.status_code == 200 and _values(response) == [{"before": "rotation"}]


async def test_encode_uses_the_newest_key(http: httpx.AsyncClient) -> None:
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'{"signal": 1}')
    response = await http.post("/codec/encode", json=_body(plain), headers=_auth(SUPPORT))
    [encoded] = response.json()["payloads"]
    assert base64.b64decode(encoded["metadata"]["encryption-key-id"]) == b"k-new"
    sealed = Payload(metadata={k: base64.b64decode(v) for k, v in encoded["metadata"].items()},
                     data=base64.b64decode(encoded["data"]))
    assert EncryptionCodec([NEW]).decrypt(sealed) == plain


async def test_an_unknown_key_id_malformed_body_foreign_namespace_and_oversize_body_are_clear_errors(
    http: httpx.AsyncClient,
) -> None:
    foreign = _sealed({"x": 1}, CodecKey.generate("k-elsewhere"))
    unknown = await http.post("/codec/decode", json=_body(foreign), headers=_auth(ADMIN))
    assert unknown.status_code == 400 and "'k-elsewhere'" in unknown.json()["detail"]
    for body in (b"not json", b'{"payloads": "x"}', b"\xff\xfe"):
        malformed = await http.post("/codec/decode", content=body, headers=_auth(ADMIN))
        assert malformed.status_code == 400, body
    other_ns = await http.post("/codec/decode", json=_body(foreign), headers={**_auth(ADMIN), "X-Namespace": "prod"})
    assert other_ns.status_code == 403
    big = await http.post("/codec/decode", content=b" " * (MAX_BODY_BYTES + 1), headers=_auth(ADMIN))
    assert big.status_code == 413


async def test_cors_answers_the_ui_origin_only(http: httpx.AsyncClient) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,x-namespace"}
    ui = await http.options("/codec/decode", headers={"Origin": UI, **preflight})
    assert ui.status_code == 204 and ui.headers["Access-Control-Allow-Origin"] == UI
    assert "Authorization" in ui.headers["Access-Control-Allow-Headers"]
    evil = await http.options("/codec/decode", headers={"Origin": "http://evil.test", **preflight})
    assert evil.status_code == 403 and "Access-Control-Allow-Origin" not in evil.headers

    sealed = _body(_sealed(GRANT))
    from_ui = await http.post("/codec/decode", json=sealed, headers={"Origin": UI, **_auth(SUPPORT)})
    from_evil = await http.post("/codec/decode", json=sealed, headers={"Origin": "http://evil.test", **_auth(SUPPORT)})
    assert from_ui.headers["Access-Control-Allow-Origin"] == UI
    assert "Access-Control-Allow-Origin" not in from_evil.headers


async def test_the_ui_path_carries_the_token(http: httpx.AsyncClient) -> None:
    response = await http.post(f"/codec/ui/{SUPPORT}/decode", json=_body(_sealed(GRANT)), headers={"Origin": UI})
    assert response.status_code == 200 and _values(response)[0] == {**GRANT, "token": MASK, "note": f"avatar joined with {MASK}",
                                                                     "session_token": MASK}


async def test_no_token_configured_lets_nobody_in() -> None:
    settings = _settings().model_copy(update={"codec_admin_token": None, "codec_support_token": SecretStr("")})
    app = FastAPI()
    app.include_router(codec_router(settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://codec.test") as client:
        response = await client.post("/codec/decode", json=_body(_sealed(GRANT)), headers=_auth(""))
    assert response.status_code == 401


async def test_the_gateway_serves_the_codec_routes() -> None:
    transport = httpx.ASGITransport(app=create_app(_settings()))  # no lifespan: Temporal is not needed here
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as gateway:
        response = await gateway.post("/codec/decode", json=_body(_sealed(GRANT)), headers=_auth(ADMIN))
    assert response.status_code == 200 and _values(response) == [GRANT]
