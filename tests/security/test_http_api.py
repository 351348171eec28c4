"""The sessions HTTP API as an attacker and a careless caller would use it.

Each refusal is JSON with a stable `type` and a status from `starters.api.ERRORS`, and changes nothing: after
it, a check reads the state (no session was started, or the running one is as it was). The API and the Python
client answer every case the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from temporalio.client import Client
from temporalio.service import RetryConfig

from config.settings import Settings, parse_api_keys
from starters.api import ERRORS, new_api_key, status_for
from starters.client import InvalidInput, SessionClient, SessionError, Unavailable
from starters.gateway import create_app
from tests.security.test_cli_errors import sessionflow
from tests.support.http_api import AVATAR, Api, api_on, spec, stack_temporal
from workers.temporal import TemporalUnavailable, data_converter

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with api_on(await stack_temporal(settings), settings) as api:
        yield api


def assert_error(r: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = r.json()
    assert body["type"] == kind and isinstance(body["message"], str) and body["message"], body
    return body


async def join(api: Api, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return await api.http.post(f"/v1/sessions/{body['spec']['session_id']}/join", json=body, **kwargs)


# ---- API keys ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer wrong-key", "Basic dXNlcjpwYXNz", "Token {key}", "Bearer {key}x",
     "Bearer {KEY}", "Bearer {digest}", "{key}"],
)
async def test_without_a_valid_api_key_nothing_is_read_or_started(api: Api, authorization: str | None) -> None:
    session = spec()
    headers = {} if authorization is None else {
        "Authorization": authorization.format(
            key=api.key, KEY=api.key.upper(), digest=hashlib.sha256(api.key.encode()).hexdigest()
        )
    }
    async with httpx.AsyncClient(transport=api.http._transport, base_url="http://127.0.0.1") as anonymous:
        for method, path, body in (
            ("POST", f"/v1/sessions/{session['session_id']}/join", {"spec": session, "identity": "cand"}),
            ("POST", f"/v1/sessions/{session['session_id']}/end", {}),
            ("POST", f"/v1/sessions/{session['session_id']}/extend", {"by": 60}),
            ("GET", f"/v1/sessions/{session['session_id']}/state", None),
            ("GET", "/v1/sessions", None),
        ):
            r = await anonymous.request(method, path, json=body, headers=headers)
            assert_error(r, 401, "Unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
    assert await api.absent(session["session_id"])


@pytest.mark.parametrize("path", ["//v1/sessions", "/v1/../v1/sessions", "/v1/./sessions", "/V1/sessions", "/v1", "/nope", "/"])
async def test_no_spelling_of_a_path_gets_past_the_key(api: Api, path: str) -> None:
    async with httpx.AsyncClient(transport=api.http._transport, base_url="http://127.0.0.1") as anonymous:
        request = anonymous.build_request("GET", "http://127.0.0.1")
        request.url = request.url.copy_with(raw_path=path.encode())  # as sent, without httpx normalising it
        assert_error(await anonymous.send(request), 401, "Unauthorized")


async def test_health_and_docs_need_no_key(api: Api) -> None:
    async with httpx.AsyncClient(transport=api.http._transport, base_url="http://127.0.0.1") as anonymous:
        assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
        schema = (await anonymous.get("/openapi.json")).json()
        assert {"/v1/sessions/{session_id}/join", "/v1/sessions", "/livekit/webhook", "/healthz"} <= set(schema["paths"])
        assert (await anonymous.get("/docs")).status_code == 200


# ---- a session over HTTP, start to end ------------------------------------------------------------------------


async def test_join_extend_state_end_over_http(api: Api) -> None:
    session = spec(avatar=AVATAR)
    sid = session["session_id"]
    r = await join(api, {"spec": session, "identity": "cand"})
    assert r.status_code == 200, r.text
    grant = r.json()
    assert grant["identity"] == "cand" and grant["room"] == api.sessions.workflow_id(sid) and grant["token"]
    # Idempotent: the same join again is a fresh grant for the same session.
    assert (await join(api, {"spec": session, "identity": "watcher"})).status_code == 200
    state = (await api.http.get(f"/v1/sessions/{sid}/state")).json()
    assert state["session_id"] == sid and set(state["admitted"]) == {"cand", "watcher"}
    # Durations: an ISO 8601 string or whole seconds.
    first = (await api.http.post(f"/v1/sessions/{sid}/extend", json={"by": "PT1M"})).json()
    second = (await api.http.post(f"/v1/sessions/{sid}/extend", json={"by": 60})).json()
    assert _at(second["ends_at"]) - _at(first["ends_at"]) == timedelta(minutes=1)
    listed = (await api.http.get("/v1/sessions", params={"kind": "interview", "limit": 1000})).json()
    assert sid in {row["session_id"] for row in listed}
    outcome = (await api.http.post(f"/v1/sessions/{sid}/end", json={"reason": "done over http"})).json()
    assert outcome["end_reason"] == "requested" and outcome["session_id"] == sid
    # Ended: `end` again gives the recorded outcome; anything else says it has ended.
    assert (await api.http.post(f"/v1/sessions/{sid}/end")).json()["ended_at"] == outcome["ended_at"]
    assert_error(await join(api, {"spec": session, "identity": "cand"}), 409, "SessionEnded")
    assert_error(await api.http.post(f"/v1/sessions/{sid}/extend", json={"by": 60}), 409, "SessionEnded")
    assert (await api.http.get(f"/v1/sessions/{sid}/state")).json()["status"] == "ended"  # still readable


async def test_consent_over_http_gates_the_recording_and_refuses_what_the_client_refuses(api: Api) -> None:
    session = spec(recording={"participants": ["cand"]})
    sid = session["session_id"]
    assert (await join(api, {"spec": session, "identity": "cand"})).status_code == 200
    consent = f"/v1/sessions/{sid}/consent"
    # Someone not asked, a lax bool, an extra field: refused, and nothing recorded or changed.
    assert_error(await api.http.post(consent, json={"identity": "watcher", "granted": True}), 422, "UnknownParticipant")
    assert_error(await api.http.post(consent, json={"identity": "cand", "granted": "yes"}), 422, "InvalidInput")
    assert_error(await api.http.post(consent, json={"identity": "cand", "granted": True, "x": 1}), 422, "InvalidInput")
    before = (await api.http.get(f"/v1/sessions/{sid}/state")).json()["recording"]
    assert before["status"] == "waiting_for_consent" and before["consents"] == [] and before["egress_ids"] == []
    # Granted: the state answered says so (the local server has no egress: the start is tried, then refused).
    granted = (await api.http.post(consent, json={"identity": "cand", "granted": True})).json()["recording"]
    assert granted["consented"] == ["cand"] and [c["granted"] for c in granted["consents"]] == [True]
    withdrawn = (await api.http.post(consent, json={"identity": "cand", "granted": False})).json()["recording"]
    assert withdrawn["consented"] == [] and [c["granted"] for c in withdrawn["consents"]] == [True, False]
    # A session that records nothing: 409 NotRecorded, as the client's NotRecorded.
    plain = spec()
    assert (await join(api, {"spec": plain, "identity": "cand"})).status_code == 200
    r = await api.http.post(f"/v1/sessions/{plain['session_id']}/consent", json={"identity": "cand", "granted": True})
    assert_error(r, 409, "NotRecorded")
    for s in (sid, plain["session_id"]):
        await api.http.post(f"/v1/sessions/{s}/end", json={"reason": "test over"})


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


# ---- the same answer from both ---------------------------------------------------------------------------------

# name -> (what the Python client does, what the HTTP caller sends); `running` is a session started for the case.
Case = Callable[[Api, dict[str, Any]], tuple[Awaitable[Any], Awaitable[httpx.Response]]]


def _join_both(body_spec: dict[str, Any], identity: str) -> Case:
    def case(api: Api, _: dict[str, Any]) -> tuple[Awaitable[Any], Awaitable[httpx.Response]]:
        return api.sessions.join(body_spec, identity), join(api, {"spec": body_spec, "identity": identity})

    return case


def _on_running(action: str) -> Case:
    def case(api: Api, running: dict[str, Any]) -> tuple[Awaitable[Any], Awaitable[httpx.Response]]:
        sid = running["session_id"]
        if action == "changed spec":
            changed = running | {"max_duration": "PT11M"}
            return api.sessions.join(changed, "cand"), join(api, {"spec": changed, "identity": "cand"})
        if action == "changed roster":
            changed = running | {"participants": [{"identity": "cand", "role": "coach"}]}
            return api.sessions.join(changed, "cand"), join(api, {"spec": changed, "identity": "cand"})
        assert action == "extend beyond cap"
        return (
            api.sessions.extend(sid, timedelta(hours=1)),
            api.http.post(f"/v1/sessions/{sid}/extend", json={"by": 3600}),
        )

    return case


def _unknown(action: str) -> Case:
    def case(api: Api, _: dict[str, Any]) -> tuple[Awaitable[Any], Awaitable[httpx.Response]]:
        sid = spec()["session_id"]
        if action == "state":
            return api.sessions.state(sid), api.http.get(f"/v1/sessions/{sid}/state")
        if action == "end":
            return api.sessions.end(sid), api.http.post(f"/v1/sessions/{sid}/end")
        return api.sessions.extend(sid, timedelta(seconds=60)), api.http.post(f"/v1/sessions/{sid}/extend", json={"by": 60})

    return case


def _bad_id(session_id: str) -> Case:
    def case(api: Api, _: dict[str, Any]) -> tuple[Awaitable[Any], Awaitable[httpx.Response]]:
        return api.sessions.state(session_id), api.http.get(f"/v1/sessions/{quote(session_id, safe='')}/state")

    return case


CASES: dict[str, tuple[Case, str]] = {
    "max_participants as a string": (_join_both(spec(max_participants="3"), "cand"), "InvalidInput"),
    "a duration as true": (_join_both(spec(max_duration=True), "cand"), "InvalidInput"),
    "a duration as a numeric string": (_join_both(spec(max_duration="3600"), "cand"), "InvalidInput"),
    "a duration as a float": (_join_both(spec(max_duration=3600.5), "cand"), "InvalidInput"),
    "is_sandbox as 1": (_join_both(spec(avatar=AVATAR | {"is_sandbox": 1}), "cand"), "InvalidInput"),
    "an identity as a number": (_join_both(spec(participants=[{"identity": 7, "role": "candidate"}]), "7"), "InvalidInput"),
    "an extra field": (_join_both(spec(admin=True), "cand"), "InvalidInput"),
    "a reserved identity": (
        _join_both(spec(participants=[{"identity": "avatar-x", "role": "coach"}]), "avatar-x"), "InvalidInput"
    ),
    "an identity off the roster": (_join_both(spec(), "mallory"), "UnknownParticipant"),
    "a changed spec": (_on_running("changed spec"), "SpecChanged"),
    "a changed roster": (_on_running("changed roster"), "SpecChanged"),
    "extend beyond the cap": (_on_running("extend beyond cap"), "ExtendBeyondCap"),
    "state of an unknown session": (_unknown("state"), "SessionNotFound"),
    "end of an unknown session": (_unknown("end"), "SessionNotFound"),
    "extend of an unknown session": (_unknown("extend"), "SessionNotFound"),
    "an id with a quote": (_bad_id("abc' OR SessionId != '"), "InvalidInput"),
    "an id with a slash": (_bad_id("abc/../def"), "InvalidInput"),
    "an id with unicode": (_bad_id("sessión-1"), "InvalidInput"),
    "an id with query syntax": (_bad_id("abc?status=live&x=1"), "InvalidInput"),
    "an id in upper case": (_bad_id("ABC-1"), "InvalidInput"),
}


@pytest.fixture(scope="module")
async def running(api: Api) -> AsyncIterator[dict[str, Any]]:
    session = spec()
    await api.sessions.join(session, "cand")
    yield session
    await api.sessions.end(session["session_id"], "test over")


@pytest.mark.parametrize("name", sorted(CASES))
async def test_the_api_and_the_python_client_give_the_same_answer(api: Api, running: dict[str, Any], name: str) -> None:
    case, expected = CASES[name]
    before = await api.sessions.state(running["session_id"])
    via_client, via_http = case(api, running)
    with pytest.raises(SessionError) as refused:
        await via_client
    assert type(refused.value).__name__ == expected
    status, kind = status_for(refused.value)
    body = assert_error(await via_http, status, kind)
    assert kind == expected and body["message"]
    # Nothing changed: the running session is as it was (same roster, same end), nothing else was started.
    after = await api.sessions.state(running["session_id"])
    assert (after.admitted, after.ends_at, after.status) == (before.admitted, before.ends_at, before.status)


def test_every_client_error_has_one_status() -> None:
    kinds = [kind for kind, _ in ERRORS]
    assert len(kinds) == len(set(kinds)) and kinds[-1] is SessionError
    assert status_for(InvalidInput("x")) == (422, "InvalidInput")


# ---- bodies ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "content_type", "status", "kind"),
    [
        (b'{"spec": {', "application/json", 422, "InvalidInput"),  # malformed JSON
        (b"\xff\xfe\x00{}", "application/json", 422, "InvalidInput"),  # not UTF-8
        (b"[1, 2, 3]", "application/json", 422, "InvalidInput"),  # JSON, not an object
        (b"null", "application/json", 422, "InvalidInput"),
        (b'{"spec": {}, "identity": "cand"}', "text/plain", 415, "UnsupportedMediaType"),
        (b"spec=1&identity=cand", "application/x-www-form-urlencoded", 415, "UnsupportedMediaType"),
        (b'{"spec": {}, "identity": "cand"}', None, 415, "UnsupportedMediaType"),
        (b"x" * (70 * 1024), "application/json", 413, "PayloadTooLarge"),
    ],
)
async def test_malformed_bodies_are_refused_and_start_nothing(
    api: Api, content: bytes, content_type: str | None, status: int, kind: str
) -> None:
    sid = spec()["session_id"]
    headers = {"Content-Type": content_type} if content_type else {}
    r = await api.http.post(f"/v1/sessions/{sid}/join", content=content, headers=headers)
    assert_error(r, status, kind)
    assert await api.absent(sid)


async def test_a_spec_for_another_session_than_the_path_is_refused(api: Api) -> None:
    session, other = spec(), spec()
    r = await api.http.post(f"/v1/sessions/{other['session_id']}/join", json={"spec": session, "identity": "cand"})
    assert_error(r, 422, "InvalidInput")
    assert await api.absent(session["session_id"]) and await api.absent(other["session_id"])


@pytest.mark.parametrize(
    "body", [{"by": True}, {"by": "60"}, {"by": 1.5}, {"by": None}, {"by": -60}, {"by": 0}, {"by": 10**40}, {"by": "P99999999D"},
             {"by": 60, "extra": 1}, {}],
)
async def test_bad_extends_are_refused_and_change_nothing(api: Api, running: dict[str, Any], body: dict[str, Any]) -> None:
    sid = running["session_id"]
    before = await api.sessions.state(sid)
    assert_error(await api.http.post(f"/v1/sessions/{sid}/extend", json=body), 422, "InvalidInput")
    assert (await api.sessions.state(sid)).ends_at == before.ends_at


@pytest.mark.parametrize(
    "params",
    [{"status": "bogus"}, {"status": "live' OR WorkflowType != '"}, {"kind": "webinar"}, {"limit": "0"}, {"limit": "1001"},
     {"limit": "lots"}, {"limit": "3.5"}],
)
async def test_bad_list_filters_are_refused(api: Api, params: dict[str, str]) -> None:
    assert_error(await api.http.get("/v1/sessions", params=params), 422, "InvalidInput")


@pytest.mark.parametrize(
    "path",
    ["/v1/sessions/abc%2F..%2Fdef/state", "/v1/sessions/abc/../def/state", "/v1/sessions/%00%00%00/state",
     "/v1/sessions/%E2%80%AEabc/state", "/v1/sessions/" + "a" * 300 + "/state", "/v1/sessions/abc-1/state?x=' OR 1=1"],
)
async def test_hostile_paths_get_a_clear_4xx(api: Api, path: str) -> None:
    r = await api.http.get(path)
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()) == {"type", "message"}


# ---- Temporal away ---------------------------------------------------------------------------------------------


class CuttableLink:
    """A TCP relay to Temporal that the test can cut: the client connects for real, then Temporal goes away."""

    def __init__(self, target: str) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self.pipes.add(task)
            task.add_done_callback(self.pipes.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def cut(self) -> None:
        self.server.close()
        for task in list(self.pipes):
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)


async def test_temporal_unavailable_is_a_503_that_says_retry(settings: Settings) -> None:
    """Temporal stops answering (the link to it is cut): past the retry deadline the client raises
    `TemporalUnavailable`, the API says 503 `TemporalUnavailable`, and both say it is safe to retry."""
    settings = settings.model_copy(update={"temporal_retry_deadline_s": 0.5})
    link = CuttableLink(settings.temporal_address)
    temporal = await Client.connect(
        await link.start(), namespace=settings.temporal_namespace, data_converter=data_converter(),
        retry_config=RetryConfig(initial_interval_millis=10, max_retries=1, max_elapsed_time_millis=200),
    )
    await link.cut()
    key, digest = new_api_key()
    app = create_app(settings.model_copy(update={"api_keys": parse_api_keys(digest)}), temporal)
    sessions = SessionClient(temporal, settings)
    session = spec()
    sid = session["session_id"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {key}"}
    ) as http:
        for via_client, via_http in (
            (sessions.join(session, "cand"), http.post(f"/v1/sessions/{sid}/join", json={"spec": session, "identity": "cand"})),
            (sessions.state(sid), http.get(f"/v1/sessions/{sid}/state")),
            (sessions.extend(sid, timedelta(seconds=60)), http.post(f"/v1/sessions/{sid}/extend", json={"by": 60})),
            (sessions.end(sid), http.post(f"/v1/sessions/{sid}/end")),
        ):
            with pytest.raises(TemporalUnavailable, match="safe to retry"):
                await via_client
            assert "safe to retry" in assert_error(await via_http, 503, "TemporalUnavailable")["message"]
        assert_error(await http.get("/v1/sessions"), 503, "TemporalUnavailable")


async def test_a_session_no_worker_answers_is_a_503_and_one_line_in_the_cli(api: Api, settings: Settings) -> None:
    """A session whose workflow nobody runs (no worker on its task queue): the query times out on the server.
    The client raises `Unavailable`, the API says 503, the CLI one line naming the worker; all at once, since
    each waits for the server's timeout."""
    orphan = SessionClient(api.sessions.client, settings, task_queue=f"nobody-polls-{uuid.uuid4().hex[:8]}")
    session = spec()
    sid = session["session_id"]
    handle = await orphan.start(session)
    try:
        via_client, via_http, via_cli = await asyncio.gather(
            orphan.state(sid),
            api.http.get(f"/v1/sessions/{sid}/state"),
            # One attempt: the server's timeout may come back as an outage status, which the CLI would ride out.
            sessionflow("show", sid, env={**os.environ, "SESSIONFLOW_TEMPORAL_RETRY_DEADLINE": "1"}),
            return_exceptions=True,
        )
        assert isinstance(via_client, Unavailable) and "worker" in str(via_client)
        assert isinstance(via_http, httpx.Response)
        assert_error(via_http, 503, "Unavailable")
        assert isinstance(via_cli, tuple)
        rc, _, err = via_cli
        assert rc == 2 and err.startswith("sessionflow: error: ") and sid in err and err.count("\n") == 1, err
    finally:
        await handle.terminate("test over: it never ran, so it holds nothing")  # no worker: no room, no avatar
