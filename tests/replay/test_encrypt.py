"""`python -m tests.replay.encrypt`, which brings a plaintext history into the encrypted corpus, encrypts exactly
what the SDK's codec encrypts (so the result replays), nothing else, and is idempotent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowHistory
from temporalio.testing import WorkflowEnvironment

from tests.replay.encrypt import encrypt_history
from tests.replay.record import add_search_attributes
from tests.replay.test_replay import HISTORIES, HISTORY_DIR, replay
from tests.support.binaries import venv_binary
from tests.support.codec import corpus_codec_keys, corpus_data_converter
from tests.support.replay_scenarios import SCENARIOS
from workers.codec import EncryptionCodec, history_payloads, is_encrypted, map_payloads


def _every_payload(message: Message) -> Iterator[Payload]:
    """Every Payload anywhere in ``message``, whether or not a codec would touch it."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        items = (value[k] for k in value) if field.message_type.GetOptions().map_entry else (
            value if field.is_repeated else [value])
        for item in items:
            if isinstance(item, Payload):
                yield item
            elif isinstance(item, Message):
                yield from _every_payload(item)


async def test_the_script_visits_exactly_the_payloads_the_sdk_encrypts() -> None:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_binary("temporal-test-server"), data_converter=corpus_data_converter()
    )
    try:
        await add_search_attributes(env)
        # The join path: a local activity marker (its result encoded, its bookkeeping not), patch markers,
        # search attributes, memo, updates, summaries.
        history = await (await SCENARIOS["interview_happy_path"](env)).fetch_history()
    finally:
        await env.shutdown()
    encrypted_by_sdk = [p for event in history.events for p in _every_payload(event) if is_encrypted(p)]
    visited = history_payloads(history)
    assert len(visited) == len(encrypted_by_sdk) > 20 and all(is_encrypted(p) for p in visited)


def test_the_committed_corpus_is_encrypted_already() -> None:
    codec = EncryptionCodec(corpus_codec_keys())
    for path in HISTORIES:
        _, changed = encrypt_history(path.read_text(), codec)
        assert changed == 0, f"{path.name} has plaintext payloads: run `python -m tests.replay.encrypt`"


async def test_a_plaintext_history_encrypted_by_the_script_replays(tmp_path: Path) -> None:
    codec = EncryptionCodec(corpus_codec_keys())
    committed = WorkflowHistory.from_json("h", (HISTORY_DIR / "interview_happy_path.v3.json").read_text())
    for event in committed.events:  # what another branch records before it learns about the codec
        map_payloads(event, codec.decrypt)
    plaintext = committed.to_json()

    text, changed = encrypt_history(plaintext, codec)
    again, changed_again = encrypt_history(text, codec)
    assert changed > 20 and changed_again == 0 and again == text
    path = tmp_path / "from_another_branch.json"
    path.write_text(text)
    assert await replay(path) is None
