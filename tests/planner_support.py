"""The planner with its small-problem rules off, for checks that must reach the structured kernels
on small shapes (the tests here, and `bench/gpu_check.py` on CUDA)."""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Iterator

import pytest


@contextmanager
def structured_at_every_size() -> Iterator[None]:
    """Within the block, fixed, unions and windows over few keys, a few rows after them, and chunks
    of tiny strides take their structured kernels, not the masked one (`engine.planner.SMALL_KEYS`,
    `SHORT_RUN_MASKED_KEYS`, `ONE_ROW_MASKED_KEYS`, `TINY_STRIDE` and `TINY_UNION_STRIDE` 0). Plans are cached: none made before the block is
    used in it, none made in it is kept after."""
    planner = importlib.import_module("engine.planner")
    caches = (planner.plan, importlib.import_module("engine.attention").backend_for)
    for cache in caches:
        cache.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(planner, "SMALL_KEYS", 0)
            patch.setattr(planner, "SHORT_RUN_MASKED_KEYS", 0)
            patch.setattr(planner, "ONE_ROW_MASKED_KEYS", 0)
            patch.setattr(planner, "TINY_STRIDE", 0)
            patch.setattr(planner, "TINY_UNION_STRIDE", 0)
            yield
    finally:
        for cache in caches:
            cache.cache_clear()
