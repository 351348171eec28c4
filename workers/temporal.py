"""The one way to connect to Temporal.

Every client the project makes (worker, gateway, starter, CLI, replayer, tests) comes from `connect`, and
every converter from `data_converter`, so a setting added here (an encryption codec, TLS, an API key for
Temporal Cloud) applies everywhere at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.service import TLSConfig

from config.settings import Settings, get_settings
from workers.codec import CodecKey, CodecKeyError, EncryptionCodec, parse_keys, read_key_file


def data_converter(settings: Settings | None = None) -> DataConverter:
    """The converter for workflow payloads: pydantic models to JSON, then AES-GCM encrypted (workers/codec.py)
    with the keys in the settings, so nothing a session carries is readable outside our processes."""
    return converter_with_keys(codec_keys(settings or get_settings()))


def converter_with_keys(keys: Sequence[CodecKey]) -> DataConverter:
    """The pydantic converter with an encryption codec over ``keys`` (newest first)."""
    return dataclasses.replace(pydantic_data_converter, payload_codec=EncryptionCodec(keys))


def codec_keys(settings: Settings) -> list[CodecKey]:
    """The configured codec keys, newest first: SESSIONFLOW_CODEC_KEYS, then those of SESSIONFLOW_CODEC_KEY_FILE."""
    keys: list[CodecKey] = []
    if settings.codec_keys is not None:
        keys += parse_keys(settings.codec_keys.get_secret_value())
    if settings.codec_key_file is not None:
        keys += read_key_file(settings.codec_key_file)
    if not keys:
        raise CodecKeyError(
            "no payload encryption key: set SESSIONFLOW_CODEC_KEYS (`id:base64key`, newest first) or "
            "SESSIONFLOW_CODEC_KEY_FILE, or run under the local stack (`python -m sandbox exec -- ...`), which makes one"
        )
    return keys


def _tls(settings: Settings) -> TLSConfig | bool:
    if settings.temporal_tls_cert and settings.temporal_tls_key:
        return TLSConfig(
            client_cert=settings.temporal_tls_cert.read_bytes(),
            client_private_key=settings.temporal_tls_key.read_bytes(),
        )
    # Temporal Cloud with an API key needs TLS without a client certificate.
    return settings.temporal_tls or settings.temporal_api_key is not None


class TemporalUnavailable(RuntimeError):
    """Temporal could not be reached; the message says where we looked and what to do."""


async def connect(settings: Settings | None = None) -> Client:
    settings = settings or get_settings()
    try:
        return await _connect(settings)
    except RuntimeError as e:
        raise TemporalUnavailable(
            f"cannot reach Temporal at {settings.temporal_address} (namespace {settings.temporal_namespace}): {e}. "
            "Start the local stack with `python -m sandbox dev` (or `make stack`), or set TEMPORAL_ADDRESS"
        ) from e


async def _connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        api_key=settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None,
        tls=_tls(settings),
        data_converter=data_converter(settings),
    )
