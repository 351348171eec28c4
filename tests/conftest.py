"""Fixtures shared by every test package.

Tests that need the local stack read its addresses from the environment that `make test`
(`python -m sandbox exec -- pytest`) exports; when a service is not there they fail, naming what to run.
"""

from __future__ import annotations

import pytest

from config.settings import Settings
from tests.support.binaries import venv_binary

# Re-exported until tests/workflows/conftest.py imports it from tests.support.binaries (the lead's change).
__all__ = ["venv_binary"]


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()
