"""A small client for headless Chromium's DevTools protocol, enough to screenshot the Temporal UI.

Starts the OS's Chromium (`/usr/bin/chromium`, Debian's package) headless on a loopback debugging port, opens
one page, and speaks the protocol over its websocket (the `websockets` package): navigate, wait until the
page shows a text, click, screenshot. Chromium is told to resolve no host name and to skip every background
download, so the only address it talks to is the UI's on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import websockets

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
# Nothing outside loopback: no DNS (every host name fails), no updates, no sync, no field trials, no translate.
OFFLINE_FLAGS = (
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--no-first-run",
    "--no-default-browser-check", "--metrics-recording-only", "--disable-features=Translate,OptimizationHints,MediaRouter",
)


class BrowserError(RuntimeError):
    """Chromium is missing, did not start, or a page did not show what was awaited."""


def find_chromium() -> str:
    for path in CHROMIUM_CANDIDATES:
        if Path(path).exists():
            return path
    found = shutil.which("chromium")
    if found:
        return found
    raise BrowserError("no Chromium found: install the OS package (`apt-get install -y chromium`)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Page:
    """One browser tab, driven over its DevTools websocket."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events arriving meanwhile are not needed and dropped)."""
        call_id = next(self._ids)
        await self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self._ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"page script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def wait_for_text(self, *texts: str, timeout: float = 30.0) -> float:
        """Wait until the page shows every one of `texts`; returns the seconds it took."""
        started = time.monotonic()
        # The UI renders Markdown (summary, details) in frames of its own: their text counts too.
        text = (
            "[document.body.innerText, ...[...document.querySelectorAll('iframe')]"
            ".map(f => { try { return f.contentDocument.body.innerText; } catch (e) { return ''; } })].join('\\n')"
        )
        check = " && ".join(f"shown.includes({json.dumps(t)})" for t in texts)
        while time.monotonic() - started < timeout:
            if await self.evaluate(f"(() => {{ if (!document.body) return false; const shown = {text}; return {check}; }})()"):
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        shown = await self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
        raise BrowserError(f"the page never showed {texts!r} within {timeout:g} s; it shows:\n{shown}")

    async def click_link(self, href_part: str) -> None:
        """Click the first link whose address contains `href_part`, as a person would."""
        found = await self.evaluate(
            f"(() => {{ const a = [...document.querySelectorAll('a')].find(a => a.href.includes({json.dumps(href_part)}));"
            " if (!a) return false; a.click(); return true; })()"
        )
        if not found:
            raise BrowserError(f"no link to {href_part!r} on the page")

    async def click_text(self, text: str) -> None:
        """Click the first button or link showing exactly `text`."""
        found = await self.evaluate(
            "(() => { const e = [...document.querySelectorAll('button, a, [role=tab]')]"
            f".find(e => e.innerText.trim() === {json.dumps(text)}); if (!e) return false; e.click(); return true; }})()"
        )
        if not found:
            raise BrowserError(f"nothing to click showing {text!r}")

    async def scroll_to(self, heading: str) -> None:
        """Scroll the heading showing exactly `heading` to the top (the UI scrolls an inner pane, not the page)."""
        found = await self.evaluate(
            "(() => { const e = [...document.querySelectorAll('h1, h2, h3, h4')]"
            f".find(e => e.innerText.trim() === {json.dumps(heading)}); if (!e) return false;"
            " e.scrollIntoView({block: 'start'}); return true; })()"
        )
        if not found:
            raise BrowserError(f"no heading {heading!r} on the page")

    async def screenshot(self, *, full_page: bool = False) -> bytes:
        """The page as a PNG: the viewport, or with `full_page` everything down to the bottom."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = await self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params |= {"captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}}
        shot = await self.call("Page.captureScreenshot", **params)
        return base64.b64decode(shot["data"])


@asynccontextmanager
async def chromium_page(width: int = 1440, height: int = 1000) -> AsyncIterator[Page]:
    """Headless Chromium with one page of `width` x `height`; stopped (and its profile removed) on the way out."""
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="sessionflow-chromium-")
    command = [
        find_chromium(), "--headless=new", "--disable-gpu", f"--window-size={width},{height}",
        "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
        *OFFLINE_FLAGS, "about:blank",
    ]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox (containers)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ws_url = await _page_websocket(port, process)
        async with websockets.connect(ws_url, max_size=64 * 1024 * 1024) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            yield page
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def _page_websocket(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    """The debugging websocket of Chromium's first page, once its debugging port answers."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise BrowserError(f"Chromium exited at start (code {process.returncode})")
            try:
                targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
                continue
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                url: str = pages[0]["webSocketDebuggerUrl"]
                return url
            await asyncio.sleep(0.1)
    raise BrowserError(f"Chromium's debugging port {port} did not answer within {timeout:g} s")
