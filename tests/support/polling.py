"""The one way tests wait for something: poll a condition until it holds, bounded, and fail naming it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


# An async check gives what its coroutine returns, a sync one what it returns; either way `None` (the usual
# "not yet") is taken off, since only a truthy value is ever returned.
@overload
async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    timeout: float,
    every: float = ...,
    retry_on: tuple[type[BaseException], ...] = ...,
) -> T: ...
@overload
async def eventually(
    check: Callable[[], T | None],
    *,
    what: str,
    timeout: float,
    every: float = ...,
    retry_on: tuple[type[BaseException], ...] = ...,
) -> T: ...
async def eventually(
    check: Callable[[], Any],
    *,
    what: str,
    timeout: float,
    every: float = 0.1,
    retry_on: tuple[type[BaseException], ...] = (),
) -> Any:
    """Call ``check`` (sync or async) every ``every`` seconds until it returns something truthy, and return that.

    After ``timeout`` seconds raise an AssertionError naming ``what`` and the last value ``check`` returned (or the
    last exception it raised). Exceptions propagate at once, except those listed in ``retry_on``, which count as
    "not yet" (for example a query while the server restarts); nothing else is swallowed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
        except retry_on as e:
            last = e
        else:
            if result:
                return result
            last = result
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        await asyncio.sleep(every)  # the polling period
