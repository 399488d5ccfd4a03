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
        if len(errors.exceptions) == 1:
            raise errors.exceptions[0] from None  # callers expect the error itself, not a group of one
        raise
    return winner[0]


async def gather(*functions: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """Run the functions concurrently until all are done; the first error cancels the rest and is raised as is."""
    try:
        async with anyio.create_task_group() as group:
            for function in functions:
                group.start_soon(function)
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0] from None  # callers handle the error itself (Fatal), never a group of them
