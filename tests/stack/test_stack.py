"""The stack launcher itself, with real processes.

Every test runs on ports of its own and in a temporary state dir, so a stack already running on the default
ports (the one `make test` runs these tests against) is never touched.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sandbox.binaries import LiveKitBuildError, ensure_livekit_server, find_temporal_cli, livekit_server_path
from sandbox.processes import HOST, ServiceSpec, ServiceStartError, http_probe, pid_alive, port_is_free, start_service
from sandbox.stack import LIVEKIT_CONFIG, SEARCH_ATTRIBUTES, LocalStack, StackPorts
from workflows.search_attributes import SEARCH_ATTRIBUTE_TYPES

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_offset() -> int:
    """An offset that puts every stack port on a free port (TCP and UDP)."""
    for offset in range(31_000, 50_000, 113):
        ports = StackPorts().shifted(offset)
        if all(port_is_free(p) and port_is_free(p, socket.SOCK_DGRAM) for p in vars(ports).values()):
            return offset
    pytest.fail("no free block of ports for a test stack")


def cached_livekit_server() -> Path:
    path = livekit_server_path()
    if not path.is_file():
        pytest.fail(f"the LiveKit server is not built yet ({path}); run `make livekit`", pytrace=False)
    return path


def sandbox_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbox", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


# ---- the LiveKit binary


def test_ensure_livekit_server_reuses_the_cached_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cached = cached_livekit_server()
    mtime = cached.stat().st_mtime_ns
    monkeypatch.setenv("PATH", str(tmp_path))  # no `go`: any build attempt would fail

    assert ensure_livekit_server() == cached
    assert cached.stat().st_mtime_ns == mtime


def test_without_go_the_error_names_the_build_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    with pytest.raises(LiveKitBuildError) as error:
        ensure_livekit_server(tmp_path / "cache")

    message = str(error.value)
    assert "go install github.com/livekit/livekit-server/cmd/server@v1.13.5" in message
    assert "Go >= 1.26" in message
    assert not (tmp_path / "cache" / "livekit-v1.13.5" / "server").exists()


# ---- starting a service: the errors a person reads


def test_a_missing_entry_point_fails_at_once_and_clearly(tmp_path: Path) -> None:
    port = StackPorts().shifted(free_offset()).gateway
    spec = ServiceSpec(
        "ghost", (sys.executable, "-m", "sandbox.no_such_service", "--port", str(port)),
        http_probe(f"http://{HOST}:{port}/healthz"), module="sandbox.no_such_service", ready_timeout=30,
    )

    started = time.monotonic()
    with pytest.raises(ServiceStartError) as error:
        start_service(spec, log_dir=tmp_path)

    assert time.monotonic() - started < 10  # no waiting for the readiness timeout
    assert error.value.service == "ghost"
    assert "sandbox.no_such_service" in str(error.value)


def test_a_service_that_exits_reports_its_exit_code_and_log(tmp_path: Path) -> None:
    spec = ServiceSpec(
        "crasher", (sys.executable, "-c", "import sys; print('bad config: port missing'); sys.exit(3)"),
        lambda: False, ready_timeout=30,
    )

    with pytest.raises(ServiceStartError) as error:
        start_service(spec, log_dir=tmp_path)

    message = str(error.value)
    assert "crasher did not start: it exited with code 3" in message
    assert "bad config: port missing" in message
    assert str(tmp_path / "crasher.log") in message


def test_a_readiness_timeout_names_the_command_and_stops_the_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('warming up'); time.sleep(60)"
    spec = ServiceSpec("sleeper", (sys.executable, "-c", code), lambda: False, ready_timeout=1.0)

    with pytest.raises(ServiceStartError) as error:
        start_service(spec, log_dir=tmp_path)

    assert "sleeper did not start: not ready after 1 s" in str(error.value)
    assert "time.sleep(60)" in str(error.value)  # the command
    assert "warming up" in str(error.value)  # the log tail
    assert not pid_alive(int(pid_file.read_text()))


# ---- LiveKit: loopback only


def test_the_livekit_config_keeps_everything_on_loopback() -> None:
    text = LIVEKIT_CONFIG.read_text()
    assert re.search(r"^room:\n(?:  .*\n)*?  auto_create: false$", text, re.M), "room.auto_create must be false"
    stun = re.search(r"^  stun_servers:\n((?:    - .*\n)+)", text, re.M)
    assert stun, "an explicit loopback stun_servers entry keeps LiveKit from adding public STUN servers"
    assert all(line.strip("- \n").startswith("127.") for line in stun.group(1).splitlines())
    assert "turn:" not in text
    for url in re.findall(r"https?://[^\s/]+", text):
        assert url.split("//")[1].startswith("127."), f"{url} is not on loopback"

    command = LocalStack(services=["livekit"]).service_spec("livekit").command
    assert " --bind 127.0.0.1 --node-ip 127.0.0.1 " in " ".join(command) + " "


def test_livekit_runs_on_other_ports_and_stops_cleanly(tmp_path: Path) -> None:
    cached_livekit_server()
    ports = StackPorts().shifted(free_offset())
    stack = LocalStack(services=["livekit"], ports=ports, state_dir=tmp_path)

    with stack:
        [livekit] = stack.running
        response = httpx.get(f"http://{HOST}:{ports.livekit}/", trust_env=False)
        config = (tmp_path / "livekit.yaml").read_text()
        listening = listening_addresses(livekit.pid)

    assert (response.status_code, response.text.strip()) == (200, "OK")
    assert stack.env["LIVEKIT_URL"] == f"ws://127.0.0.1:{ports.livekit}"
    assert f"http://127.0.0.1:{ports.gateway}/livekit/webhook" in config
    assert f"127.0.0.1:{ports.livekit}" in listening
    assert not pid_alive(livekit.pid, livekit.start_time)
    assert not stack.state_file.exists()


# ---- Temporal


def test_temporal_registers_the_search_attributes(tmp_path: Path) -> None:
    ports = StackPorts().shifted(free_offset())

    with LocalStack(services=["temporal"], ports=ports, state_dir=tmp_path) as stack:
        listed = subprocess.run(
            [str(find_temporal_cli()), "operator", "search-attribute", "list", "--address",
             stack.env["TEMPORAL_ADDRESS"], "--disable-config-file"],
            capture_output=True, text=True, timeout=30, env={"PATH": os.environ.get("PATH", "")},
        )

    for name in SEARCH_ATTRIBUTES:
        assert re.search(rf"^\s*{name}\s+{SEARCH_ATTRIBUTE_TYPES[name]}\s*$", listed.stdout, re.M), listed.stdout


# ---- the CLI


def test_up_detach_status_down(tmp_path: Path) -> None:
    cached_livekit_server()
    common = ["--state-dir", str(tmp_path)]
    up = sandbox_cli("up", "--detach", "--services", "livekit", "--port-offset", str(free_offset()), *common)
    assert up.returncode == 0, up.stderr
    pids = [int(p) for p in re.findall(r'"pid": (\d+)', (tmp_path / "stack.json").read_text())]

    status = sandbox_cli("status", *common)
    down = sandbox_cli("down", *common)

    assert status.returncode == 0 and "livekit" in status.stderr and "ready" in status.stderr, status.stderr
    assert down.returncode == 0, down.stderr
    assert pids and not any(pid_alive(pid) for pid in pids)
    assert sandbox_cli("status", *common).returncode == 3  # nothing recorded any more


def test_exec_exports_the_env_and_returns_the_command_exit_code(tmp_path: Path) -> None:
    cached_livekit_server()
    offset = free_offset()
    expected = f"ws://127.0.0.1:{StackPorts().shifted(offset).livekit}"
    check = f"import os, sys; sys.exit(7 if os.environ['LIVEKIT_URL'] == {expected!r} else 1)"

    result = sandbox_cli("exec", "--services", "livekit", "--port-offset", str(offset), "--state-dir",
                         str(tmp_path), "--", sys.executable, "-c", check)

    assert result.returncode == 7, result.stderr
    assert not (tmp_path / "stack.json").exists()


# ---- helpers


def listening_addresses(pid: int) -> set[str]:
    """"ip:port" of every TCP/UDP socket ``pid`` has bound (from /proc: no ss/lsof needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "udp", "tcp6", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] not in inodes:
                continue
            address, port = fields[1].split(":")
            if len(address) == 8:
                ip = socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
            else:
                words = [bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8)]
                ip = f"[{socket.inet_ntop(socket.AF_INET6, b''.join(words))}]"
            found.add(f"{ip}:{int(port, 16)}")
    return found


def test_livekit_binds_nothing_but_loopback(tmp_path: Path) -> None:
    cached_livekit_server()
    with LocalStack(services=["livekit"], ports=StackPorts().shifted(free_offset()), state_dir=tmp_path) as stack:
        listening = listening_addresses(stack.running[0].pid)

    assert listening
    assert all(address.startswith(("127.", "[::1]")) for address in listening), sorted(listening)
