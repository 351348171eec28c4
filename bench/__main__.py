"""`make bench`: every benchmark, one after the other, on the local stack the command runs under.

    python -m sandbox exec -- python -m bench                 # all of them
    python -m sandbox exec -- python -m bench session_ready   # some of them, by name
    python -m sandbox exec -- python -m bench --quick         # each with its small sizes (a smoke run)

Each benchmark is its own module (`python -m bench.<name>`, with its own `--help`), run as a child process so one
that fails does not stop the others; each prints its table and writes its JSON (`.sessionflow/bench-*.json`) and
its plots (`docs/img/bench-*.png`). Prints which ones failed at the end and exits non-zero if any did.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

# name -> (what it measures, the arguments of a quick run). Order: the quick, quiet ones first.
BENCHES: dict[str, tuple[str, list[str]]] = {
    "session_ready": ("join call until the grant, at 1/10/50 concurrent, against the floor and direct baselines",
                      ["--levels", "1:10,10:20", "--warmup", "1"]),
    "monitor_events": ("room monitor: event latency, history size, media worker memory and CPU",
                       ["--sessions", "5", "--events", "5", "--hold", "5"]),
    "capacity": ("live monitored sessions one workflow worker and one media worker hold: join p50/p99, event latency, "
                 "memory and CPU per session, ramped until join p99 passes 500 ms or the monitors fall behind",
                 ["--steps", "5,10", "--hold", "5", "--probe", "5", "--events", "2", "--plots", ""]),
    "storage": ("the dev server's SQLite: default journal against WAL (two servers of its own)",
                ["--levels", "1:10,10:20", "--rounds", "1"]),
    "avatar_in_room": ("join call until the candidate has the avatar's video, against the emulator alone",
                       ["--levels", "1:3,3:3", "--warmup", "1"]),
    "throughput": ("whole sessions started, run and cleaned per second, against direct LiveKit",
                   ["--levels", "10:20", "--avatar-levels", "5:10", "--warmup", "1"]),
    "recovery": ("worker kill, avatar crash and terminate until working again / released",
                 ["--reps", "2"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHES)})")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks each benchmark runs, figures are rough")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    failed: list[str] = []
    for name in args.names or list(BENCHES):
        what, quick = BENCHES[name]
        print(f"\n==> bench.{name}: {what}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", f"bench.{name}", *(quick if args.quick else [])])
        print(f"==> bench.{name}: {'done' if code == 0 else f'FAILED (exit {code})'} in {time.monotonic() - started:.0f} s",
              flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
