"""Choosing a test's cases by the property it needs, at run time.

What an optimisation reaches on one particular case (an edit that answers, an answer of some length) depends
on the machine's floating-point arithmetic, so a test never names a case that happened to have the property
on one build: it takes the first cases that have it, looking at a bounded number, and fails saying what it
looked for when too few do (docs/development.md, "How tests choose their cases")."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import pytest

T = TypeVar("T")


def first_with(candidates: Iterable[T], has: Callable[[T], bool], n: int, what: str, tries: int = 12) -> list[T]:
    """The first ``n`` of ``candidates`` (looking at ``tries`` at most) for which ``has`` holds."""
    chosen, looked = [], 0
    for c in candidates:
        if looked == tries:
            break
        looked += 1
        if has(c):
            chosen.append(c)
            if len(chosen) == n:
                return chosen
    pytest.fail(f"only {len(chosen)} of the first {looked} candidates {what}; the test needs {n}")
