"""What every benchmark shares: closed-loop load, nearest-rank percentiles, the machine it ran on, process usage,
JSON output and matplotlib plots. A benchmark prints figures and writes them; it asserts nothing."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
