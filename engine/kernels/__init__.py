"""Exact attention kernels; each takes [B, H, L, D] tensors with equal head counts, queries
bottom-right aligned, and returns (out, lse) with a float32 log-sum-exp of shape [B, H, Lq]."""

from .band import band_attention
from .dense import dense_attention, math_attention
from .fixed import fixed_attention
from .masked import masked_attention
from .merge import merge_partials
from .strided import strided_attention
from .union import band_strided_attention

__all__ = [
    "band_attention",
    "band_strided_attention",
    "dense_attention",
    "fixed_attention",
    "masked_attention",
    "math_attention",
    "merge_partials",
    "strided_attention",
]
