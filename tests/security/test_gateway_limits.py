"""The real gateway process (as the local stack runs it) refuses what it must before reading the body.

"A 300 MB POST grew it by 585 MB": now a declared size over the limit is answered before one byte of the body
is sent, a chunked body is cut off at the limit, and a request without a key is answered 401 unread. The
gateway's resident memory (from /proc) does not grow by anything like the body's size. Bodies are sent on a
raw socket, so the test sees exactly when the gateway answers.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from config.settings import Settings
from sandbox.stack import LocalStack
from tests.support.http_api import NOT_RUNNING

pytestmark = pytest.mark.stack

MB = 1024 * 1024
SENT = 300 * MB  # what an attacker offers
GROWTH_ALLOWED = 30 * MB  # far below the body; allows for the process's own noise


@dataclass
class Gateway:
    host: str
    port: int
    pid: int
    key: str

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def gateway(settings: Settings) -> Gateway:
    stack = LocalStack.attach()
    running = {s.name: s for s in stack.running} if stack else {}
    if "gateway" not in running or "SESSIONFLOW_API_KEY" not in os.environ:
        pytest.fail(NOT_RUNNING.format(what="no gateway recorded in the stack's state dir"), pytrace=False)
    return Gateway(settings.gateway_host, settings.gateway_port, running["gateway"].pid, os.environ["SESSIONFLOW_API_KEY"])


@dataclass
class Answer:
    status: int
    body: dict[str, object]
    body_bytes_sent: int


async def post_raw(gateway: Gateway, path: str, headers: dict[str, str], *, chunked: bool, total: int) -> Answer:
    """POST `total` bytes to `path`, declared (Content-Length) or chunked, stopping as soon as the gateway
    answers (or stops reading); returns its answer and how much of the body had been sent by then."""
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    head = [f"POST {path} HTTP/1.1", f"Host: {gateway.host}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    response = asyncio.create_task(read_response(reader))
    sent, chunk = 0, b"x" * (256 * 1024)
    try:
        while sent < total and not response.done():
            if chunked:
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            else:
                writer.write(chunk)
            sent += len(chunk)
            await asyncio.wait_for(writer.drain(), timeout=5)  # a gateway that stopped reading blocks this
    except (ConnectionError, TimeoutError):
        pass  # it stopped reading: what it answered is in `response`
    status, body = await asyncio.wait_for(response, timeout=30)
    writer.close()
    return Answer(status, body, sent)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    """One HTTP/1.1 response with a Content-Length (what the gateway sends): its status and JSON body."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(head[0].split()[1]), json.loads(body)


async def test_a_declared_oversize_body_is_refused_before_it_is_sent(gateway: Gateway) -> None:
    for path, headers in (("/livekit/webhook", {}), ("/v1/sessions/abc-1/end", {"Authorization": f"Bearer {gateway.key}"})):
        reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {SENT}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write((head + "\r\n").encode())  # headers only: not one byte of the body
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        writer.close()
        assert status_line.split()[1] == b"413", (path, status_line)


@pytest.mark.parametrize(
    ("path", "with_key", "chunked", "status", "kind"),
    [
        ("/livekit/webhook", False, True, 413, "PayloadTooLarge"),
        ("/livekit/webhook", False, False, 413, "PayloadTooLarge"),
        ("/v1/sessions/abc-1/end", True, True, 413, "PayloadTooLarge"),
        ("/v1/sessions/abc-1/end", False, True, 401, "Unauthorized"),  # no key: answered before the body is read
        ("/v1/sessions/abc-1/end", False, False, 413, "PayloadTooLarge"),  # a declared size is checked first
    ],
)
async def test_a_300_mb_post_does_not_grow_the_gateway(
    gateway: Gateway, path: str, with_key: bool, chunked: bool, status: int, kind: str
) -> None:
    headers = {"Authorization": f"Bearer {gateway.key}"} if with_key else {}
    before = gateway.rss()
    answer = await post_raw(gateway, path, headers, chunked=chunked, total=SENT if chunked else 64 * MB)
    grown = gateway.rss() - before
    assert (answer.status, answer.body["type"]) == (status, kind)
    assert answer.body_bytes_sent < 64 * MB, f"the gateway kept reading: {answer.body_bytes_sent} bytes sent"
    assert grown < GROWTH_ALLOWED, f"gateway RSS grew by {grown / MB:.1f} MB"


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{gateway.host}:{gateway.port}") as client:
        yield client


async def test_a_webhook_that_is_not_utf8_is_a_4xx(http: httpx.AsyncClient) -> None:
    r = await http.post("/livekit/webhook", content=b"\xff\xfe\x80{}", headers={"Authorization": "x"})
    assert r.status_code == 400 and r.json()["type"] == "BadRequest"


async def test_the_local_stack_configures_a_generated_key(http: httpx.AsyncClient, gateway: Gateway) -> None:
    assert gateway.key.startswith("sfk_") and len(gateway.key) > 40
    assert (await http.get("/v1/sessions")).status_code == 401
    r = await http.get("/v1/sessions", params={"limit": 1}, headers={"Authorization": f"Bearer {gateway.key}"})
    assert r.status_code == 200 and isinstance(r.json(), list)
    # Only its hash is configured: the key itself is in the state dir (outside git), nowhere in the settings.
    assert gateway.key not in os.environ.get("SESSIONFLOW_API_KEYS", "")
