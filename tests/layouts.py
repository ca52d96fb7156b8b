"""Layouts the engine's Triton kernels must read as they are."""

from __future__ import annotations

import torch

# Elements between consecutive rows of `far_apart_rows`: 1025 of them span 2^31 + 2^21.
ROW_PITCH = 1 << 21


def far_apart_rows(values: torch.Tensor) -> torch.Tensor:
    """values [L, D] as a [1, 1, L, D] view whose rows lie ROW_PITCH elements apart in one storage
    (for L > 1024, offsets past 2^31 elements, where 32-bit offsets wrap). The storage (8.6 GB
    virtual for bfloat16 at L = 2048) is allocated untouched: only the rows' pages are written."""
    rows, features = values.shape
    storage = torch.empty((rows - 1) * ROW_PITCH + features, dtype=values.dtype)
    view = storage.as_strided((1, 1, rows, features), (0, 0, ROW_PITCH, 1))
    view[0, 0] = values
    return view
