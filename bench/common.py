"""What every benchmark shares: closed-loop load, nearest-rank percentiles, the machine it ran on, process usage,
JSON output and matplotlib plots. A benchmark prints figures and writes them; it asserts nothing."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
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
