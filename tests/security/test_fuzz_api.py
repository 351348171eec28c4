"""Property-based fuzzing of the sessions HTTP API from its own OpenAPI schema (schemathesis): whatever is sent,
valid by the schema or not, the answer is never a 5xx, and every error is JSON `{"type", "message"}`.

The app is the gateway's, in this process on an ASGI transport, over the real Temporal dev server with a
worker of its own (real LiveKit, the emulator). Requests carry a valid key, so the fuzzing gets past the edge;
`test_http_api.py` covers the keys themselves. `SESSIONFLOW_FUZZ_EXAMPLES` (default 25 per operation and mode)
raises the count for a longer run.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from config.settings import Settings
from tests.support.http_api import Api, api_on, stack_temporal

pytestmark = pytest.mark.stack

EXAMPLES = int(os.environ.get("SESSIONFLOW_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with api_on(await stack_temporal(settings), settings) as api:
        yield api


def operations(api: Api) -> list[Any]:
    """The API's operations, from the OpenAPI schema the app under test serves."""
    app = api.http._transport.app  # type: ignore[attr-defined]  # httpx.ASGITransport keeps its app here
    schema = schemathesis.openapi.from_dict(app.openapi())
    found = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]  # an Err raises in ok()
    return [op for op in found if op.path.startswith("/v1/")]


_CASES: dict[int, st.SearchStrategy[Any]] = {}


def cases(api: Api) -> st.SearchStrategy[Any]:
    """Valid and invalid requests for every operation (built once per app)."""
    if id(api) not in _CASES:
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        _CASES[id(api)] = st.one_of(*(op.as_strategy(generation_mode=mode) for op in operations(api) for mode in modes))
    return _CASES[id(api)]


def test_the_schema_has_every_operation(api: Api) -> None:
    assert {(op.method.upper(), op.path) for op in operations(api)} == {
        ("POST", "/v1/sessions/{session_id}/join"), ("POST", "/v1/sessions/{session_id}/end"),
        ("POST", "/v1/sessions/{session_id}/extend"), ("POST", "/v1/sessions/{session_id}/consent"),
        ("GET", "/v1/sessions/{session_id}/state"), ("GET", "/v1/sessions"),
    }


async def send(api: Api, case: Any) -> httpx.Response:
    """The generated request as schemathesis serialises it (JSON, or raw bytes for a mutated media type), with a
    valid key in place of the generated Authorization header (which would only ever test the 401)."""
    kwargs = case.as_transport_kwargs(base_url="http://127.0.0.1")
    headers = {k: str(v) for k, v in kwargs.get("headers", {}).items() if k.lower() != "authorization"}
    headers["Authorization"] = f"Bearer {api.key}"
    request: dict[str, Any] = {"params": kwargs.get("params") or None, "headers": headers}
    if "json" in kwargs:
        request["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        request["content"] = kwargs["data"]
    return await api.http.request(kwargs["method"], kwargs["url"], **request)


@settings(
    max_examples=EXAMPLES * 2 * 5, deadline=None, database=None,  # 5 operations, valid and invalid
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
@given(data=st.data())
async def test_no_input_gets_a_5xx(api: Api, data: st.DataObject) -> None:
    case = data.draw(cases(api), label="request")
    r = await send(api, case)
    assert r.status_code < 500, f"{case.method} {case.formatted_path} -> {r.status_code}: {r.text}"
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"type", "message"} and body["type"] and body["message"], body
    elif case.operation.path.endswith("/join"):
        # A valid join started a session: end it, so every room is released.
        await api.sessions.end(case.path_parameters["session_id"], "fuzzing over")
