"""The local stack has no public secret (issue 9 item 6): its LiveKit key pair, codec key and codec server
tokens are made at random on first run, kept in the state dir (0600), reused later, and never written into
the state file other processes read."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

from sandbox.secrets import SECRETS_FILE
from sandbox.stack import SECRET_ENV, LocalStack, StackPorts
from workers.codec import parse_keys


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_first_run_makes_strong_secrets_readable_by_the_owner_only(tmp_path: Path) -> None:
    env = LocalStack(state_dir=tmp_path).env

    assert re.fullmatch(r"API[\w-]{12}", env["LIVEKIT_API_KEY"]), env["LIVEKIT_API_KEY"]
    assert len(env["LIVEKIT_API_SECRET"]) >= 43  # 32 random bytes, url-safe base64
    assert (env["LIVEKIT_API_KEY"], env["LIVEKIT_API_SECRET"]) != ("devkey", "secret")
    [key] = parse_keys(env["SESSIONFLOW_CODEC_KEYS"])
    assert len(key.key) == 32
    assert len({env["SESSIONFLOW_CODEC_ADMIN_TOKEN"], env["SESSIONFLOW_CODEC_SUPPORT_TOKEN"]}) == 2
    assert _mode(tmp_path / SECRETS_FILE) == 0o600


def test_later_runs_reuse_the_secrets_and_another_state_dir_gets_its_own(tmp_path: Path) -> None:
    first = LocalStack(state_dir=tmp_path / "a").env
    again = LocalStack(state_dir=tmp_path / "a").env
    other = LocalStack(state_dir=tmp_path / "b").env
    assert all(first[name] == again[name] for name in SECRET_ENV)
    assert all(first[name] != other[name] for name in SECRET_ENV)


def test_the_livekit_config_carries_the_generated_pair_and_no_dev_key(tmp_path: Path) -> None:
    stack = LocalStack(services=["livekit"], ports=StackPorts().shifted(3), state_dir=tmp_path)
    config = stack.livekit_config(write=True)
    text = config.read_text()

    key, secret = stack.env["LIVEKIT_API_KEY"], stack.env["LIVEKIT_API_SECRET"]
    assert f"\nkeys:\n  {key}: \"{secret}\"\n" in text
    assert f"\n  api_key: {key}\n" in text  # the webhooks are signed with it
    assert "devkey" not in text and "generated-on-first-run" not in text
    assert _mode(config) == 0o600


def test_the_state_file_other_processes_read_holds_no_secret(tmp_path: Path) -> None:
    stack = LocalStack(state_dir=tmp_path)
    stack._write_state()
    text = stack.state_file.read_text()
    for name in SECRET_ENV:
        assert stack.env[name] not in text, f"{name} leaked into {stack.state_file}"
    assert stack.env["LIVEKIT_API_KEY"] in text  # the key id is no secret; the stack is still described
    assert _mode(stack.state_file) == 0o600  # it names the UI's codec URL (support token) once services run


def test_a_secrets_file_from_an_older_version_gets_the_secrets_added_since_and_keeps_its_own(tmp_path: Path) -> None:
    first = LocalStack(state_dir=tmp_path).env
    path = tmp_path / SECRETS_FILE
    old = json.loads(path.read_text())
    del old["participant_id_key"]  # written before the stack made one
    path.write_text(json.dumps(old))

    upgraded = LocalStack(state_dir=tmp_path).env
    again = LocalStack(state_dir=tmp_path).env

    assert upgraded["LIVEKIT_API_SECRET"] == first["LIVEKIT_API_SECRET"]  # nothing it had is replaced
    assert upgraded["SESSIONFLOW_CODEC_KEYS"] == first["SESSIONFLOW_CODEC_KEYS"]
    assert len(upgraded["SESSIONFLOW_PARTICIPANT_ID_KEY"]) >= 43
    assert upgraded["SESSIONFLOW_PARTICIPANT_ID_KEY"] != first["SESSIONFLOW_PARTICIPANT_ID_KEY"]
    assert again["SESSIONFLOW_PARTICIPANT_ID_KEY"] == upgraded["SESSIONFLOW_PARTICIPANT_ID_KEY"]  # written back
    assert _mode(path) == 0o600
