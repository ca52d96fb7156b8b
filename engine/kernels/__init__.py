"""Exact attention kernels; each takes [B, H, L, D] tensors, queries bottom-right aligned, and
returns (out, lse) with a float32 log-sum-exp of shape [B, H, Lq]. K and V have q's head count,
or fewer: on the CPU always (torch's CPU kernel reads key/value head h // (H / Hkv) for query head
h), on CUDA where a plan says its kernels take them as they are (`Plan.grouped_kv_on_cuda`: fixed's
and the band's Triton kernels do so).

Importing them raises glibc's malloc thresholds (allocator.py) so that each call's outputs reuse
freed memory instead of page-faulting fresh mappings."""

from .band import band_attention
from .dense import dense_attention
from .fixed import fixed_attention
from .masked import masked_attention
from .merge import merge_partials
from .strided import strided_attention
from .union import band_strided_attention
from .allocator import keep_freed_memory

KEEPS_FREED_MEMORY = keep_freed_memory()

__all__ = [
    "KEEPS_FREED_MEMORY",
    "band_attention",
    "band_strided_attention",
    "dense_attention",
    "fixed_attention",
    "masked_attention",
    "merge_partials",
    "strided_attention",
]
