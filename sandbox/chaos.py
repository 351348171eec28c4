"""Chaos controls of a running stack: break one service and bring it back (tests/chaos).

:class:`ChaosControls` is mixed into :class:`sandbox.stack.LocalStack`, so a test holds one object for the stack
and its faults: ``stack.pause("livekit")``, ``stack.kill("temporal")``, ``stack.start_again("temporal")``.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.processes import (
    PortInUseError,
    RunningService,
    ServiceSpec,
    StackError,
    check_ports,
    kill_group,
    spawn_service,
    wait_until_ready,
)


class ChaosControls:
    """Kill, restart, pause and resume the services of a stack that this process started."""

    if TYPE_CHECKING:  # provided by LocalStack
        _running: list[RunningService]
        state_dir: Path

        def service_spec(self, name: str, *, resolve_binaries: bool = False) -> ServiceSpec: ...
        def subprocess_env(self) -> dict[str, str]: ...
        def _add_running(self, service: RunningService) -> None: ...
        def _remove_running(self, service: RunningService) -> None: ...

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
        kill_group(service.pid, signal.SIGCONT)  # a paused process must be able to act on a catchable signal
        kill_group(service.pid, sig)
        if not service.wait_exit(timeout):
            kill_group(service.pid, signal.SIGKILL)
            if not service.wait_exit(5.0):
                raise StackError(f"{name} (pid {service.pid}) did not exit after {sig!r} and SIGKILL")
        kill_group(service.pid, signal.SIGKILL)  # whatever the service spawned goes too
        self._remove_running(service)

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
        self._add_running(service)
        try:
            return wait_until_ready(service, spec)
        except BaseException:
            service.stop()
            self._remove_running(service)
            raise

    def restart(self, name: str) -> float:
        """Stop service ``name`` the way ``stop()`` would (its signal plan) and start it again."""
        service = self.service(name)
        kill_group(service.pid, signal.SIGCONT)
        service.stop()
        self._remove_running(service)
        return self.start_again(name)

    def pause(self, name: str) -> None:
        """Freeze service ``name`` (SIGSTOP to its group): its sockets stay open but nothing answers."""
        kill_group(self.service(name).pid, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        """Unfreeze service ``name`` (SIGCONT). Harmless if it is not paused."""
        kill_group(self.service(name).pid, signal.SIGCONT)
