"""One service of the local stack as a process: how it is run, started, checked for readiness and stopped.

Each service runs in its own process group (so a stop reaches whatever it spawned) with its output in a log file.
A :class:`RunningService` can be rebuilt from the stack's state file by another process, which then reads its
liveness from /proc (checking the start time against pid reuse). Nothing here knows which services exist:
that is :mod:`sandbox.stack`.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
LOG_TAIL_LINES = 20
# How a service is stopped unless its spec says otherwise: (signal, seconds to wait for it to exit) in turn,
# then SIGKILL.
DEFAULT_STOP_PLAN: tuple[tuple[int, float], ...] = ((signal.SIGTERM, 5.0),)


class StackError(RuntimeError):
    """The local stack could not do what was asked; the message says what to do about it."""


class PortInUseError(StackError):
    """A port the stack needs on 127.0.0.1 is already taken by another process."""


class ServiceStartError(StackError):
    """A service exited, or did not become ready in time. Carries its command and the tail of its log."""

    def __init__(self, service: str, reason: str, command: Sequence[str], log_path: Path | None) -> None:
        self.service = service
        self.reason = reason
        self.command = list(command)
        self.log_path = log_path
        self.log_tail = log_tail(log_path) if log_path else []
        lines = [f"{service} did not start: {reason}", f"  command: {shlex.join(self.command)}"]
        if log_path is not None:
            lines.append(f"  log:     {log_path}" + (" (last lines below)" if self.log_tail else " (empty)"))
            lines.extend(f"    | {line}" for line in self.log_tail)
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one service and how to know it is ready.

    ``probe`` returns True once the service answers. ``module`` (for ``python -m`` services) is looked up
    before launching, so a missing entry point fails at once with a clear error instead of a timeout.
    """

    name: str
    command: tuple[str, ...]
    probe: Callable[[], bool]
    url: str = ""
    tcp_ports: tuple[int, ...] = ()
    udp_ports: tuple[int, ...] = ()
    module: str | None = None
    ready_timeout: float = 60.0
    stop_plan: tuple[tuple[int, float], ...] = DEFAULT_STOP_PLAN


@dataclass
class RunningService:
    """A started service. Created by :func:`spawn_service`, or rebuilt from the state file by another
    process (then ``popen`` is None and liveness is read from /proc, checking the start time against
    pid reuse)."""

    name: str
    pid: int
    command: list[str]
    log_path: Path
    url: str = ""
    start_time: int | None = None
    stop_plan: tuple[tuple[int, float], ...] = DEFAULT_STOP_PLAN
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def exit_code(self) -> int | None:
        """The exit code once the process has exited (-1 when it is not our child), else None."""
        if self.popen is not None:
            return self.popen.poll()
        return None if pid_alive(self.pid, self.start_time) else -1

    def alive(self) -> bool:
        return self.exit_code() is None

    def stop(self) -> None:
        """Stop the whole process group: the plan's signals in turn, then SIGKILL. Safe to call twice."""
        if not self.alive():
            return
        for sig, wait_s in self.stop_plan:
            if not kill_group(self.pid, sig) or self.wait_exit(wait_s):
                break
        else:
            kill_group(self.pid, signal.SIGKILL)
            self.wait_exit(5.0)
        # Anything the service spawned that outlived it (same group) goes too.
        kill_group(self.pid, signal.SIGKILL)

    def to_state(self) -> dict[str, object]:
        return {
            "name": self.name, "pid": self.pid, "command": self.command, "log": str(self.log_path),
            "url": self.url, "start_time": self.start_time, "stop_plan": [list(step) for step in self.stop_plan],
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> RunningService:
        """Rebuild a service from :meth:`to_state`'s output read back from JSON."""
        return cls(
            name=str(data["name"]), pid=int(data["pid"]), command=[str(arg) for arg in data["command"]],
            log_path=Path(str(data["log"])), url=str(data.get("url", "")),
            start_time=data.get("start_time"),
            stop_plan=tuple((int(s), float(w)) for s, w in data.get("stop_plan", DEFAULT_STOP_PLAN)),
        )

    def wait_exit(self, timeout: float) -> bool:
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while pid_alive(self.pid, self.start_time):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


def spawn_service(spec: ServiceSpec, *, env: dict[str, str], log_dir: Path) -> RunningService:
    """Check the entry point and the ports, then launch the service in its own process group."""
    if spec.module is not None and not _module_exists(spec.module):
        raise ServiceStartError(
            spec.name,
            f"there is no Python module `{spec.module}` in this checkout (is that service written yet?). "
            "Start only the other services, e.g. `python -m sandbox up --services temporal,livekit`.",
            spec.command, None,
        )
    check_ports(spec)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            list(spec.command), cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,  # own group: Ctrl-C reaches us, not it
        )
    return RunningService(
        name=spec.name, pid=popen.pid, command=list(spec.command), log_path=log_path, url=spec.url,
        start_time=proc_start_time(popen.pid), stop_plan=spec.stop_plan, popen=popen,
    )


def check_ports(spec: ServiceSpec) -> None:
    """Raise :class:`PortInUseError` if a port ``spec`` needs on 127.0.0.1 is taken."""
    for port, kind in [(p, socket.SOCK_STREAM) for p in spec.tcp_ports] + [(p, socket.SOCK_DGRAM) for p in spec.udp_ports]:
        if not port_is_free(port, kind):
            proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
            raise PortInUseError(
                f"{spec.name} needs {proto} port {HOST}:{port}, which another process holds "
                f"(see `ss -lntup | grep {port}`). Stop that process (`python -m sandbox down` if it is a "
                "stack), or use other ports (`--port-offset N` / SESSIONFLOW_PORT_OFFSET)."
            )


def wait_until_ready(service: RunningService, spec: ServiceSpec) -> float:
    """Poll the probe until it answers; raise :class:`ServiceStartError` if the process exits or time runs
    out. Returns the seconds it took."""
    started = time.monotonic()
    while True:
        code = service.exit_code()
        if code is not None:
            raise ServiceStartError(spec.name, f"it exited with code {code} before it was ready", spec.command,
                                    service.log_path)
        if spec.probe():
            return time.monotonic() - started
        if time.monotonic() - started > spec.ready_timeout:
            raise ServiceStartError(spec.name, f"not ready after {spec.ready_timeout:.0f} s", spec.command,
                                    service.log_path)
        time.sleep(0.1)


def start_service(spec: ServiceSpec, *, env: dict[str, str] | None = None, log_dir: Path) -> RunningService:
    """Spawn one service and wait until it is ready; on any failure it is stopped before the error propagates."""
    service = spawn_service(spec, env=env if env is not None else dict(os.environ), log_dir=log_dir)
    try:
        wait_until_ready(service, spec)
    except BaseException:
        service.stop()
        raise
    return service


def http_probe(url: str, *, status: int | None = 200, body: str | None = None) -> Callable[[], bool]:
    """A probe that GETs ``url``: ready on ``status`` (any status if None) and, if given, that exact body."""

    def probe() -> bool:
        try:
            response = httpx.get(url, timeout=1.0, trust_env=False)  # never through an HTTP proxy
        except httpx.HTTPError:
            return False
        if status is not None and response.status_code != status:
            return False
        return body is None or response.text.strip() == body

    return probe


def temporal_probe(temporal: Path, address: str, namespace: str) -> Callable[[], bool]:
    """Ready when the frontend answers for the namespace (``temporal operator namespace describe``).

    The CLI rather than a temporalio client keeps the SDK's Rust runtime out of short-lived launcher
    processes (it can crash at interpreter exit, reference/temporal-patterns.md §6)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}
    argv = [str(temporal), "operator", "namespace", "describe", "--namespace", namespace, "--address", address,
            "--disable-config-file", "--command-timeout", "2s", "--output", "none"]

    def probe() -> bool:
        try:
            return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=5).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    return probe


def port_is_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    """True when nothing holds ``port`` on 127.0.0.1 (a TIME_WAIT leftover does not count)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------------------------------------
# Processes: /proc, process groups, logs


def _module_exists(module: str) -> bool:
    # Imports the parent packages (ours, light) but not the module itself.
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces and parentheses
    return fields[0], int(fields[19])


def proc_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), to tell it from a later process that reuses the pid."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Alive and, when ``start_time`` is known, the same process (not a later one that reused the pid)."""
    if Path("/proc/self/stat").exists():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return False
        return start_time is None or stat[1] == start_time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False if there is no such group (or it is not ours)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log (each cut to 300 characters), for error messages."""
    if path is None:
        return []
    try:
        data = path.read_bytes()[-64_000:]
    except OSError:
        return []
    return [line[:300] for line in data.decode(errors="replace").splitlines()[-lines:]]

