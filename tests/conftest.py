"""Fixtures shared by every test package.

Tests that need the local stack read its addresses from the environment that `make test`
(`python -m sandbox exec -- pytest`) exports; when a service is not there they fail, naming what to run.
"""

from __future__ import annotations

import os

import pytest

from config.settings import Settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


def pytest_configure(config: pytest.Config) -> None:
    """`SESSIONFLOW_MUTATION="<name>"` runs the tests against a deliberately broken decision core (one of
    `tests.support.mutations.MUTATIONS`), to see which tests catch it (docs/testing.md)."""
    name = os.environ.get("SESSIONFLOW_MUTATION")
    if not name:
        return
    from tests.support.mutations import MUTATIONS
    from workflows.machine import SessionMachine

    method, replacement, _ = MUTATIONS[name]
    setattr(SessionMachine, method, replacement)
