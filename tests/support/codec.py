"""The replay corpus's codec key: committed beside the histories (tests/replay/codec-test-key.json), it protects
test data only. Everything that writes or reads the corpus, or runs workflows on the time-skipping test server,
uses this converter, so those tests need no stack and no secret."""

from __future__ import annotations

from pathlib import Path

from temporalio.converter import DataConverter

from workers.codec import CodecKey, read_key_file
from workers.temporal import converter_with_keys

CORPUS_KEY_FILE = Path(__file__).parent.parent / "replay" / "codec-test-key.json"


def corpus_codec_keys() -> list[CodecKey]:
    return read_key_file(CORPUS_KEY_FILE)


def corpus_data_converter() -> DataConverter:
    return converter_with_keys(corpus_codec_keys())
