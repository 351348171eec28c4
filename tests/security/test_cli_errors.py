"""Every mistake a person can make with `sessionflow` is one line `sessionflow: error: ...` on stderr and exit
code 2, never a traceback; a closed pipe ends it quietly; and it finds the stack by the same settings as the
worker (SESSIONFLOW_PORT_OFFSET included).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from config.settings import Settings, parse_api_keys
from sandbox.stack import StackPorts
from starters.client import SessionClient
from tests.support.http_api import spec, stack_temporal
from workers.worker import build_worker

CLI = [sys.executable, "-c", "from starters.cli import main; main()"]
# What `python -m sandbox exec` exports; without them the CLI must find the stack by the port offset alone.
STACK_ADDRESSES = ("TEMPORAL_ADDRESS", "TEMPORAL_UI_URL", "LIVEKIT_URL", "LIVEAVATAR_API_URL", "SESSIONFLOW_GATEWAY_PORT")


async def sessionflow(*args: str, env: dict[str, str] | None = None, stdout: int | None = None) -> tuple[int, str, str]:
    """Run the CLI in a subprocess (without blocking this loop, which may be running a worker)."""
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, env=env or dict(os.environ), stdout=stdout if stdout is not None else asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, (out or b"").decode(), err.decode()


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert err.startswith("sessionflow: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def no_temporal() -> dict[str, str]:
    return {**os.environ, "TEMPORAL_ADDRESS": "127.0.0.1:9"}  # nothing listens there


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "latin1.json").write_bytes(b'{"session_id": "caf\xe9"}')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x01")
    (tmp_path / "not-json.json").write_text("session_id: abc")
    (tmp_path / "a-list.json").write_text("[1, 2]")
    return {"dir": tmp_path} | {p.stem: p for p in tmp_path.iterdir()}


@pytest.mark.parametrize(
    ("spec_arg", "fragment"),
    [
        # Inline JSON far longer than a file name can be: never looked up as a file ("file name too long").
        (json.dumps(spec(metadata={f"k{i}": "v" * 1000 for i in range(5)})), "metadata is 5"),
        (json.dumps(spec(max_participants="3")), "max_participants: Input should be a valid integer"),
        (json.dumps(spec(max_duration=True)), "max_duration"),
        ('{"session_id": ', "SPEC must be a JSON file or JSON text"),
        ("{dir}", "is a directory"),
        ("{latin1}", "is not UTF-8 text"),
        ("{binary}", "is not UTF-8 text"),
        ("{not-json}", "SPEC must be a JSON file or JSON text"),
        ("{a-list}", "invalid SessionSpec"),
        ("no-such-file.json", "is neither JSON text nor an existing file"),
        ("x" * 5000, "File name too long"),  # not JSON, and a name too long for the file system
    ],
)
async def test_a_bad_spec_is_one_line_and_exit_2(bad_files: dict[str, Path], spec_arg: str, fragment: str) -> None:
    if spec_arg.startswith("{") and spec_arg.endswith("}") and spec_arg[1:-1] in bad_files:
        spec_arg = str(bad_files[spec_arg[1:-1]])
    # "x" * 5000 is not JSON and names no file; the valid-JSON specs here are invalid specs: refused before
    # Temporal is contacted (nothing listens at the address given).
    rc, out, err = await sessionflow("join", spec_arg, "cand", env=no_temporal())
    assert_one_line_error(rc, err, fragment)
    assert out == "" and "cannot reach Temporal" not in err


@pytest.mark.parametrize(
    "args",
    [("show", "abc-1"), ("list",), ("end", "abc-1"), ("extend", "abc-1", "60"), ("join", json.dumps(spec()), "cand")],
)
async def test_temporal_unreachable_is_one_line(args: tuple[str, ...]) -> None:
    rc, _, err = await sessionflow(*args, env=no_temporal())
    assert_one_line_error(rc, err, "cannot reach Temporal at 127.0.0.1:9")


@pytest.mark.parametrize(
    ("unset", "fragment"),
    [(("LIVEKIT_API_KEY",), "LIVEKIT_API_KEY: Field required"), (("SESSIONFLOW_CODEC_KEYS",), "no payload encryption key")],
)
async def test_missing_configuration_is_one_line(unset: tuple[str, ...], fragment: str) -> None:
    env = {k: v for k, v in no_temporal().items() if k not in unset}
    rc, _, err = await sessionflow("list", env=env)
    assert_one_line_error(rc, err, fragment)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("extend", "abc-1", "-5"), "invalid ExtendRequest"),
        (("end", "Not/An Id"), "is not valid"),
        (("show", "abc' OR 1=1"), "is not valid"),
        (("api-key", "--name", "has space"), "is not a key name"),
    ],
)
async def test_bad_arguments_are_one_line(args: tuple[str, ...], fragment: str) -> None:
    rc, _, err = await sessionflow(*args, env=no_temporal())
    assert rc == 2 and "Traceback" not in err and fragment in err, err


def test_api_key_prints_a_key_once_and_the_hash_to_configure() -> None:
    import hashlib
    import subprocess

    result = subprocess.run([*CLI, "api-key", "--name", "backend"], capture_output=True, text=True, timeout=60, check=True)
    key = result.stdout.split("shown only this once): ")[1].split()[0]
    entry = result.stdout.split("on the gateway: ")[1].split()[0]
    assert entry == f"backend:{hashlib.sha256(key.encode()).hexdigest()}"
    assert parse_api_keys(entry)[0].name == "backend"


# ---- against the stack ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def sessions(settings: Settings) -> AsyncIterator[SessionClient]:
    temporal = await stack_temporal(settings)
    task_queue = f"cli-{uuid.uuid4().hex[:10]}"
    async with build_worker(temporal, settings, task_queue=task_queue):
        yield SessionClient(temporal, settings, task_queue=task_queue)


@pytest.mark.stack
async def test_an_unknown_session_is_one_line(sessions: SessionClient) -> None:
    for args in (("show", "never-started-1"), ("end", "never-started-1"), ("extend", "never-started-1", "60")):
        rc, _, err = await sessionflow(*args)
        assert_one_line_error(rc, err, "no session 'never-started-1'")


@pytest.mark.stack
async def test_show_into_a_closed_pipe_exits_quietly(sessions: SessionClient) -> None:
    session = spec()
    await sessions.join(session, "cand")
    await sessions.end(session["session_id"], "for the pipe test")
    for args in (("show", session["session_id"]), ("list", "--limit", "5")):
        read_end, write_end = os.pipe()
        os.close(read_end)  # `| head -1` that has already exited: every write fails with EPIPE
        try:
            rc, _, err = await sessionflow(*args, stdout=write_end)
        finally:
            os.close(write_end)
        assert (rc, err) == (141, ""), err


@pytest.mark.stack
async def test_the_cli_finds_the_stack_by_the_port_offset(sessions: SessionClient, settings: Settings) -> None:
    session = spec()
    await sessions.join(session, "cand")
    try:
        env = {k: v for k, v in os.environ.items() if k not in STACK_ADDRESSES}
        env["SESSIONFLOW_PORT_OFFSET"] = os.environ.get("SESSIONFLOW_PORT_OFFSET", "0")
        offset = int(env["SESSIONFLOW_PORT_OFFSET"])
        assert settings.temporal_address == f"127.0.0.1:{StackPorts().shifted(offset).temporal}", "stack not on the offset ports"
        rc, out, err = await sessionflow("show", session["session_id"], env=env)
        assert rc == 0 and session["session_id"] in out, err
    finally:
        await sessions.end(session["session_id"], "test over")
