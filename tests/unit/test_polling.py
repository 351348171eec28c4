"""``tests.support.polling.eventually``: the one wait of the test suite returns what it waited for, and fails loudly."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.polling import eventually


async def test_returns_the_first_truthy_value_of_a_sync_or_async_check() -> None:
    values = iter([None, 0, "ready"])
    assert await eventually(lambda: next(values), what="a sync value", timeout=2, every=0.01) == "ready"

    calls = 0

    async def third_time() -> int | None:
        nonlocal calls
        calls += 1
        return calls if calls == 3 else None

    assert await eventually(third_time, what="an async value", timeout=2, every=0.01) == 3


async def test_a_timeout_names_what_it_waited_for_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0\.2 s waiting for an open door \(last: 0\)"):
        await eventually(lambda: 0, what="an open door", timeout=0.2, every=0.05)
    with pytest.raises(AssertionError, match=r"\(last: \[\]\)"):
        await eventually(list, what="a non-empty list", timeout=0.1, every=0.05)


async def test_an_exception_propagates_at_once_unless_it_is_retried() -> None:
    async def broken() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await asyncio.wait_for(eventually(broken, what="a broken check", timeout=30, every=0.01), 1)
    with pytest.raises(AssertionError, match=r"last: KeyError\('boom'\)"):
        await eventually(broken, what="a retried check", timeout=0.1, every=0.02, retry_on=(KeyError,))
