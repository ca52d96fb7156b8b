"""Tensors on the wire (CONTRACT §2), one way for the service and its client alike: the dtype
names, each dtype's raw little-endian bytes, and a tensor object in each encoding."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pybase64
import torch

DTypeName = Literal["float32", "float16", "bfloat16"]
Encoding = Literal["b64", "data", "binary"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
# numpy's reading of each dtype's bytes; numpy has no bfloat16, so its 16 raw bits.
STORAGE: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<i2")}


def encoding_problem(dtype: str, encoding: str) -> str | None:
    """Why a tensor of `dtype` cannot travel as `encoding`, or None: JSON numbers hold no bfloat16."""
    if dtype == "bfloat16" and encoding == "data":
        return "bfloat16 travels only as b64 or binary"
    return None


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes in C order (little-endian, as on every host torch runs on). Flattened
    first: torch calls a tensor with size-1 dims contiguous whatever their strides (an lse
    [B, H, 1] may have a last stride of H), and a byte view wants a last stride of 1."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def tensor_object(t: torch.Tensor, encoding: Encoding) -> dict[str, Any]:
    """The contract's tensor object for a CPU tensor of a wire dtype: its shape, dtype and values
    as `b64` or `data`, or for "binary" their size (the bytes, `tensor_bytes`, travel after the header)."""
    tensor: dict[str, Any] = {"shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype]}
    if encoding == "binary":
        tensor["binary_data_size"] = t.numel() * t.element_size()
    elif encoding == "b64":
        tensor["b64"] = pybase64.b64encode(tensor_bytes(t)).decode("ascii")
    else:
        tensor["data"] = t.float().reshape(-1).tolist()
    return tensor


def tensor_of(values: np.ndarray, dtype: str) -> torch.Tensor:
    """The torch tensor whose bytes numpy read as `STORAGE[dtype]` (shared, not copied)."""
    return torch.from_numpy(values).view(DTYPES[dtype])
