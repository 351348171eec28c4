"""A real multi-service Temporal cluster on loopback (`make cluster`, `python -m sandbox cluster up|down|status`).

The local stack runs Temporal's dev server: every service in one process on SQLite. A deployment that outgrows one
machine runs a cluster, where frontend, history, matching and worker are separate processes on a shared database
and fail one at a time. This runs one here: the Temporal server v1.29.1 (built once with ``go install``, cached
like the LiveKit server), PostgreSQL 15 from the OS packages in a private data directory, and five Temporal
processes: a frontend, two history hosts, matching and worker, each with its own config and ports on 127.0.0.1.
The engine runs against it by setting TEMPORAL_ADDRESS (``python -m sandbox cluster env`` prints it;
``python -m sandbox cluster exec -- CMD`` runs CMD with the rest of the local stack pointed at the cluster).

The facts it is built on (start order, schema, dynamic config, pitfalls) are in reference/temporal-cluster.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from sandbox.binaries import ensure_temporal_server, find_temporal_cli, temporal_server_dir
from sandbox.processes import (
    HOST,
    RunningService,
    ServiceSpec,
    StackError,
    kill_group,
    spawn_service,
    wait_until_ready,
)
from sandbox.stack import TEMPORAL_NAMESPACE, LocalStack, StackPorts, default_state_dir
from workflows.search_attributes import SEARCH_ATTRIBUTE_TYPES

POSTGRES_BIN = Path(os.environ.get("SESSIONFLOW_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
#: The Temporal processes, in start order: the frontend alone first (started together on a fresh database, the
#: services race to insert the cluster metadata row and the losers exit), then the rest.
TEMPORAL_PROCESSES = ("frontend", "history", "history2", "matching", "worker")
#: Every process of the cluster, in start order (stopped in the reverse order).
CLUSTER_PROCESSES = ("postgres", *TEMPORAL_PROCESSES)
NUM_HISTORY_SHARDS = 4
STATE_FILE = "cluster.json"
DYNAMIC_CONFIG: dict[str, object] = {
    "frontend.enableUpdateWorkflowExecution": True,
    "frontend.enableUpdateWorkflowExecutionAsyncAccepted": True,
    "frontend.enableExecuteMultiOperation": True,  # update-with-start: every `join`
    "frontend.enableServerVersionCheck": False,  # no phoning home: the cluster stays on loopback
    # The dev server turns this on; a cluster has it off. Without it every activity the join waits for (the room
    # create) goes through matching: +22 ms schedule-to-start per join at concurrency 1 here (docs/benchmarks.md).
    "system.enableActivityEagerExecution": True,
}
# PostgreSQL stops fast on SIGINT (rolls back, checkpoints); Temporal's services drain for a moment on SIGTERM.
_STOP_PLANS: dict[str, tuple[tuple[int, float], ...]] = {
    "postgres": ((signal.SIGINT, 15.0),),
    **dict.fromkeys(TEMPORAL_PROCESSES, ((signal.SIGTERM, 8.0),)),
}


class ClusterError(StackError):
    """The cluster cannot be started, reached or stopped; the message says why and what to do."""


@dataclass(frozen=True)
class ClusterPorts:
    """Every port of the cluster on 127.0.0.1; ``offset`` (SESSIONFLOW_PORT_OFFSET) shifts them all, so engineers
    sharing a machine each get their own, and none collides with the local stack's."""

    offset: int = 0

    @property
    def postgres(self) -> int:
        return 15432 + self.offset

    @property
    def frontend_http(self) -> int:
        return 17243 + self.offset

    def grpc(self, process: str) -> int:
        return 17233 + TEMPORAL_PROCESSES.index(process) + self.offset

    def membership(self, process: str) -> int:
        return 16933 + TEMPORAL_PROCESSES.index(process) + self.offset

    @property
    def frontend(self) -> int:
        return self.grpc("frontend")


@dataclass
class TemporalCluster:
    """The cluster's processes, started and stopped from its state directory (``<state>/cluster``).

    ``up`` leaves the processes running in the background and records them in ``cluster.json``, so ``down``,
    ``status``, ``kill`` and ``start`` work from any later process.
    """

    ports: ClusterPorts = field(default_factory=ClusterPorts)
    state_dir: Path = field(default_factory=lambda: default_state_dir() / "cluster")
    namespace: str = TEMPORAL_NAMESPACE
    console: Console = field(default_factory=lambda: Console(stderr=True, highlight=False, soft_wrap=True))
    bin_dir: Path = field(default_factory=temporal_server_dir)  # `server`, `sql` and the schema (ensure_temporal_server)
    startup_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.ports.frontend}"

    @property
    def env(self) -> dict[str, str]:
        """What points the engine (workers, starters, tests, bench) at this cluster."""
        return {"TEMPORAL_ADDRESS": self.address, "TEMPORAL_NAMESPACE": self.namespace}

    # ---- up, down, status

    def up(self) -> TemporalCluster:
        """Build the server if needed, create the database on first use, start every process in order and
        register the namespace and the search attributes. Everything started is stopped again on a failure.
        On a recorded cluster, starts again only the processes that have died."""
        recorded = self.recorded()
        if recorded:
            return self._repair(recorded)
        started = time.monotonic()
        self.bin_dir = ensure_temporal_server(console=self.console)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        running: list[RunningService] = []
        try:
            fresh = not (self._pgdata / "PG_VERSION").is_file()
            if fresh:
                self._initdb()
            running.append(self._start("postgres"))
            if fresh:
                self._create_schemas()
            for name in TEMPORAL_PROCESSES:
                running.append(self._start(name))
                self._record(running)
            self._wait_serving(started)
            self._register_namespace()
        except BaseException:
            for service in reversed(running):
                service.stop()
            self._state_file.unlink(missing_ok=True)
            raise
        self.startup_seconds["total"] = time.monotonic() - started
        return self

    def _repair(self, recorded: dict[str, RunningService]) -> TemporalCluster:
        """A recorded cluster: start again whatever of it has died (a killed process, a crashed host)."""
        dead = [name for name in CLUSTER_PROCESSES if name not in recorded or not recorded[name].alive()]
        if not dead:
            raise ClusterError(f"the cluster in {self.state_dir} is already running: `python -m sandbox cluster "
                               "status` shows it, `python -m sandbox cluster down` stops it")
        started = time.monotonic()
        for name in dead:
            self.start(name)
        self._wait_serving(started)
        self.startup_seconds["total"] = time.monotonic() - started
        return self

    def down(self) -> bool:
        """Stop every recorded process (reverse start order); False if none was recorded. The database stays, so
        the next ``up`` starts in seconds with the namespace already there (`down --wipe` removes it)."""
        services = self.recorded()
        if not services:
            return False
        for name in reversed(CLUSTER_PROCESSES):
            if name in services:
                services[name].stop()
        self._state_file.unlink(missing_ok=True)
        return True

    def wipe(self) -> None:
        """Remove the cluster's database and configs (only when it is down)."""
        if self.recorded():
            raise ClusterError("the cluster is running: `python -m sandbox cluster down` first")
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def status(self) -> dict[str, bool]:
        """Process name -> alive, for every process of the cluster (False when not recorded)."""
        services = self.recorded()
        return {name: name in services and services[name].alive() for name in CLUSTER_PROCESSES}

    def serving(self) -> bool:
        """The frontend answers for the namespace."""
        return _run_ok([*self._cli(), "operator", "namespace", "describe", "--namespace", self.namespace])

    # ---- faults: kill -9 one process, start it again

    def kill(self, name: str) -> None:
        """SIGKILL process ``name`` (its whole group): no drain, no goodbye, as when a host dies."""
        if name not in CLUSTER_PROCESSES:
            raise ClusterError(f"no process {name!r} in the cluster; its processes are {', '.join(CLUSTER_PROCESSES)}")
        services = self.recorded()
        if name not in services or not services[name].alive():
            running = [n for n in CLUSTER_PROCESSES if n in services and services[n].alive()]
            raise ClusterError(f"{name} is not running in the cluster (running: {', '.join(running) or 'nothing'})")
        service = services[name]
        kill_group(service.pid, signal.SIGKILL)
        if not service.wait_exit(10.0):
            raise ClusterError(f"{name} (pid {service.pid}) did not exit after SIGKILL")

    def start(self, name: str) -> float:
        """Start process ``name`` again with its config; the seconds until it answered."""
        services = self.recorded()
        if name in services and services[name].alive():
            raise ClusterError(f"{name} is already running (pid {services[name].pid})")
        self.bin_dir = ensure_temporal_server(console=self.console)
        service = self._start(name)
        services[name] = service
        self._record(list(services.values()))
        return self.startup_seconds[name]

    # ---- processes

    def _start(self, name: str) -> RunningService:
        spec = self._spec(name)
        service = spawn_service(spec, env=_clean_env(), log_dir=self.state_dir / "logs")
        try:
            self.startup_seconds[name] = wait_until_ready(service, spec)
        except BaseException:
            service.stop()
            raise
        return service

    def _spec(self, name: str) -> ServiceSpec:
        if name == "postgres":
            port = self.ports.postgres
            command = [*_as_postgres(), str(POSTGRES_BIN / "postgres"), "-D", str(self._pgdata), "-h", HOST,
                       "-p", str(port), "-c", "unix_socket_directories=", "-c", "max_connections=200"]
            probe = _tcp_probe(port)
            return ServiceSpec("postgres", tuple(command), probe, url=f"{HOST}:{port}", tcp_ports=(port,),
                               ready_timeout=30, stop_plan=_STOP_PLANS["postgres"])
        if name not in TEMPORAL_PROCESSES:
            raise ClusterError(f"no process {name!r} in the cluster; its processes are {', '.join(CLUSTER_PROCESSES)}")
        service = "history" if name.startswith("history") else name
        # --config is relative to --root; --env NAME reads NAME.yaml there.
        command = [str(self.bin_dir / "server"), "--root", str(self.state_dir), "--config", self._config_dir.name,
                   "--env", name, "--allow-no-auth", "start", "--service", service]
        # Ready once it listens: frontend, history and matching on gRPC, the worker service (which serves no gRPC) on
        # its membership port. A listening frontend has written the cluster metadata, so the rest may start; it only
        # says SERVING once it reaches matching (it waits for it up to about 45 s), see `_wait_serving`.
        probe = _tcp_probe(self.ports.membership(name) if name == "worker" else self.ports.grpc(name))
        ports: tuple[int, ...] = (self.ports.grpc(name), self.ports.membership(name))
        if name == "frontend":
            ports += (self.ports.frontend_http,)
        return ServiceSpec(name, tuple(command), probe, url=f"{HOST}:{self.ports.grpc(name)}", tcp_ports=ports,
                           ready_timeout=60, stop_plan=_STOP_PLANS[name])

    def _wait_serving(self, since: float, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._frontend_serving():
            if time.monotonic() > deadline:
                raise ClusterError(f"the frontend at {self.address} did not say SERVING within {timeout:.0f} s: see "
                                   f"{self.state_dir / 'logs'}")
            time.sleep(0.2)
        self.startup_seconds["serving"] = time.monotonic() - since

    def _frontend_serving(self) -> bool:
        try:
            out = subprocess.run([*self._cli(), "operator", "cluster", "health"], env=_clean_env(),
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0 and "SERVING" in out.stdout

    def _cli(self) -> list[str]:
        return [str(find_temporal_cli()), "--address", self.address, "--disable-config-file", "--command-timeout", "3s"]

    # ---- database

    @property
    def _pgdata(self) -> Path:
        return self.state_dir / "pgdata"

    def _initdb(self) -> None:
        """A private PostgreSQL data directory, trust auth on loopback (nothing but this machine can connect)."""
        if not (POSTGRES_BIN / "initdb").is_file():
            raise ClusterError(
                f"PostgreSQL 15 is not installed ({POSTGRES_BIN}/initdb is missing): install it with "
                "`apt-get install postgresql-15` (or set SESSIONFLOW_POSTGRES_BIN to its bin directory)"
            )
        self._pgdata.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # initdb refuses root: the data directory belongs to the postgres user
            shutil.chown(self._pgdata, "postgres", "postgres")
        self._pgdata.chmod(0o700)
        _check([*_as_postgres(), str(POSTGRES_BIN / "initdb"), "-D", str(self._pgdata), "--auth=trust",
                "--username=postgres", "--encoding=UTF8", "--no-locale"], "initdb", self.state_dir)

    def _create_schemas(self) -> None:
        schema = self.bin_dir / "schema" / "postgresql" / "v12"
        for database, module in (("temporal", "temporal"), ("temporal_visibility", "visibility")):
            sql = [str(self.bin_dir / "sql"), "--plugin", "postgres12", "--ep", HOST, "--port", str(self.ports.postgres),
                   "--user", "postgres", "--db", database]
            _check([*sql, "create-database"], f"create database {database}", self.state_dir)
            _check([*sql, "setup-schema", "-v", "0.0"], f"setup-schema {database}", self.state_dir)
            _check([*sql, "update-schema", "-d", str(schema / module / "versioned")], f"update-schema {database}",
                   self.state_dir)

    def _register_namespace(self) -> None:
        """Our namespace and the engine's search attributes. Just after the namespace is created the frontend's
        namespace cache may not know it yet ("Namespace default is not found"): that is retried for a while."""
        cli = self._cli()
        if not self.serving():
            _check([*cli, "operator", "namespace", "create", "--namespace", self.namespace, "--retention", "24h"],
                   "namespace create", self.state_dir)
        flags = [arg for name, kind in SEARCH_ATTRIBUTE_TYPES.items() for arg in ("--name", name, "--type", kind)]
        command = [*cli, "operator", "search-attribute", "create", "--namespace", self.namespace, *flags]
        deadline = time.monotonic() + 30
        while True:
            out = subprocess.run(command, env=_clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=30)
            if out.returncode == 0 or "already exists" in out.stderr:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"registering the search attributes failed: {out.stderr.strip()[-500:]}")
            time.sleep(0.5)  # the namespace cache refreshes within seconds

    # ---- config files

    @property
    def _config_dir(self) -> Path:
        return self.state_dir / "config"

    def _write_configs(self) -> None:
        """One config per process (`--env NAME` reads NAME.yaml): the same cluster, each with its own ports."""
        self._config_dir.mkdir(parents=True, exist_ok=True)
        dynamic = self._config_dir / "dynamicconfig.yaml"
        dynamic.write_text("".join(f"{key}:\n  - value: {json.dumps(value)}\n" for key, value in DYNAMIC_CONFIG.items()))
        for name in TEMPORAL_PROCESSES:
            (self._config_dir / f"{name}.yaml").write_text(json.dumps(self._config(name, dynamic), indent=2))

    def _config(self, process: str, dynamic: Path) -> dict[str, object]:
        """The server's config for ``process`` (YAML is a superset of JSON, so it is written as JSON)."""
        def store(database: str, conns: int) -> dict[str, object]:
            return {"sql": {
                "pluginName": "postgres12", "databaseName": database, "connectAddr": f"{HOST}:{self.ports.postgres}",
                "connectProtocol": "tcp", "user": "postgres", "password": "",
                "maxConns": conns, "maxIdleConns": conns, "maxConnLifetime": "1h",
            }}

        def rpc(name: str) -> dict[str, object]:
            ports: dict[str, object] = {"grpcPort": self.ports.grpc(name), "membershipPort": self.ports.membership(name),
                                        "bindOnIP": HOST}
            if name == "frontend":
                ports["httpPort"] = self.ports.frontend_http
            return {"rpc": ports}

        history = "history2" if process == "history2" else "history"
        return {
            "log": {"stdout": True, "level": "warn"},
            "persistence": {
                "defaultStore": "default", "visibilityStore": "visibility", "numHistoryShards": NUM_HISTORY_SHARDS,
                "datastores": {"default": store("temporal", 20), "visibility": store("temporal_visibility", 5)},
            },
            "global": {"membership": {"maxJoinDuration": "30s", "broadcastAddress": HOST}},
            "services": {
                "frontend": rpc("frontend"), "history": rpc(history), "matching": rpc("matching"), "worker": rpc("worker"),
            },
            "clusterMetadata": {
                "enableGlobalNamespace": False, "failoverVersionIncrement": 10,
                "masterClusterName": "active", "currentClusterName": "active",
                "clusterInformation": {"active": {
                    "enabled": True, "initialFailoverVersion": 1, "rpcName": "frontend", "rpcAddress": self.address,
                    "httpAddress": f"{HOST}:{self.ports.frontend_http}",
                }},
            },
            "dcRedirectionPolicy": {"policy": "noop"},
            "archival": {"history": {"state": "disabled"}, "visibility": {"state": "disabled"}},
            "namespaceDefaults": {"archival": {"history": {"state": "disabled"}, "visibility": {"state": "disabled"}}},
            "publicClient": {"hostPort": self.address},
            "dynamicConfigClient": {"filepath": str(dynamic), "pollInterval": "10s"},
        }

    # ---- the state file

    @property
    def _state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def _record(self, running: list[RunningService]) -> None:
        data = {"ports_offset": self.ports.offset, "services": [s.to_state() for s in running]}
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self._state_file)

    def recorded(self) -> dict[str, RunningService]:
        """The processes ``up`` recorded (alive or not), by name; empty when no cluster is recorded."""
        try:
            data = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return {}
        return {s["name"]: RunningService.from_state(s) for s in data["services"]}


class StackOnCluster(LocalStack):
    """The local stack without its dev server (LiveKit, the emulator, the gateway), with every process it starts
    and every variable it exports pointing at the cluster instead."""

    def __init__(self, cluster: TemporalCluster, *, ports: StackPorts, state_dir: Path, console: Console) -> None:
        super().__init__(services=["livekit", "emulator", "gateway"], ports=ports, state_dir=state_dir, console=console)
        self.cluster = cluster

    @property
    def env(self) -> dict[str, str]:
        # The cluster has no UI of its own (the dev server bundles one): links name the frontend instead.
        return {**super().env, **self.cluster.env, "TEMPORAL_UI_URL": f"http://{self.cluster.address}"}


# ---- helpers


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _clean_env() -> dict[str, str]:
    """Our environment without TEMPORAL_* (a Temporal Cloud key or address in the shell must not leak in)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}


def _tcp_probe(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return True
        except OSError:
            return False

    return probe


def _run_ok(command: list[str]) -> bool:
    try:
        return subprocess.run(command, env=_clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _check(command: list[str], what: str, state_dir: Path) -> None:
    """Run a setup step; on failure a `ClusterError` with its output (kept in the state dir's logs too)."""
    out = subprocess.run(command, env=_clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=120, cwd=state_dir)
    log = state_dir / "logs" / "setup.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(command)}\n{out.stdout}{out.stderr}\n")
    if out.returncode != 0:
        raise ClusterError(f"{what} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-800:]}\n"
                           f"  command: {' '.join(command)}\n  log: {log}")
