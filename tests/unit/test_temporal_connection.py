"""The Temporal connection settings (Temporal Cloud, a self-hosted cluster with its own PKI) and the retry classifier.

What TLS the client uses is decided from the settings alone, so it is checked here without a server: a wrong path or
half an mTLS pair is a clear error naming the setting, raised before any connection is attempted.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pydantic import SecretStr
from temporalio.client import WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode, TLSConfig

from config.settings import Settings
from starters.client import _unavailable
from workers.temporal import TemporalSettingsError, TemporalUnavailable, _tls, connect

CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
CA = b"-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n"


@pytest.fixture
def pems(tmp_path: Path) -> dict[str, Path]:
    files = {"cert": CERT, "key": KEY, "ca": CA}
    for name, data in files.items():
        (tmp_path / f"{name}.pem").write_bytes(data)
    return {name: tmp_path / f"{name}.pem" for name in files}


def settings(**fields: object) -> Settings:
    return Settings.model_validate({"temporal_address": "127.0.0.1:9", **fields})


def test_no_tls_settings_is_plain_tcp() -> None:
    assert _tls(settings()) is False


def test_an_api_key_alone_turns_on_tls_with_the_system_roots() -> None:
    """Temporal Cloud with an API key: TLS, no client certificate, the public CA chain."""
    assert _tls(settings(temporal_api_key=SecretStr("k"))) is True
    assert _tls(settings(temporal_tls=True)) is True


def test_mtls_with_a_private_ca_and_server_name(pems: dict[str, Path]) -> None:
    tls = _tls(settings(
        temporal_tls_cert=pems["cert"], temporal_tls_key=pems["key"], temporal_tls_ca=pems["ca"],
        temporal_tls_server_name="temporal.internal",
    ))
    assert tls == TLSConfig(server_root_ca_cert=CA, domain="temporal.internal", client_cert=CERT, client_private_key=KEY)


def test_temporal_cloud_mtls_uses_the_public_roots(pems: dict[str, Path]) -> None:
    tls = _tls(settings(temporal_tls_cert=pems["cert"], temporal_tls_key=pems["key"]))
    assert tls == TLSConfig(client_cert=CERT, client_private_key=KEY)


def test_a_private_ca_without_a_client_certificate(pems: dict[str, Path]) -> None:
    assert _tls(settings(temporal_tls_ca=pems["ca"])) == TLSConfig(server_root_ca_cert=CA)


def test_the_settings_come_from_the_environment(pems: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEMPORAL_TLS_CERT", str(pems["cert"]))
    monkeypatch.setenv("TEMPORAL_TLS_KEY", str(pems["key"]))
    monkeypatch.setenv("TEMPORAL_TLS_CA", str(pems["ca"]))
    monkeypatch.setenv("TEMPORAL_TLS_SERVER_NAME", "frontend.temporal")
    monkeypatch.setenv("SESSIONFLOW_TEMPORAL_RETRY_DEADLINE", "7.5")
    loaded = Settings()
    assert (loaded.temporal_tls_cert, loaded.temporal_tls_key, loaded.temporal_tls_ca) == (pems["cert"], pems["key"], pems["ca"])
    assert loaded.temporal_tls_server_name == "frontend.temporal"
    assert loaded.temporal_retry_deadline_s == 7.5


def test_the_retry_deadline_defaults_to_a_minute_and_must_be_positive() -> None:
    assert Settings().temporal_retry_deadline_s == 60.0
    with pytest.raises(ValueError, match="greater than 0"):
        settings(temporal_retry_deadline_s=0)


def test_a_missing_certificate_file_names_the_setting(pems: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TemporalSettingsError, match=rf"TEMPORAL_TLS_CERT={missing} cannot be read: No such file"):
        _tls(settings(temporal_tls_cert=missing, temporal_tls_key=pems["key"]))


def test_a_file_that_is_not_pem_is_refused(tmp_path: Path, pems: dict[str, Path]) -> None:
    der = tmp_path / "ca.der"
    der.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(TemporalSettingsError, match=rf"TEMPORAL_TLS_CA={der} is not a PEM file"):
        _tls(settings(temporal_tls_ca=der))


@pytest.mark.parametrize("given", ["cert", "key"])
def test_half_an_mtls_pair_is_refused(pems: dict[str, Path], given: str) -> None:
    with pytest.raises(TemporalSettingsError, match="mTLS needs both the client certificate and its key"):
        _tls(settings(**{f"temporal_tls_{given}": pems[given]}))


async def test_connect_refuses_bad_tls_settings_before_dialing(tmp_path: Path) -> None:
    """Not a "cannot reach Temporal" after a timeout: the settings error, at once."""
    with pytest.raises(TemporalSettingsError, match="TEMPORAL_TLS_KEY"):
        await asyncio.wait_for(connect(settings(temporal_tls_cert=tmp_path / "c.pem"), wait=30), 5)


async def test_connect_with_wait_keeps_trying_then_says_where_it_looked() -> None:
    """Nothing listens on port 9: with `wait`, `connect` tries for that long before giving up."""
    started = time.monotonic()
    with pytest.raises(TemporalUnavailable, match=r"cannot reach Temporal at 127\.0\.0\.1:9 "):
        await asyncio.wait_for(connect(settings(), wait=1.5), 30)
    assert time.monotonic() - started >= 1.0


def rpc(status: RPCStatusCode) -> RPCError:
    return RPCError("x", status, b"")


@pytest.mark.parametrize("status", [RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.RESOURCE_EXHAUSTED])
def test_an_outage_is_retried(status: RPCStatusCode) -> None:
    assert _unavailable(rpc(status))


@pytest.mark.parametrize(
    "status", [RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT, RPCStatusCode.PERMISSION_DENIED, RPCStatusCode.INTERNAL]
)
def test_a_refusal_is_not_retried(status: RPCStatusCode) -> None:
    assert not _unavailable(rpc(status))


def test_an_update_rpc_that_timed_out_is_retried_but_a_cancelled_caller_is_not() -> None:
    """The SDK raises the same error for both; only its cause tells them apart."""
    timed_out = WorkflowUpdateRPCTimeoutOrCancelledError()
    timed_out.__cause__ = rpc(RPCStatusCode.DEADLINE_EXCEEDED)
    cancelled = WorkflowUpdateRPCTimeoutOrCancelledError()
    cancelled.__cause__ = asyncio.CancelledError()
    assert _unavailable(timed_out)
    assert not _unavailable(cancelled)
