"""The local stack: Temporal dev server, LiveKit server, LiveAvatar emulator and gateway, all on 127.0.0.1.

One call starts the services in order and one call stops them in reverse order, always::

    with LocalStack() as stack:                       # or: async with LocalStack() as stack
        subprocess.run(cmd, env=stack.subprocess_env())

    LocalStack(services=("temporal", "livekit"), ports=StackPorts().shifted(10_000)).start()

Each service runs in its own process group with its output in ``<state dir>/<service>.log``. A state file
(``<state dir>/stack.json``) records what runs, so another process can report on it or stop it
(``python -m sandbox status`` / ``down``) and a later start cleans up what a killed launcher left behind.
No service is given an address outside the loopback range (DESIGN.md, "The local stack").

The launcher is four modules, one job each: :mod:`sandbox.binaries` finds or builds what the services run,
:mod:`sandbox.processes` runs one service (process group, readiness probe, stop), this module knows the
services and their order, ports and environment, and :mod:`sandbox.chaos` breaks them on purpose for tests.
The names those modules export are importable from here too (``__all__``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from config.settings import LOCAL_LIVEAVATAR_API_KEY
from sandbox.binaries import (
    LIVEKIT_PACKAGE,
    LIVEKIT_VERSION,
    LiveKitBuildError,
    ToolNotFoundError,
    default_cache_dir,
    ensure_livekit_server,
    find_temporal_cli,
    livekit_server_path,
    which_or_name,
)
from sandbox.chaos import ChaosControls
from sandbox.processes import (
    DEFAULT_STOP_PLAN,
    HOST,
    REPO_ROOT,
    PortInUseError,
    RunningService,
    ServiceSpec,
    ServiceStartError,
    StackError,
    check_ports,
    http_probe,
    pid_alive,
    port_is_free,
    proc_start_time,
    spawn_service,
    start_service,
    temporal_probe,
    wait_until_ready,
)
from sandbox.secrets import LocalSecrets, load_or_create
from starters.api import new_api_key
from workflows.search_attributes import SEARCH_ATTRIBUTE_TYPES

__all__ = [
    "DEFAULT_STOP_PLAN",
    "HOST",
    "LIVEKIT_CONFIG",
    "LIVEKIT_PACKAGE",
    "LIVEKIT_VERSION",
    "REPO_ROOT",
    "SEARCH_ATTRIBUTES",
    "SEARCH_ATTRIBUTE_TYPES",
    "SERVICE_NAMES",
    "STATE_FILE",
    "TEMPORAL_DYNAMIC_CONFIG",
    "TEMPORAL_NAMESPACE",
    "TEMPORAL_SQLITE_PRAGMAS",
    "LiveKitBuildError",
    "LocalStack",
    "PortInUseError",
    "RunningService",
    "ServiceSpec",
    "ServiceStartError",
    "StackAlreadyRunningError",
    "StackError",
    "StackPorts",
    "ToolNotFoundError",
    "check_ports",
    "default_cache_dir",
    "default_state_dir",
    "ensure_livekit_server",
    "find_temporal_cli",
    "http_probe",
    "livekit_server_path",
    "port_is_free",
    "spawn_service",
    "start_service",
    "stop_stack",
    "temporal_probe",
    "wait_until_ready",
]

LIVEKIT_CONFIG = Path(__file__).resolve().with_name("livekit.yaml")
# What sandbox/livekit.yaml names as the webhook's signing key; the derived config puts the generated key there.
LIVEKIT_CONFIG_KEY_PLACEHOLDER = "generated-on-first-run"
TEMPORAL_NAMESPACE = "default"
SEARCH_ATTRIBUTES = tuple(SEARCH_ATTRIBUTE_TYPES)
TEMPORAL_DYNAMIC_CONFIG = {
    "frontend.enableUpdateWorkflowExecution": "true",
    "frontend.enableUpdateWorkflowExecutionAsyncAccepted": "true",
    "system.numConsecutiveWorkflowTaskProblemsToTriggerSearchAttribute": "2",
    # The server would otherwise phone home to check for new versions: the stack stays on loopback.
    "frontend.enableServerVersionCheck": "false",
}

#: SQLite settings of the dev server's database. WAL lets readers run beside the writer and commits append to the
#: log instead of rewriting pages; with ``synchronous=normal`` a commit is durable against a crash of the server
#: process (what the chaos suite does), though the last commits may be lost if the machine itself loses power:
#: the right trade for a development stack. ``python -m bench.storage`` measures it against the default.
TEMPORAL_SQLITE_PRAGMAS: dict[str, str] = {"journal_mode": "wal", "synchronous": "normal"}

#: Every service the stack knows, in start order (stopped in the reverse order).
SERVICE_NAMES = ("temporal", "livekit", "emulator", "gateway")
STATE_FILE = "stack.json"
# The local stack's key for the sessions HTTP API (starters/api.py), made on first run, never in git.
API_KEY_FILE = "api-key"

# The stack's generated secrets (sandbox/secrets.py): in every child's environment, never in the state file.
SECRET_ENV = (
    "LIVEKIT_API_SECRET", "SESSIONFLOW_CODEC_KEYS", "SESSIONFLOW_CODEC_ADMIN_TOKEN", "SESSIONFLOW_CODEC_SUPPORT_TOKEN",
    "SESSIONFLOW_API_KEY", "SESSIONFLOW_PARTICIPANT_ID_KEY",
)

# Variables that would point a child at something other than this stack (a Temporal Cloud key in the
# developer's shell must not turn TLS on against the local dev server).
_FOREIGN_ENV = (
    "TEMPORAL_API_KEY", "TEMPORAL_TLS", "TEMPORAL_TLS_CERT", "TEMPORAL_TLS_KEY", "SESSIONFLOW_CODEC_KEY_FILE",
)

# How each service is stopped: (signal, seconds to wait for it to exit) in turn, then SIGKILL.
# LiveKit's first SIGTERM drains and waits for participants with no upper bound; the second one forces the
# exit (reference/livekit.md §4.1).
_STOP_PLANS: dict[str, tuple[tuple[int, float], ...]] = {
    "temporal": ((signal.SIGTERM, 8.0),),
    "livekit": ((signal.SIGTERM, 2.0), (signal.SIGTERM, 5.0)),
}


class StackAlreadyRunningError(StackError):
    """The state directory belongs to a stack that is still running."""


# --------------------------------------------------------------------------------------------------------
# Ports and directories


@dataclass(frozen=True)
class StackPorts:
    """The ports the stack listens on, all on 127.0.0.1. ``shifted(n)`` moves every one by ``n``."""

    temporal: int = 7233
    temporal_ui: int = 8233
    livekit: int = 7880
    livekit_rtc_udp: int = 7882
    emulator: int = 8090
    gateway: int = 8099
    worker_metrics: int = 9464  # a worker's Prometheus endpoint (workers/metrics.py), not a service of the stack

    def shifted(self, offset: int) -> StackPorts:
        return StackPorts(**{name: port + offset for name, port in asdict(self).items()})


def local_api_key_env(state_dir: Path) -> dict[str, str]:
    """The gateway accepts the local key (only its hash is configured); clients (demo, tests) present it."""
    key = local_api_key(state_dir)
    return {"SESSIONFLOW_API_KEYS": f"local:{hashlib.sha256(key.encode()).hexdigest()}", "SESSIONFLOW_API_KEY": key}


def local_api_key(state_dir: Path) -> str:
    """The local stack's API key, made on first use and kept (owner-only) in the state dir, outside git."""
    path = state_dir / API_KEY_FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    key, _ = new_api_key()
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def default_state_dir() -> Path:
    """``$SESSIONFLOW_STATE_DIR``, else ``<repo>/.sessionflow`` (gitignored)."""
    return Path(os.environ.get("SESSIONFLOW_STATE_DIR") or REPO_ROOT / ".sessionflow").resolve()


# --------------------------------------------------------------------------------------------------------
# The stack


class LocalStack(ChaosControls):
    """The local stack. ``start()`` starts ``services`` in order (Temporal, LiveKit, emulator, gateway) and
    returns once each answers; ``stop()`` stops them in reverse order. Any failure or interrupt during
    ``start()`` stops what was already started before the error propagates.

    ``env`` is what every sessionflow process reads to find this stack (config/settings.py);
    ``subprocess_env()`` is the current environment with it applied. ``urls`` is for display. The chaos
    controls (``kill``, ``start_again``, ``restart``, ``pause``, ``resume``) come from :class:`ChaosControls`.
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
        sqlite_pragmas: dict[str, str] | None = None,
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
        self.sqlite_pragmas = TEMPORAL_SQLITE_PRAGMAS if sqlite_pragmas is None else sqlite_pragmas
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.startup_seconds: dict[str, float] = {}
        self._running: list[RunningService] = []
        self._owner_pid = os.getpid()
        self._owner_start_time: int | None = proc_start_time(self._owner_pid)
        self._detached = False
        # Set by the CLI's foreground `up`: `down` then asks this process to stop (SIGTERM) instead of
        # killing its services under it.
        self._owner_stops_on_sigterm = False
        self._secrets: LocalSecrets | None = None

    # ---- what the stack exports

    @property
    def secrets(self) -> LocalSecrets:
        """This stack's LiveKit key pair, codec key and codec server tokens, made on first use and kept in the
        state dir, so every process of this stack (and a later run) shares them."""
        if self._secrets is None:
            self._secrets = load_or_create(self.state_dir)
        return self._secrets

    def ui_codec_url(self) -> str:
        """The codec server the Temporal UI decodes payloads with: the gateway's (starters/codec_server.py).
        The dev server's UI cannot send an Authorization header, so its URL carries the `support` token (masked
        output; CORS admits the UI's origin only)."""
        return f"http://{HOST}:{self.ports.gateway}/codec/ui/{self.secrets.codec_support_token}"

    @property
    def env(self) -> dict[str, str]:
        p, secrets = self.ports, self.secrets
        return {
            "TEMPORAL_ADDRESS": f"{HOST}:{p.temporal}",
            "TEMPORAL_NAMESPACE": TEMPORAL_NAMESPACE,
            "TEMPORAL_UI_URL": f"http://{HOST}:{p.temporal_ui}",
            "LIVEKIT_URL": f"ws://{HOST}:{p.livekit}",
            "LIVEKIT_API_KEY": secrets.livekit_api_key,
            "LIVEKIT_API_SECRET": secrets.livekit_api_secret,
            "SESSIONFLOW_CODEC_KEYS": secrets.codec_keys,
            "SESSIONFLOW_CODEC_ADMIN_TOKEN": secrets.codec_admin_token,
            "SESSIONFLOW_CODEC_SUPPORT_TOKEN": secrets.codec_support_token,
            "SESSIONFLOW_PARTICIPANT_ID_KEY": secrets.participant_id_key,
            "SESSIONFLOW_CODEC_CORS_ORIGIN": f"http://{HOST}:{p.temporal_ui}",
            "LIVEAVATAR_API_URL": f"http://{HOST}:{p.emulator}",
            "LIVEAVATAR_API_KEY": LOCAL_LIVEAVATAR_API_KEY,
            "SESSIONFLOW_GATEWAY_HOST": HOST,
            "SESSIONFLOW_GATEWAY_PORT": str(p.gateway),
            # The worker of `python -m sandbox dev` serves its metrics here; a second worker needs a port of its own.
            "SESSIONFLOW_METRICS_PORT": str(p.worker_metrics),
            # Lets a nested `python -m sandbox status/exec` find (and reuse) this stack.
            "SESSIONFLOW_STATE_DIR": str(self.state_dir),
            **local_api_key_env(self.state_dir),
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
        return pid_alive(self._owner_pid, self._owner_start_time)

    # ---- the services

    def service_spec(self, name: str, *, resolve_binaries: bool = False) -> ServiceSpec:
        """How ``name`` is run. ``resolve_binaries`` finds the binaries (building LiveKit if needed); without
        it the command is only indicative, which is enough for probing."""
        p = self.ports
        python = sys.executable
        if name == "temporal":
            temporal = find_temporal_cli() if resolve_binaries else which_or_name("temporal")
            command = [
                str(temporal), "server", "start-dev",
                "--ip", HOST, "--port", str(p.temporal),
                "--ui-ip", HOST, "--ui-port", str(p.temporal_ui),
                # v2: AvatarSessionId became a KeywordList; an older database registered it as Keyword.
                # v3: support's attributes (SessionEndReason, ...): the dev server registers attributes only when it
                # creates its database, so one made before them would refuse their upserts.
                "--db-filename", str(self.state_dir / "temporal-v3.sqlite"),
                "--namespace", TEMPORAL_NAMESPACE, "--log-level", "warn",
                "--ui-disable-news-fetch",  # the UI would fetch a news feed from the internet
            ]
            for attribute, kind in SEARCH_ATTRIBUTE_TYPES.items():
                command += ["--search-attribute", f"{attribute}={kind}"]
            for key, value in TEMPORAL_DYNAMIC_CONFIG.items():
                command += ["--dynamic-config-value", f"{key}={value}"]
            for pragma, value in self.sqlite_pragmas.items():
                command += ["--sqlite-pragma", f"{pragma}={value}"]
            codec_endpoint = self.ui_codec_endpoint or (self.ui_codec_url() if "gateway" in self.services else None)
            if codec_endpoint:
                command += ["--ui-codec-endpoint", codec_endpoint]
            return ServiceSpec(
                name, tuple(command), temporal_probe(Path(temporal), f"{HOST}:{p.temporal}", TEMPORAL_NAMESPACE),
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
        """The LiveKit config to run with: a copy of ``sandbox/livekit.yaml`` in the state dir with this stack's
        generated key pair (instead of --dev's public ``devkey``/``secret``) and the ports (and the gateway's
        webhook URL) moved. It holds the secret, so it is written readable by its owner only."""
        defaults, p = StackPorts(), self.ports
        derived = self.state_dir / "livekit.yaml"
        if write:
            text = LIVEKIT_CONFIG.read_text()
            key = self.secrets.livekit_api_key
            for old, new in [
                (f"\nport: {defaults.livekit}\n", f"\nport: {p.livekit}\n"),
                (f"\n  udp_port: {defaults.livekit_rtc_udp}\n", f"\n  udp_port: {p.livekit_rtc_udp}\n"),
                (f"http://{HOST}:{defaults.gateway}/", f"http://{HOST}:{p.gateway}/"),
                (f"\n  api_key: {LIVEKIT_CONFIG_KEY_PLACEHOLDER}\n", f"\n  api_key: {key}\n"),
            ]:
                if text.count(old) != 1:
                    raise StackError(
                        f"cannot derive the LiveKit config: {LIVEKIT_CONFIG} no longer has exactly one "
                        f"{old.strip()!r}; update LocalStack.livekit_config to match the file"
                    )
                text = text.replace(old, new)
            text += f"keys:\n  {key}: \"{self.secrets.livekit_api_secret}\"\n"
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(derived, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"# Generated by sandbox/stack.py from {LIVEKIT_CONFIG} (keys and ports).\n{text}")
            derived.chmod(0o600)  # a copy written by an older version may be world-readable
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
            "env": {k: v for k, v in self.env.items() if k not in SECRET_ENV},
            "running": [s.to_state() for s in self._running],
        }
        tmp = self.state_file.with_suffix(".tmp")
        # Owner only: the Temporal UI's command line names its codec URL, which carries the support token.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(state, indent=2))
        os.replace(tmp, self.state_file)

    def _add_running(self, service: RunningService) -> None:
        """Record a service started again (chaos), keeping the start order so ``stop()`` still stops the
        services in reverse order."""
        order = {n: i for i, n in enumerate(SERVICE_NAMES)}
        self._running.append(service)
        self._running.sort(key=lambda s: order[s.name])
        self._write_state()

    def _remove_running(self, service: RunningService) -> None:
        self._running.remove(service)
        self._write_state()

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

