"""Helpers shared by the test packages (plain functions and classes, no fixtures): test modules import from here,
never from one another. Fixtures are shared through conftest.py files."""
