"""The payload codec (workers/codec.py): what leaves a process is ciphertext, keys rotate, and a payload that
cannot be decrypted fails loudly, naming the key id to add."""

from __future__ import annotations

import base64

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowHistory

from config.settings import Settings
from tests.support.codec import CORPUS_KEY_FILE, corpus_codec_keys
from workers.codec import (
    ENCODING,
    KEY_ID_METADATA,
    CodecKey,
    CodecKeyError,
    EncryptionCodec,
    UndecryptablePayload,
    decode_history,
    is_encrypted,
    parse_keys,
)
from workers.temporal import codec_keys, converter_with_keys, data_converter

OLD, NEW = CodecKey.generate("k-2025"), CodecKey.generate("k-2026")
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYW5kIiwibmFtZSI6IkFkYSBMb3ZlbGFjZSJ9.c2lnbmF0dXJl"


def _json(value: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=f'"{value}"'.encode())


async def test_a_payload_round_trips_and_leaves_nothing_readable() -> None:
    codec = EncryptionCodec([NEW])
    [sealed] = await codec.encode([_json(JWT)])
    assert sealed.metadata["encoding"] == ENCODING and sealed.metadata[KEY_ID_METADATA] == b"k-2026"
    assert b"eyJ" not in sealed.SerializeToString() and b"json/plain" not in sealed.SerializeToString()
    assert await codec.decode([sealed]) == [_json(JWT)]


async def test_each_encryption_uses_a_fresh_nonce() -> None:
    codec = EncryptionCodec([NEW])
    first, second = await codec.encode([_json("x"), _json("x")])
    assert first.data[:12] != second.data[:12] and first.data != second.data


async def test_rotation_encrypts_with_the_newest_key_and_a_retired_key_still_decrypts() -> None:
    [written_before] = await EncryptionCodec([OLD]).encode([_json("before rotation")])
    rotated = EncryptionCodec([NEW, OLD])
    [written_after] = await rotated.encode([_json("after rotation")])
    assert written_after.metadata[KEY_ID_METADATA] == b"k-2026"
    assert await rotated.decode([written_before, written_after]) == [_json("before rotation"), _json("after rotation")]


async def test_an_unknown_key_id_is_a_clear_error_naming_it() -> None:
    [sealed] = await EncryptionCodec([OLD]).encode([_json("x")])
    with pytest.raises(UndecryptablePayload, match=r"codec key id 'k-2025', which is not configured \(configured: k-2026\)"):
        await EncryptionCodec([NEW]).decode([sealed])


@pytest.mark.parametrize("tamper", ["flip a ciphertext bit", "swap the key id", "truncate"])
async def test_tampered_ciphertext_fails_authentication(tamper: str) -> None:
    codec = EncryptionCodec([NEW, CodecKey(OLD.key_id, NEW.key)])  # same key under two ids: only the id differs
    [sealed] = await codec.encode([_json("x")])
    if tamper == "flip a ciphertext bit":
        sealed.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    elif tamper == "swap the key id":
        sealed.metadata[KEY_ID_METADATA] = OLD.key_id.encode()
    else:
        sealed.data = sealed.data[:20]
    with pytest.raises(UndecryptablePayload, match="failed authentication"):
        await codec.decode([sealed])


async def test_encoding_is_idempotent_and_plaintext_decodes_as_itself() -> None:
    codec = EncryptionCodec([NEW])
    [sealed] = await codec.encode([_json("x")])
    assert await codec.encode([sealed]) == [sealed]
    assert await codec.decode([_json("legacy")]) == [_json("legacy")]


def test_keys_from_settings_newest_first_and_bad_keys_are_clear_errors() -> None:
    settings = Settings.model_validate({
        "LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s", "SESSIONFLOW_CODEC_KEYS": f"{NEW.encoded()},{OLD.encoded()}",
        "SESSIONFLOW_CODEC_KEY_FILE": str(CORPUS_KEY_FILE),
    })
    assert [k.key_id for k in codec_keys(settings)] == ["k-2026", "k-2025", corpus_codec_keys()[0].key_id]
    assert "<hidden>" in repr(NEW) and base64.b64encode(NEW.key).decode() not in repr(codec_keys(settings))
    for bad, message in [
        ("nocolon", "not `id:base64key`"),
        ("k:not-base64!", "not valid base64"),
        (f"k:{base64.b64encode(b'short').decode()}", "is 5 bytes; AES-256 needs 32"),
        (f"{NEW.encoded()},{NEW.encoded()}", "listed more than once"),
        ("bad id!:" + base64.b64encode(NEW.key).decode(), "must be 1-64 characters"),
    ]:
        with pytest.raises(CodecKeyError, match=message):
            parse_keys(bad)


def test_no_key_configured_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SESSIONFLOW_CODEC_KEYS", raising=False)
    monkeypatch.delenv("SESSIONFLOW_CODEC_KEY_FILE", raising=False)
    settings = Settings.model_validate({"LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s"})
    with pytest.raises(CodecKeyError, match="no payload encryption key: set SESSIONFLOW_CODEC_KEYS"):
        data_converter(settings)


async def test_the_data_converter_encrypts_what_the_pydantic_converter_writes() -> None:
    converter = converter_with_keys([NEW])
    [payload] = await converter.encode([{"token": JWT}])
    assert is_encrypted(payload) and JWT.encode() not in payload.data
    assert await converter.decode([payload], [dict]) == [{"token": JWT}]


async def test_the_committed_corpus_holds_no_token_in_clear_and_decodes_with_its_key() -> None:
    from tests.replay.test_replay import HISTORIES

    codec = EncryptionCodec(corpus_codec_keys())
    for path in HISTORIES:
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        raw = b"".join(e.SerializeToString() for e in history.events)
        assert b"eyJ" not in raw, f"{path.name} has a JWT-shaped value in clear"
        decoded = await decode_history(history, codec)
        assert b"".join(e.SerializeToString() for e in decoded.events) != raw
