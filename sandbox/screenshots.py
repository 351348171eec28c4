"""`python -m sandbox screenshots` (`make screenshots`): the pictures in docs/support.md, from this code.

Starts the local stack unless one is up, runs the demo's avatar interview with a worker in this process, then
drives the OS's headless Chromium (`sandbox.devtools`, loopback only) through the Temporal UI as support
would: the workflow list filtered by `SessionId`, the session's page with its result, its event history,
timeline, user metadata and search attributes, and the list of sessions by end reason. Each step is timed
from the navigation or click to the page showing what support looks for; the PNGs and the timings
(`timings.json`) go to docs/screenshots/.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from temporalio.client import Client

from config.settings import Settings
from sandbox.demo import console, local_stack, run_interview
from sandbox.devtools import Page, chromium_page
from starters.client import SessionClient
from workers.temporal import connect
from workers.worker import build_worker
from workflows.search_attributes import SESSION_END_REASON, SESSION_ID

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"


@dataclass(frozen=True)
class Step:
    file: str
    what: str
    seconds: float  # from the navigation or click until the page showed what support looks for


async def screenshots(out: Path = SCREENSHOTS) -> int:
    """Run the demo session, then take every screenshot; 0 when all were taken."""
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(local_stack())
        settings = Settings()
        client = await connect(settings)
        task_queue = f"screenshots-{uuid.uuid4().hex[:8]}"
        await stack.enter_async_context(build_worker(client, settings, task_queue=task_queue))
        sessions = SessionClient(client, settings, task_queue=task_queue)
        result = await run_interview(settings, sessions)
        # Visibility indexes the close a moment after it: the list below must find the session as it is now.
        await _until_indexed(client, f'{SESSION_ID.name} = "{result.session_id}" AND {SESSION_END_REASON.name} = "requested"')
        steps = await _take(settings, sessions, result.session_id, out)
    await asyncio.to_thread(_write_timings, out, steps)
    console.rule("screenshots")
    for step in steps:
        console.print(f"  {step.seconds:5.2f} s  {step.file:<34} {step.what}")
    console.print(f"[green]✓[/green] {len(steps)} screenshots in {out}")
    return 0


async def _take(settings: Settings, sessions: SessionClient, session_id: str, out: Path) -> list[Step]:
    description = await sessions.handle(session_id).describe()
    workflow_id, run_id = description.id, description.run_id
    ui = f"{settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}"
    workflow_page = f"{ui}/workflows/{workflow_id}/{run_id}"
    steps: list[Step] = []

    async def shoot(
        page: Page, file: str, what: str, go: Callable[[], Awaitable[None]], *texts: str, scroll_to: str | None = None
    ) -> None:
        started = time.monotonic()
        await go()
        await page.wait_for_text(*texts)
        seconds = time.monotonic() - started
        if scroll_to:
            await page.scroll_to(scroll_to)
        png = await page.screenshot()
        await asyncio.to_thread((out / file).write_bytes, png)
        steps.append(Step(file, what, round(seconds, 2)))

    def open_url(page: Page, url: str) -> Callable[[], Awaitable[None]]:
        return lambda: page.goto(url)

    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    by_id = quote(f'{SESSION_ID.name} = "{session_id}"')
    by_reason = quote(f'{SESSION_END_REASON.name} = "requested" AND SessionKind = "interview"')
    async with chromium_page() as page:
        await shoot(page, "01-find-by-session-id.png", f"workflow list, query SessionId = \"{session_id}\"",
                    open_url(page, f"{ui}/workflows?query={by_id}"), workflow_id, "COMPLETED")
        await shoot(page, "02-session-result.png", "click the row: the session page, its result names the end reason",
                    lambda: page.click_link(f"/workflows/{workflow_id}/{run_id}"), '"end_reason": "requested"', "Result")
        await shoot(page, "03-event-history.png", "event history: activity summaries, named timers, signals",
                    open_url(page, f"{workflow_page}/history"), "Event History", "create room", scroll_to="Event History")
        await shoot(page, "04-timeline.png", "timeline: activities and timers over time",
                    open_url(page, f"{workflow_page}/timeline"), "Timeline", "create room", scroll_to="Timeline")
        await shoot(page, "05-user-metadata.png", "user metadata: the summary and details set when the session started",
                    open_url(page, f"{workflow_page}/user-metadata"), "Summary", "roster")
        await shoot(page, "06-search-attributes.png", "search attributes: end reason, degraded, billed seconds, participants",
                    open_url(page, f"{workflow_page}/search-attributes"), SESSION_END_REASON.name, "AvatarBilledSeconds")
        await shoot(page, "07-find-by-end-reason.png", "workflow list, query SessionEndReason = \"requested\"",
                    open_url(page, f"{ui}/workflows?query={by_reason}"), workflow_id)
    return steps


async def _until_indexed(client: Client, query: str, timeout: float = 30.0) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if (await client.count_workflows(query)).count:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"visibility never found {query!r} within {timeout:g} s")


def _write_timings(out: Path, steps: list[Step]) -> None:
    (out / "timings.json").write_text(json.dumps([asdict(s) for s in steps], indent=2) + "\n")
