"""Encrypted payloads: every value a session puts in Temporal (specs, tokens, outcomes, memo) is AES-GCM
encrypted before it leaves the process, so the server, the UI, exported histories and the replay corpus
hold ciphertext only.

A payload becomes ``binary/encrypted`` with the id of the key in its metadata; its data is a random 12-byte
nonce followed by the AES-GCM ciphertext of the original payload (metadata included). The key id is also
the associated data, so a ciphertext moved under another key id fails to decrypt.

Rotation: keys are listed newest first. The newest encrypts; every configured key decrypts, so a retired key
stays listed until no history that uses it is needed. A payload whose key id is not configured fails with an
error naming the key id. Search attributes never pass through a codec (they hold no personal data and the
server must index them).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError, Message
from temporalio.api.common.v1 import Payload
from temporalio.api.history.v1 import History
from temporalio.client import WorkflowHistory
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
NONCE_BYTES = 12
KEY_BYTES = 32  # AES-256
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class CodecKeyError(ValueError):
    """The codec keys are missing or malformed; the message names the setting to fix."""


class UndecryptablePayload(ValueError):
    """A payload could not be decrypted: unknown key id, or ciphertext that fails authentication."""


@dataclass(frozen=True, repr=False)
class CodecKey:
    """One AES-256 key and its id. ``repr`` never shows the key."""

    key_id: str
    key: bytes

    def __post_init__(self) -> None:
        if not _KEY_ID.match(self.key_id):
            raise CodecKeyError(f"codec key id {self.key_id!r} must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if len(self.key) != KEY_BYTES:
            raise CodecKeyError(f"codec key {self.key_id!r} is {len(self.key)} bytes; AES-256 needs {KEY_BYTES}")

    def __repr__(self) -> str:
        return f"CodecKey({self.key_id!r}, <hidden>)"

    @classmethod
    def generate(cls, key_id: str) -> CodecKey:
        return cls(key_id, AESGCM.generate_key(bit_length=8 * KEY_BYTES))

    def encoded(self) -> str:
        """``id:base64key``, the form ``SESSIONFLOW_CODEC_KEYS`` takes."""
        return f"{self.key_id}:{base64.b64encode(self.key).decode()}"


def parse_keys(text: str) -> list[CodecKey]:
    """``id:base64key,id:base64key,...`` (newest first) -> keys; a clear error for anything else."""
    keys: list[CodecKey] = []
    for n, item in enumerate(part.strip() for part in text.split(",")):
        if not item:
            continue
        key_id, sep, b64 = item.partition(":")
        if not sep:
            raise CodecKeyError(f"codec key #{n + 1} is not `id:base64key` (SESSIONFLOW_CODEC_KEYS)")
        try:
            raw = base64.b64decode(b64, validate=True)
        except binascii.Error:
            raise CodecKeyError(f"codec key {key_id!r} is not valid base64 (SESSIONFLOW_CODEC_KEYS)") from None
        keys.append(CodecKey(key_id, raw))
    return _checked(keys)


def read_key_file(path: Path) -> list[CodecKey]:
    """A JSON key file, ``{"keys": [{"id": ..., "key": base64}, ...]}`` newest first."""
    try:
        document = json.loads(path.read_text())
        entries = document["keys"]
        keys = [CodecKey(str(e["id"]), base64.b64decode(str(e["key"]), validate=True)) for e in entries]
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as error:
        raise CodecKeyError(f"cannot read codec keys from {path}: {error}") from None
    return _checked(keys)


def write_key_file(path: Path, keys: Sequence[CodecKey], *, note: str = "") -> None:
    """Write ``keys`` as a key file readable by its owner only."""
    document: dict[str, object] = {"keys": [{"id": k.key_id, "key": base64.b64encode(k.key).decode()} for k in keys]}
    if note:
        document = {"note": note, **document}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(document, indent=2) + "\n")


def _checked(keys: list[CodecKey]) -> list[CodecKey]:
    if not keys:
        raise CodecKeyError("no codec key configured")
    ids = [k.key_id for k in keys]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CodecKeyError(f"codec key id(s) {duplicates} listed more than once")
    return keys


class EncryptionCodec(PayloadCodec):
    """AES-GCM payload codec with key rotation (see the module docstring)."""

    def __init__(self, keys: Iterable[CodecKey]) -> None:
        ordered = _checked(list(keys))
        self._current = ordered[0]
        self._ciphers = {k.key_id: AESGCM(k.key) for k in ordered}

    @property
    def current_key_id(self) -> str:
        return self._current.key_id

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        """Encrypt with the newest key. An already encrypted payload is returned as it is (idempotent)."""
        if is_encrypted(payload):
            return payload
        key_id = self._current.key_id
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(nonce, payload.SerializeToString(), key_id.encode())
        return Payload(metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id.encode()}, data=nonce + sealed)

    def decrypt(self, payload: Payload) -> Payload:
        """The original payload. A payload that is not encrypted passes through (values written before
        encryption was turned on still read)."""
        if not is_encrypted(payload):
            return payload
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise UndecryptablePayload(
                f"payload encrypted with codec key id {key_id!r}, which is not configured "
                f"(configured: {', '.join(self._ciphers)}); add that key to SESSIONFLOW_CODEC_KEYS"
            )
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            plain = cipher.decrypt(nonce, sealed, key_id.encode())
            return Payload.FromString(plain)
        except (InvalidTag, DecodeError, ValueError):
            raise UndecryptablePayload(
                f"payload under codec key id {key_id!r} failed authentication: it was altered or the key is wrong"
            ) from None


def is_encrypted(payload: Payload) -> bool:
    return payload.metadata.get("encoding") == ENCODING


# --------------------------------------------------------------------------------------------------------
# Whole histories (the replay corpus, `sessionflow show`): the payloads an SDK passes through its codec.

# Marker details the SDK core writes and reads itself (patch ids, local activity bookkeeping): never encoded.
_CORE_MARKER_KEYS = frozenset({"patch-data", "data"})
# Messages whose payloads never go through a codec.
_UNCODED_MESSAGES = frozenset({"temporal.api.common.v1.SearchAttributes", "temporal.api.common.v1.Header"})


def map_payloads(message: Message, transform: Callable[[Payload], Payload]) -> None:
    """Replace, in place, every payload of ``message`` (a history event or any part of one) that an SDK's
    codec would have encoded with ``transform(payload)``. tests/replay/test_encrypt.py checks these rules
    against what the SDK encrypts."""
    if message.DESCRIPTOR.full_name in _UNCODED_MESSAGES:
        return
    is_marker = message.DESCRIPTOR.full_name == "temporal.api.history.v1.MarkerRecordedEventAttributes"
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            skip = _CORE_MARKER_KEYS if is_marker and field.name == "details" else frozenset()
            items: Iterable[Message] = [value[key] for key in value if key not in skip]
        else:
            items = value if field.is_repeated else [value]
        for item in items:
            if isinstance(item, Payload):
                item.CopyFrom(transform(item))
            else:
                map_payloads(item, transform)


def history_payloads(history: WorkflowHistory) -> list[Payload]:
    """Every payload the SDK's codec encodes in ``history``, in order (what `map_payloads` visits)."""
    found: list[Payload] = []

    def collect(payload: Payload) -> Payload:
        found.append(payload)
        return payload

    for event in history.events:
        map_payloads(event, collect)
    return found


async def decode_history(history: WorkflowHistory, codec: PayloadCodec | None) -> WorkflowHistory:
    """``history`` (as fetched: payloads encoded) with its payloads decoded by ``codec``, for reading it."""
    if codec is None:
        return history
    events = History(events=history.events)
    decoded = iter(await codec.decode(history_payloads(history)))
    for event in events.events:
        map_payloads(event, lambda _: next(decoded))
    return WorkflowHistory(history.workflow_id, list(events.events))
