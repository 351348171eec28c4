"""Fixtures shared by every test package.

Tests that need the local stack read its addresses from the environment that `make test`
(`python -m sandbox exec -- pytest`) exports; when a service is not there they fail, naming what to run.
"""

from __future__ import annotations

import pytest

from config.settings import Settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()
