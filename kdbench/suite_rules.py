"""Rules on a suite's values beyond their types: names that stay inside the results folder, and training lengths
with a sane upper bound (a typo such as `epochs: 1e9` must not start a run without end).

A run longer than a bound raises it through the environment; the error says how.
"""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator

MAX_EPOCHS_ENV, MAX_STEPS_ENV = "KDBENCH_MAX_EPOCHS", "KDBENCH_MAX_STEPS"
DEFAULT_MAX_EPOCHS, DEFAULT_MAX_STEPS = 1000, 1_000_000


def _bound(env: str, default: float) -> float:
    try:
        return float(os.environ.get(env, default))
    except ValueError:  # raised inside a validator, so reported at the key being checked
        raise ValueError(f"environment variable {env}={os.environ[env]!r} is not a number") from None


def _count(x: float) -> str:
    return f"{x:,.0f}" if x == int(x) else f"{x:g}"


def bounded_epochs(cls, v: float) -> float:
    limit = _bound(MAX_EPOCHS_ENV, DEFAULT_MAX_EPOCHS)
    if v > limit:
        raise ValueError(f"{_count(v)} epochs is more than the limit of {_count(limit)}; set max_steps for a run "
                         f"counted in steps, or raise the limit with {MAX_EPOCHS_ENV}=N")
    return v


def bounded_steps(cls, v: int) -> int:
    if v == -1:  # the default: train for `epochs`
        return v
    if v <= 0:
        raise ValueError(f"must be > 0 (or -1: train for `epochs`), got {v}")
    limit = _bound(MAX_STEPS_ENV, DEFAULT_MAX_STEPS)
    if v > limit:
        raise ValueError(f"{_count(v)} steps is more than the limit of {_count(limit)}; "
                         f"raise it with {MAX_STEPS_ENV}=N")
    return v


def path_component(name: str) -> str:
    """A name that becomes part of a file name (the results folder, run ids) cannot step out of its folder."""
    if not name:
        raise ValueError("a name may not be empty")
    if name in (".", ".."):
        raise ValueError(f"{name!r} is not a valid name: it would write outside the results folder")
    bad = next((c for c in ("/", "\\", "\0") if c in name), None)
    if bad is not None:
        raise ValueError(f"{name!r} is not a valid name: it may not contain {bad!r} (names become file names)")
    return name


Name = Annotated[str, AfterValidator(path_component)]
