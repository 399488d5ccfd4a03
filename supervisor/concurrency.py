"""Structured-concurrency helpers on top of anyio: every task has an owner, every wait can be bounded."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio


async def first_completed(*functions: Callable[[], Awaitable[Any]]) -> tuple[int, Any]:
    """Run the functions concurrently; return (index, result) of the first to finish and cancel the rest."""
    winner: list[tuple[int, Any]] = []

    async def run(index: int, function: Callable[[], Awaitable[Any]]) -> None:
        value = await function()
        if not winner:
            winner.append((index, value))
        group.cancel_scope.cancel()

    try:
        async with anyio.create_task_group() as group:
            for index, function in enumerate(functions):
                group.start_soon(run, index, function)
    except BaseExceptionGroup as errors:
        sole = _sole(errors)
        if sole is not None:
            raise sole from None  # callers expect the error itself, not a group of one
        raise
    return winner[0]


async def gather(*functions: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """Run the functions concurrently until all are done. An error cancels the rest; it is raised as is when it
    is the only one, and every error surfaces, as an exception group, when siblings failed too."""
    try:
        async with anyio.create_task_group() as group:
            for function in functions:
                group.start_soon(function)
    except BaseExceptionGroup as errors:
        sole = _sole(errors)
        if sole is not None:
            raise sole from None  # callers expect the error itself, not a group of one
        raise


def leaves(errors: BaseExceptionGroup) -> list[BaseException]:
    """Every error a group holds, through the groups nested in it."""
    found: list[BaseException] = []
    for error in errors.exceptions:
        found.extend(leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found


def _sole(errors: BaseExceptionGroup) -> BaseException | None:
    """The one error a group holds, through groups of one nested by inner task groups (a probe's EMFILE inside
    wait_all_ready inside first_completed); None when the group holds several."""
    while len(errors.exceptions) == 1:
        inner = errors.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        errors = inner
    return None
