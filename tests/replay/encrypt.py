"""Encrypt the replay corpus in place: `python -m tests.replay.encrypt [FILE ...]` (default: every history).

Every payload an SDK passes through its codec (workers/codec.py `map_payloads`) is encrypted with the test key
beside the corpus (tests/replay/codec-test-key.json); nothing else in a history changes. Already encrypted
payloads are left alone, so running it again, or on a corpus where only some files are new, is safe: this is
how a plaintext history recorded on another branch joins the corpus. Each file is checked before it is
written: decrypting the result gives back exactly the events read.
"""

from __future__ import annotations

import sys
from pathlib import Path

from temporalio.api.common.v1 import Payload
from temporalio.api.history.v1 import History
from temporalio.client import WorkflowHistory

from tests.support.codec import corpus_codec_keys
from workers.codec import EncryptionCodec, map_payloads

HISTORIES = Path(__file__).parent / "histories"


def encrypt_history(text: str, codec: EncryptionCodec) -> tuple[str, int]:
    """The history ``text`` (Temporal's JSON) with its payloads encrypted, and how many were encrypted now."""
    original = WorkflowHistory.from_json("corpus", text)
    changed = 0

    def encrypt(payload: Payload) -> Payload:
        nonlocal changed
        sealed = codec.encrypt(payload)
        changed += sealed is not payload
        return sealed

    events = History(events=original.events)
    for event in events.events:
        map_payloads(event, encrypt)
    _check_round_trip(original, events, codec)
    return WorkflowHistory(original.workflow_id, list(events.events)).to_json(), changed


def _check_round_trip(original: WorkflowHistory, encrypted: History, codec: EncryptionCodec) -> None:
    if _decrypted(History(events=original.events), codec) != _decrypted(encrypted, codec):
        raise SystemExit(f"encrypting {original.workflow_id} changed more than payloads; nothing written")


def _decrypted(history: History, codec: EncryptionCodec) -> History:
    copy = History()
    copy.CopyFrom(history)
    for event in copy.events:
        map_payloads(event, codec.decrypt)
    return copy


def main(paths: list[str]) -> int:
    codec = EncryptionCodec(corpus_codec_keys())
    files = [Path(p) for p in paths] or sorted(HISTORIES.glob("*.json"))
    for path in files:
        text, changed = encrypt_history(path.read_text(), codec)
        if changed:
            path.write_text(text + "\n")
        print(f"{'encrypted' if changed else 'unchanged'} {path} ({changed} payloads)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
