"""The CLI answers a person's mistakes with a message and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys


def sessionflow(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TEMPORAL_ADDRESS": "127.0.0.1:9"}  # nothing listens there
    return subprocess.run(
        [sys.executable, "-c", "from starters.cli import main; main()", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )


def test_no_temporal_server_is_a_clear_error() -> None:
    result = sessionflow("show", "abc-1")
    assert result.returncode == 2
    assert "cannot reach Temporal at 127.0.0.1:9" in result.stderr and "python -m sandbox dev" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_spec_that_is_not_json_is_a_clear_error() -> None:
    result = sessionflow("join", "{not json", "cand")
    assert result.returncode == 2
    assert "SPEC must be a JSON file or JSON text" in result.stderr
    assert "Traceback" not in result.stderr
