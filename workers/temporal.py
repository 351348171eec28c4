"""The one way to connect to Temporal.

Every client the project makes (worker, gateway, starter, CLI, replayer, tests) comes from `connect`, and
every converter from `data_converter`, so a setting added here (an encryption codec, TLS, an API key for
Temporal Cloud) applies everywhere at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.runtime import Runtime
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


class TemporalSettingsError(ValueError):
    """The Temporal connection settings are unusable (a missing or unreadable certificate, half an mTLS pair)."""


def _tls(settings: Settings) -> TLSConfig | bool:
    """The TLS of the Temporal connection, built from the settings alone (no I/O beyond reading the PEM files).

    Plain TCP unless something asks for TLS: TEMPORAL_TLS, an API key (Temporal Cloud's API keys need TLS, with no
    client certificate), a client certificate (mTLS), a CA or a server name (a self-hosted cluster's own PKI).
    """
    cert, key = settings.temporal_tls_cert, settings.temporal_tls_key
    if (cert is None) != (key is None):
        given, missing = ("TEMPORAL_TLS_CERT", "TEMPORAL_TLS_KEY") if key is None else ("TEMPORAL_TLS_KEY", "TEMPORAL_TLS_CERT")
        raise TemporalSettingsError(f"{given} is set but {missing} is not: mTLS needs both the client certificate and its key")
    custom = cert is not None or settings.temporal_tls_ca is not None or settings.temporal_tls_server_name is not None
    if not custom:
        return settings.temporal_tls or settings.temporal_api_key is not None
    return TLSConfig(
        server_root_ca_cert=_pem("TEMPORAL_TLS_CA", settings.temporal_tls_ca),
        domain=settings.temporal_tls_server_name,
        client_cert=_pem("TEMPORAL_TLS_CERT", cert),
        client_private_key=_pem("TEMPORAL_TLS_KEY", key),
    )


def _pem(variable: str, path: Path | None) -> bytes | None:
    """The PEM file a setting names, or a `TemporalSettingsError` naming the setting and what is wrong with it."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TemporalSettingsError(f"{variable}={path} cannot be read: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise TemporalSettingsError(f"{variable}={path} is not a PEM file (no '-----BEGIN' line)")
    return data


class TemporalUnavailable(RuntimeError):
    """Temporal could not be reached (or did not answer) in time; the message says where we looked and what to do.

    The one "unavailable" error: `connect` raises it when there is no server, and `SessionClient` when a request
    could not get through an outage within `temporal_retry_deadline_s`. Such a request is safe to retry as is: every
    update carries a stable id, so a retry never acts twice.
    """


async def connect(settings: Settings | None = None, *, wait: float = 0.0, runtime: Runtime | None = None) -> Client:
    """A client of the configured Temporal; with `wait` > 0 it keeps trying for that many seconds (a worker or
    backend started while its cluster is still coming up or restarting), else it fails at once. `runtime`: a
    Temporal runtime of the caller's (a worker's, exporting metrics: `workers.metrics`)."""
    settings = settings or get_settings()
    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + wait, 0.2
    while True:
        try:
            return await _connect(settings, runtime)
        except RuntimeError as e:
            if loop.time() + delay <= deadline:
                await asyncio.sleep(delay)  # backoff before the next attempt
                delay = min(delay * 2, 2.0)
                continue
            raise TemporalUnavailable(
                f"cannot reach Temporal at {settings.temporal_address} (namespace {settings.temporal_namespace}): {e}. "
                "Start the local stack with `python -m sandbox dev` (or `make stack`), or set TEMPORAL_ADDRESS"
            ) from e


async def _connect(settings: Settings, runtime: Runtime | None = None) -> Client:
    return await Client.connect(
        settings.temporal_address,
        runtime=runtime,
        namespace=settings.temporal_namespace,
        api_key=settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None,
        tls=_tls(settings),
        data_converter=data_converter(settings),
    )
