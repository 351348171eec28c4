"""``python -m sandbox``: run the local stack (see sandbox/stack.py).

    python -m sandbox up [--detach]        start; stay in the foreground until Ctrl-C / SIGTERM, then stop
    python -m sandbox down                 stop the stack started by `up` (detached or not)
    python -m sandbox status               what runs, and whether it answers
    python -m sandbox exec -- CMD ARGS...  run CMD against a stack (reused if one is up, else started and
                                           stopped around CMD); exits with CMD's exit code
    python -m sandbox env                  `export` lines for the stack's environment
    python -m sandbox livekit              build the LiveKit server if it is not cached yet
    python -m sandbox dev                  the stack and a worker in this process, until Ctrl-C stops both
    python -m sandbox demo                 one scripted avatar interview on the stack (`make demo`)
    python -m sandbox screenshots          the demo, then the Temporal UI screenshots of docs/support.md
    python -m sandbox cluster up|down|status|env|kill NAME|start NAME|exec -- CMD
                                           a multi-service Temporal cluster on PostgreSQL (sandbox/cluster.py)

Common options: --services temporal,livekit,emulator,gateway   --port-offset N (or SESSIONFLOW_PORT_OFFSET)
                --state-dir DIR (or SESSIONFLOW_STATE_DIR)      --timeout SECONDS
(`dev` and `demo` run every service on the ports given by SESSIONFLOW_PORT_OFFSET.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from sandbox.binaries import LIVEKIT_VERSION, ensure_livekit_server, livekit_server_path
from sandbox.processes import StackError
from sandbox.stack import SERVICE_NAMES, LocalStack, StackPorts, default_state_dir, stop_stack

if TYPE_CHECKING:
    from sandbox.cluster import ClusterPorts

console = Console(stderr=True, highlight=False, soft_wrap=True)


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, turned into an exception so every `finally` that stops services runs."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = int(args.handler(args))
    except StackError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", markup=True, highlight=False)  # logs quoted in it hold [..]
        code = 1
    if getattr(args, "runs_temporal_client", False):
        # The Temporal runtime can crash at interpreter exit in short-lived processes (sdk-python#300).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# ---- commands


def cmd_up(args: argparse.Namespace) -> int:
    stack = _stack_from(args)
    _raise_on_termination()
    try:
        stack._owner_stops_on_sigterm = not args.detach
        stack.start(detach=args.detach)
    except KeyboardInterrupt:
        console.print("Interrupted; the stack is stopped.")
        return 130
    except Interrupted:
        return 143
    _print_summary(stack)
    if args.detach:
        console.print("Running in the background. Stop it with: [bold]python -m sandbox down[/]")
        return 0
    console.print("Press Ctrl-C to stop.")
    code = 0
    try:
        while True:
            dead = [s for s in stack.running if not s.alive()]
            if dead:
                for service in dead:
                    console.print(f"[red]{service.name} exited unexpectedly (code {service.exit_code()}); "
                                  f"see {service.log_path}[/]")
                code = 1
                break
            time.sleep(0.5)
    except (KeyboardInterrupt, Interrupted):
        pass
    finally:
        console.print("Stopping the stack …")
        stack.stop()
        console.print("Stopped.")
    return code


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    if not stop_stack(state_dir, console=console):
        console.print(f"No stack is recorded in {state_dir}; nothing to stop.")
        return 0
    console.print("Stopped the stack.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    stack = LocalStack.attach(state_dir, console=console)
    if stack is None:
        console.print(f"No stack is recorded in {state_dir}. Start one with `python -m sandbox up`.")
        return 3
    owner = "detached" if stack.detached else f"owned by pid {stack.owner_pid}" + (
        "" if stack.owner_alive() else " (exited)")
    console.print(f"Stack in {state_dir} ({owner}):")
    healthy = True
    for name, (service, ready) in stack.status().items():
        healthy &= ready
        state = "[green]ready[/]" if ready else ("[yellow]running, not answering[/]" if service else "[red]down[/]")
        pid = f"pid {service.pid}" if service else ""
        url = stack.service_spec(name).url
        console.print(f"  {name:<9} {state:<30} {url:<26} {pid}")
    return 0 if healthy else 1


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise StackError("nothing to run: use `python -m sandbox exec -- CMD ARGS...`")
    wanted = _stack_from(args)
    existing = LocalStack.attach(wanted.state_dir, console=console)
    # Reuse a healthy stack that someone still owns; one left behind by a killed launcher is cleaned up
    # by start() instead.
    if (existing is not None and existing.ports == wanted.ports and (existing.detached or existing.owner_alive())
            and set(wanted.services) <= set(existing.services) and existing.healthy()):
        console.print(f"Reusing the running stack in {existing.state_dir}.")
        return _run(command, existing.subprocess_env())
    _raise_on_termination()
    try:
        wanted.start()
    except KeyboardInterrupt:
        return 130
    except Interrupted:
        return 143
    try:
        _print_summary(wanted)
        return _run(command, wanted.subprocess_env())
    finally:
        wanted.stop()


def cmd_env(args: argparse.Namespace) -> int:
    stack = LocalStack.attach(_state_dir(args), console=console) or _stack_from(args)
    for key, value in stack.env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def cmd_livekit(args: argparse.Namespace) -> int:
    path = livekit_server_path()
    if path.is_file() and os.access(path, os.X_OK):
        console.print(f"LiveKit server {LIVEKIT_VERSION}: reused the cached build {path}")
        return 0
    _raise_on_termination()  # a killed build must still stop `go` and remove its temporary directory
    try:
        ensure_livekit_server(console=console)  # prints how long the build took
    except (KeyboardInterrupt, Interrupted) as interruption:
        console.print("Build interrupted; nothing was installed.")
        return 143 if isinstance(interruption, Interrupted) else 130
    return 0


def cmd_dev(_: argparse.Namespace) -> int:
    """The stack and a worker in this process, in the foreground (the stack is stopped on the way out)."""
    return _run_with_temporal_client(_dev, long_running=True)


def cmd_screenshots(_: argparse.Namespace) -> int:
    from sandbox.screenshots import screenshots  # drives Chromium and the Temporal SDK: only for this command

    return _run_with_temporal_client(screenshots, long_running=False)


def cmd_demo(_: argparse.Namespace) -> int:
    from sandbox.demo import demo  # the demo imports livekit rtc and the Temporal SDK: only for this command

    return _run_with_temporal_client(demo, long_running=False)


async def _dev() -> int:
    from config.settings import get_settings
    from workers.worker import run_worker

    async with LocalStack() as stack:
        os.environ.update(stack.env)
        get_settings.cache_clear()
        for label, url in stack.urls.items():
            print(f"  {label:<20} {url}")
        print("stack and worker running; Ctrl-C stops both")
        await run_worker(get_settings())
    return 0


def _run_with_temporal_client(command: Callable[[], Coroutine[object, object, int]], *, long_running: bool) -> int:
    """Run ``command`` the way the `sessionflow` CLI runs its commands: logging configured from the settings
    (a one-shot command prints its result, not logs, unless SESSIONFLOW_LOG_LEVEL asks for them), and a
    person's mistake (Temporal unreachable) is a message and exit code 2, not a traceback."""
    from config.settings import get_settings
    from starters.client import SessionError
    from workers.logging import configure_logging
    from workers.temporal import TemporalUnavailable

    # `dev` and `demo` run on the local stack: its generated keys (made on first use) are what the settings need.
    os.environ.update(LocalStack(console=console).env)
    get_settings.cache_clear()
    settings = get_settings()
    level = settings.log_level if long_running or "SESSIONFLOW_LOG_LEVEL" in os.environ else "WARNING"
    configure_logging(settings.log_format, level)
    try:
        return asyncio.run(command())
    except (SessionError, TemporalUnavailable) as error:
        print(f"python -m sandbox: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def cmd_cluster(args: argparse.Namespace) -> int:
    """`python -m sandbox cluster ...`: the multi-service Temporal cluster (sandbox/cluster.py)."""
    from sandbox.cluster import CLUSTER_PROCESSES, StackOnCluster, TemporalCluster

    state_dir = _state_dir(args)
    cluster = TemporalCluster(ports=_cluster_ports(args), state_dir=state_dir / "cluster", console=console)
    action = args.action
    if action == "up":
        _raise_on_termination()
        cluster.up()
        timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in cluster.startup_seconds.items())
        console.print(f"[bold]Temporal cluster[/] at {cluster.address} (namespace {cluster.namespace}; state and logs "
                      f"in {cluster.state_dir})\n  [dim]ready: {timings}[/]\n"
                      "Point the engine at it: eval \"$(python -m sandbox cluster env)\"; stop it: "
                      "python -m sandbox cluster down")
        return 0
    if action == "down":
        stopped = cluster.down()
        if args.wipe or "--wipe" in args.rest:  # after the action, argparse leaves options in `rest`
            cluster.wipe()
        console.print("Stopped the cluster." if stopped else f"No cluster is recorded in {cluster.state_dir}.")
        return 0
    if action == "status":
        alive = cluster.status()
        for name in CLUSTER_PROCESSES:
            console.print(f"  {name:<9} {'[green]running[/]' if alive[name] else '[red]down[/]'}")
        serving = cluster.serving()
        console.print(f"  frontend {cluster.address}: namespace {cluster.namespace} "
                      + ("[green]serving[/]" if serving else "[red]not answering[/]"))
        return 0 if serving and all(alive.values()) else 1
    if action == "env":
        for key, value in cluster.env.items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if action in ("kill", "start"):
        if not args.rest:
            raise StackError(f"name the process: python -m sandbox cluster {action} {'|'.join(CLUSTER_PROCESSES)}")
        name = args.rest[0]
        if action == "kill":
            cluster.kill(name)
            console.print(f"killed {name} (SIGKILL)")
        else:
            console.print(f"started {name}: ready in {cluster.start(name):.1f} s")
        return 0
    # exec: the rest of the local stack, pointed at the cluster, around CMD
    command = args.rest[1:] if args.rest[:1] == ["--"] else list(args.rest)
    if not command:
        raise StackError("nothing to run: use `python -m sandbox cluster exec -- CMD ARGS...`")
    if not cluster.serving():
        raise StackError(f"no Temporal cluster answers at {cluster.address}: start it with `make cluster`")
    stack = StackOnCluster(cluster, ports=StackPorts().shifted(_port_offset(args)), state_dir=state_dir / "on-cluster",
                           console=console)
    _raise_on_termination()
    try:
        stack.start()
    except KeyboardInterrupt:
        return 130
    except Interrupted:
        return 143
    try:
        _print_summary(stack)
        return _run(command, stack.subprocess_env())
    finally:
        stack.stop()


def _port_offset(args: argparse.Namespace) -> int:
    return int(args.port_offset if args.port_offset is not None else os.environ.get("SESSIONFLOW_PORT_OFFSET", "0"))


def _cluster_ports(args: argparse.Namespace) -> ClusterPorts:
    from sandbox.cluster import ClusterPorts

    return ClusterPorts(_port_offset(args))


# ---- helpers


def _run(command: list[str], env: dict[str, str]) -> int:
    """Run CMD in our process group (so a terminal Ctrl-C reaches it directly) and return its exit code."""
    try:
        proc = subprocess.Popen(command, env=env)
    except OSError as error:
        console.print(f"[red]cannot run {shlex.join(command)}: {error}[/]")
        return 127

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    # Ctrl-C goes to the whole foreground group, CMD included: we just wait for CMD to finish. A handler
    # (not SIG_IGN, which CMD would inherit) keeps us alive meanwhile.
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None),
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGHUP: signal.signal(signal.SIGHUP, forward),
    }
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def _raise_on_termination() -> None:
    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)
    # A shell without job control starts background commands with SIGINT ignored; Ctrl-C must stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _print_summary(stack: LocalStack) -> None:
    width = max(len(label) for label in stack.urls)
    console.print(f"[bold]sessionflow local stack[/] (state and logs in {stack.state_dir})")
    for label, url in stack.urls.items():
        console.print(f"  {label:<{width}}  {url}")
    timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stack.startup_seconds.items())
    if timings:
        console.print(f"  [dim]ready: {timings}[/]")


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir).resolve() if args.state_dir else default_state_dir()


def _stack_from(args: argparse.Namespace) -> LocalStack:
    services = [s.strip() for s in args.services.split(",") if s.strip()]
    return LocalStack(
        services=services, ports=StackPorts().shifted(args.port_offset), state_dir=_state_dir(args),
        ready_timeout=args.timeout, ui_codec_endpoint=args.ui_codec_endpoint, console=console,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description="The sessionflow local stack.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, stack_options: bool = True) -> argparse.ArgumentParser:
        p.add_argument("--state-dir", help="state and log directory (default $SESSIONFLOW_STATE_DIR or "
                                           "<repo>/.sessionflow)")
        if stack_options:
            p.add_argument("--services", default=",".join(SERVICE_NAMES),
                           help=f"comma-separated subset of {','.join(SERVICE_NAMES)} (default: all)")
            p.add_argument("--port-offset", type=int, default=int(os.environ.get("SESSIONFLOW_PORT_OFFSET", "0")),
                           help="add N to every port (default $SESSIONFLOW_PORT_OFFSET or 0)")
            p.add_argument("--timeout", type=float, default=60.0, help="readiness timeout per service, seconds")
            p.add_argument("--ui-codec-endpoint", default=None, help="codec server URL for the Temporal UI")
        return p

    up = common(sub.add_parser("up", help="start the stack"))
    up.add_argument("--detach", action="store_true", help="start, then leave it running in the background")
    up.set_defaults(handler=cmd_up)
    common(sub.add_parser("down", help="stop the stack"), stack_options=False).set_defaults(handler=cmd_down)
    common(sub.add_parser("status", help="show the stack"), stack_options=False).set_defaults(handler=cmd_status)
    run = common(sub.add_parser("exec", help="run a command against the stack"))
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    run.set_defaults(handler=cmd_exec)
    common(sub.add_parser("env", help="print export lines")).set_defaults(handler=cmd_env)
    sub.add_parser("livekit", help="ensure the LiveKit server binary").set_defaults(handler=cmd_livekit)
    sub.add_parser("dev", help="the stack and a worker in the foreground").set_defaults(
        handler=cmd_dev, runs_temporal_client=True)
    sub.add_parser("demo", help="one scripted avatar interview on the local stack").set_defaults(
        handler=cmd_demo, runs_temporal_client=True)
    sub.add_parser("screenshots", help="the demo, then screenshots of the Temporal UI into docs/screenshots").set_defaults(
        handler=cmd_screenshots, runs_temporal_client=True)
    cluster = common(sub.add_parser("cluster", help="a multi-service Temporal cluster on PostgreSQL"),
                     stack_options=False)
    cluster.add_argument("action", choices=["up", "down", "status", "env", "kill", "start", "exec"])
    cluster.add_argument("--port-offset", type=int, default=None,
                         help="add N to every port (default $SESSIONFLOW_PORT_OFFSET or 0)")
    cluster.add_argument("--wipe", action="store_true", help="with down: also remove the cluster's database")
    cluster.add_argument("rest", nargs=argparse.REMAINDER, help="kill/start: NAME; exec: -- CMD ARGS...")
    cluster.set_defaults(handler=cmd_cluster)
    return parser


if __name__ == "__main__":
    sys.exit(main())
