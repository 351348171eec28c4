"""What every benchmark shares: closed-loop load, nearest-rank percentiles, the machine it ran on, process usage,
JSON output and matplotlib plots. A benchmark prints figures and writes them; it asserts nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
# Where `make bench` puts the plots that docs/benchmarks.md shows (committed), and the JSON (not committed).
PLOTS = REPO / "docs" / "img"
RESULTS = REPO / ".sessionflow"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile, `q` in 0..1 (with n <= 100 samples, p99 is the largest or second largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(ms: list[float], wall_s: float) -> dict[str, float]:
    """p50/p90/p99/max/mean of `ms`, and completions per second over `wall_s`."""
    return {
        "n": len(ms),
        "p50": pct(ms, 0.5),
        "p90": pct(ms, 0.9),
        "p99": pct(ms, 0.99),
        "max": max(ms),
        "mean": statistics.mean(ms),
        "per_s": len(ms) / wall_s if wall_s > 0 else 0.0,
    }


@dataclass
class Call:
    """One measured call: its duration and the wall-clock time (epoch seconds) the client sent it."""

    ms: float
    sent: float
    key: str = ""


@dataclass
class Phase:
    calls: list[Call] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ms(self) -> list[float]:
        return [c.ms for c in self.calls]


async def closed_loop(keys: list[str], concurrency: int, op: Callable[[str], Awaitable[None]]) -> Phase:
    """Run `op(key)` for every key with `concurrency` callers, each taking the next key when it is done."""
    phase = Phase()
    todo = iter(keys)

    async def caller() -> None:
        for key in todo:  # one iterator shared by all callers: each key is taken once
            sent = time.time()
            t = time.perf_counter()
            await op(key)
            phase.calls.append(Call((time.perf_counter() - t) * 1000, sent, key))

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(min(concurrency, len(keys)))))
    phase.wall_s = time.perf_counter() - t0
    return phase


def parse_levels(text: str) -> list[tuple[int, int]]:
    """`"1:30,10:40"` -> [(1, 30), (10, 40)]: concurrency and number of calls per level."""
    levels = []
    for part in text.split(","):
        c, _, n = part.partition(":")
        levels.append((int(c), int(n)))
    return levels


def machine() -> dict[str, Any]:
    """The machine and commit a run measured (goes in every JSON and in docs/benchmarks.md)."""

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False).stdout.strip()
        except OSError:
            return ""

    return {
        "nproc": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": run("git", "rev-parse", "--short", "HEAD"),
        "dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
    }


def usage(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, resident MiB) of process `pid`, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    return cpu, rss


def write_json(path: Path, out: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    """A run's JSON (what `write_json` wrote), e.g. to draw its plots again (`--replot`)."""
    return json.loads(Path(path).read_text())


def save_plot(fig: Any, name: str) -> Path:
    """Write a matplotlib figure as `docs/img/<name>.png` (what docs/benchmarks.md shows) and close it."""
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    path = PLOTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    """A new matplotlib figure and axes (headless backend), titled and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def ratios(
    measured: dict[str, float], baseline: dict[str, float], qs: tuple[str, ...] = ("p50", "p90", "p99")
) -> dict[str, float]:
    """`measured[q] / baseline[q]` for each percentile `q` (what the engine costs over the same work without it)."""
    return {q: measured[q] / baseline[q] if baseline[q] > 0 else float("inf") for q in qs}


FIGURES = ("p50", "p90", "p99", "max", "mean")


def print_table(title: str, rows: list[tuple[str, dict[str, float]]], figures: tuple[str, ...] = FIGURES,
                unit: str = "ms") -> None:
    """A readable table: one row per measure (label, summary), one column per figure."""
    print(f"\n{title}; {unit}")
    print(f"  {'measure':<44} {'n':>4} " + " ".join(f"{f:>8}" for f in figures))
    for label, s in rows:
        print(f"  {label:<44} {int(s['n']):>4} " + " ".join(f"{s[f]:8.1f}" for f in figures))


def started_on() -> dict[str, Any]:
    """What a run records at its start: the time and the load average (the end's is in `machine()`)."""
    from datetime import UTC, datetime

    return {"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "load_avg_at_start": os.getloadavg()}


def cdf_plot(name: str, title: str, series: dict[str, list[float]], xlabel: str = "milliseconds",
             log_x: bool = False, styles: dict[str, dict[str, Any]] | None = None,
             marks: dict[str, float] | None = None) -> Path:
    """One empirical CDF line per series (label -> samples), saved as `docs/img/<name>.png`; `styles` gives a
    series matplotlib line options (e.g. `{"color": "C0", "linestyle": "--"}` for a baseline beside its run);
    `marks` draws a labelled vertical line at each value (targets)."""
    fig, ax = figure(title, xlabel, "fraction of samples at or below")
    for label, values in series.items():
        if not values:
            continue
        ordered = sorted(values)
        ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
        ax.step([ordered[0], *ordered], [0.0, *ys], where="post", label=f"{label} (n={len(ordered)})",
                **(styles or {}).get(label, {}))
    for n, (label, x) in enumerate((marks or {}).items()):
        ax.axvline(x, color="grey", linestyle=(0, (1, 1 + n)), linewidth=1, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    fig.set_size_inches(10, 4)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the plot: no line hidden
    return save_plot(fig, name)


# ---- what a benchmark leaves behind ----------------------------------------------------------------------------


async def leftovers(settings: Any, rooms: set[str]) -> dict[str, list[str]]:
    """Of `rooms` (room names a benchmark used), those still on LiveKit, and the emulator's avatar sessions in them
    that are still active (GET /_control/sessions: the benchmarks run on the emulator). Both must be empty."""
    import httpx
    from livekit import api

    async with api.LiveKitAPI(settings.livekit_http_url, settings.livekit_api_key,
                              settings.livekit_api_secret.get_secret_value()) as lk:
        listed = await lk.room.list_rooms(api.ListRoomsRequest())
    async with httpx.AsyncClient(base_url=settings.liveavatar_api_url, timeout=10, trust_env=False) as http:
        response = await http.get("/_control/sessions")
        response.raise_for_status()
        avatars = response.json()["data"]["sessions"]
    return {
        "rooms": sorted(r.name for r in listed.rooms if r.name in rooms),
        "avatars": sorted(a["id"] for a in avatars if a["livekit_room"] in rooms and a["state"] == "active"),
    }


def print_leftovers(left: dict[str, list[str]], what: str) -> None:
    print(f"\nleft behind ({what}): {len(left['rooms'])} rooms on LiveKit"
          f"{': ' + ', '.join(left['rooms']) if left['rooms'] else ''}, {len(left['avatars'])} active avatar sessions "
          f"on the emulator{': ' + ', '.join(left['avatars']) if left['avatars'] else ''}")


# ---- a real participant watching for video ---------------------------------------------------------------------


class VideoWatch:
    """What a real rtc participant sees of the others' video: per remote identity, when (time.monotonic()) its
    first video track was subscribed and when its first frame arrived. Attach before connecting."""

    def __init__(self, room: Any) -> None:
        from livekit import rtc

        self._rtc = rtc
        self.room = room
        self.subscribed: dict[str, float] = {}
        self.first_frame: dict[str, float] = {}
        self._changed = asyncio.Event()
        self._readers: set[asyncio.Task[None]] = set()
        room.on("track_subscribed", self._on_subscribed)

    def _on_subscribed(self, track: Any, _publication: Any, participant: Any) -> None:
        if track.kind != self._rtc.TrackKind.KIND_VIDEO or participant.identity in self.subscribed:
            return
        self.subscribed[participant.identity] = time.monotonic()
        self._changed.set()
        task = asyncio.create_task(self._first_frame(track, participant.identity))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _first_frame(self, track: Any, identity: str) -> None:
        stream = self._rtc.VideoStream(track)
        try:
            async for _ in stream:
                self.first_frame[identity] = time.monotonic()
                self._changed.set()
                break
        finally:
            await stream.aclose()

    async def until(self, seen: Callable[[], Any]) -> Any:
        """Wait until `seen()` returns something (a benchmark measures: the caller bounds the wait)."""
        while True:
            self._changed.clear()
            found = seen()
            if found:
                return found
            await self._changed.wait()

    async def video_from(self, prefix: str, *, frame: bool = False, not_before: float = 0.0) -> tuple[str, float]:
        """The first identity starting with `prefix` whose video was subscribed (or, with `frame`, whose first
        frame came) at or after `not_before`, and when."""
        times = self.first_frame if frame else self.subscribed

        def seen() -> tuple[str, float] | None:
            hits = [(t, i) for i, t in times.items() if i.startswith(prefix) and t >= not_before]
            return (min(hits)[1], min(hits)[0]) if hits else None

        result: tuple[str, float] = await self.until(seen)
        return result

    async def close(self) -> None:
        for task in list(self._readers):
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@contextlib.asynccontextmanager
async def watching_participant(url: str, token: str) -> AsyncIterator[VideoWatch]:
    """A real participant that publishes nothing and watches the others' video (see `VideoWatch`); always leaves."""
    from livekit import rtc

    from activities.rtc_connect import connect_shielded

    room = rtc.Room()
    watch = VideoWatch(room)
    await connect_shielded(room, url, token, rtc.RoomOptions(auto_subscribe=True))
    try:
        # Tracks already subscribed before the handler saw them (published before we connected).
        for participant in room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None and publication.subscribed:
                    watch._on_subscribed(publication.track, publication, participant)
        yield watch
    finally:
        await watch.close()
        await room.disconnect()


def quiet_sdk_logs() -> None:
    """Only errors that matter on the console: the rtc SDK logs an error for every participant whose room is deleted
    under it (what ending a session with someone in it does), and the worker logs the keep-alive failing as the
    avatar is stopped. A benchmark counts its failures itself."""
    import logging

    logging.getLogger("livekit").setLevel(logging.CRITICAL)
    logging.getLogger("temporalio.activity").setLevel(logging.ERROR)


async def end_sessions(sessions: Any, session_ids: list[str], failures: list[str], attempts: int = 3) -> None:
    """End each session (ten at a time), retrying an attempt that failed (an overloaded machine can time a workflow
    task out); one already ended or never started counts as ended. What still fails goes into `failures`."""
    from starters.client import SessionEnded, SessionNotFound

    async def end(session_id: str) -> None:
        for attempt in range(1, attempts + 1):
            try:
                await sessions.end(session_id, "bench cleanup")
                return
            except (SessionEnded, SessionNotFound):
                return
            except Exception as e:
                if attempt == attempts:
                    failures.append(f"cleanup: could not end {session_id}: {e!r}")

    for i in range(0, len(session_ids), 10):
        await asyncio.gather(*(end(sid) for sid in session_ids[i:i + 10]))


def cpu_share(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]], seconds: float) -> dict[int, float]:
    """Per pid, the CPU it used between two `usage` snapshots, in % of one core."""
    return {pid: 100 * (after[pid][0] - before[pid][0]) / seconds for pid in after if pid in before and seconds > 0}


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, from /proc/stat): what a share is taken of."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


class ParticipantHost:
    """Real LiveKit participants (rtc SDK, each publishing a microphone tone) in a process of their own
    (`python -m bench.participants`), so the load they are stays out of the measuring client. `join`/`leave`
    return the host's own milliseconds; `pid` is for `usage`."""

    def __init__(self, log: Path | None = None) -> None:
        self._log = log  # the host's stderr (the rtc SDK's warnings as rooms close under it)
        self._proc: asyncio.subprocess.Process | None = None
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def __aenter__(self) -> ParticipantHost:
        stderr = None
        if self._log is not None:
            self._log.parent.mkdir(parents=True, exist_ok=True)
            stderr = self._log.open("ab")
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.participants", cwd=REPO, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=stderr, limit=2**20,
        )
        if stderr is not None:
            stderr.close()  # the child has its own copy
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *_: object) -> None:
        """End of input: the host leaves every room and exits (killed if it has not within 30 s)."""
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            async with asyncio.timeout(30):
                await self._proc.wait()
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        if self._reader is not None:
            self._reader.cancel()

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            answer = json.loads(line)
            future = self._waiting.pop(answer["id"], None)
            if future is not None and not future.done():
                future.set_result(answer)
        for future in self._waiting.values():  # the host exited: nothing more will answer
            if not future.done():
                future.set_exception(RuntimeError("the participant host exited"))

    async def _call(self, **request: Any) -> float:
        assert self._proc is not None and self._proc.stdin is not None
        self._next += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = future
        self._proc.stdin.write((json.dumps({"id": self._next, **request}) + "\n").encode())
        await self._proc.stdin.drain()
        answer = await future
        if not answer["ok"]:
            raise RuntimeError(f"participant {request.get('key')}: {answer['error']}")
        return float(answer["ms"])

    async def join(self, key: str, url: str, token: str) -> float:
        return await self._call(op="join", key=key, url=url, token=token)

    async def leave(self, key: str) -> float:
        return await self._call(op="leave", key=key)


async def bounded(items: list[T], concurrency: int, op: Callable[[T], Awaitable[Any]], timeout: float = 60.0) -> list[Any]:
    """`op` over `items`, `concurrency` at a time, each within `timeout` s; exceptions come back as results."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: T) -> Any:
        async with gate:
            try:
                async with asyncio.timeout(timeout):
                    return await op(item)
            except Exception as e:
                return e

    return await asyncio.gather(*(one(i) for i in items))


class WorkerProcess:
    """`python -m workers [--media]` as a process of its own (its memory and CPU read apart from the client's), on
    the given task queues, logging warnings only into `.sessionflow/<log>`, no metrics port."""

    def __init__(self, media: bool, queue: str, media_queue: str, receive_audio: bool = False, *, log: str = "") -> None:
        env = os.environ | {
            "SESSIONFLOW_TASK_QUEUE": queue, "SESSIONFLOW_MEDIA_TASK_QUEUE": media_queue,
            "SESSIONFLOW_LOG_LEVEL": "WARNING", "SESSIONFLOW_METRICS_PORT": "0",
            "SESSIONFLOW_MONITOR_RECEIVE_AUDIO": "true" if receive_audio else "false",
        }
        self.log = RESULTS / (log or f"bench-{'media' if media else 'workflow'}-worker.log")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "workers", *(["--media"] if media else [])],
                                         cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def livekit_api(settings: Any) -> Any:
    """A LiveKit server API client for `settings` (use as `async with`)."""
    from livekit import api

    s = settings
    return api.LiveKitAPI(s.livekit_http_url, s.livekit_api_key, s.livekit_api_secret.get_secret_value())


async def direct_room(settings: Any, room: str, bench: str) -> str:
    """A baseline's LiveKit work without Temporal: create `room` as a session would, and mint its candidate's token
    (returned)."""
    from livekit import api

    from activities.livekit import mint_token
    from workflows.machine import PARTICIPANT_TOKEN_TTL
    from workflows.models import MintTokenInput, Role

    async with livekit_api(settings) as lk:
        await lk.room.create_room(api.CreateRoomRequest(
            name=room, empty_timeout=180, departure_timeout=60, max_participants=4, metadata=json.dumps({"bench": bench})))
    token, _ = mint_token(settings, MintTokenInput(room=room, identity="cand", role=Role.CANDIDATE, ttl=PARTICIPANT_TOKEN_TTL))
    return str(token)


async def delete_rooms(settings: Any, rooms: set[str]) -> None:
    """Delete each of `rooms` on LiveKit (one already gone is fine), taking it out of the set as it goes."""
    from livekit import api

    if not rooms:
        return
    async with livekit_api(settings) as lk:
        for room in list(rooms):
            try:
                await lk.room.delete_room(api.DeleteRoomRequest(room=room))
            except api.TwirpError as e:
                if e.code != "not_found":
                    raise
            rooms.discard(room)
