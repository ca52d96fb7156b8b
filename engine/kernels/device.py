"""Which device's kernels and rules the engine uses, and what it may do there: read values back
on the host, run a Triton kernel. Every device branch of the engine asks here, so one patch of
`kernel_device` runs CUDA's branches on CPU tensors (tests/cuda_emulation.py)."""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
except ImportError:  # a CPU install without Triton: the engine's Triton kernels give way to torch ops
    triton = None

# Options every launch of the engine's Triton kernels passes, rather than Triton's defaults: fused
# multiply-adds, as the kernels were checked with. Triton 3.9 warns that its default turns them off
# in 3.10; explicit, a Triton upgrade changes neither the results nor the speed behind our backs.
TRITON_OPTIONS = {"enable_fp_fusion": True}


def kernel_device(device: torch.device) -> str:
    """The device type whose kernels and rules the engine uses for tensors on `device`: its own
    ('cpu', 'cuda'; any other runs `math_attention`)."""
    return device.type


def values_on_host(device: torch.device) -> bool:
    """Whether the host may read a tensor's values on `device` to skip work (`bool(t.any())`): on
    the CPU it costs nothing; on CUDA it waits for every queued kernel, so there the kernels decide
    from shapes alone, or do the work."""
    return kernel_device(device) == "cpu"


def runs_on_triton(device: torch.device) -> bool:
    """Whether Triton can run the engine's kernels on tensors on `device`: CUDA's rules (the
    engine's `kernel_device`) and Triton there to compile a kernel, or to interpret it."""
    if triton is None or kernel_device(device) != "cuda":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def launching_on(device: torch.device):
    """A context in which a Triton kernel launches on `device`: Triton launches on the current CUDA
    device, so a tensor on another (cuda:1 while cuda:0 is current) makes it current for the launch.
    Entered only then: on the H200's host `torch.cuda.device`'s device lookups took 37 of the
    band's 240 us of host time a launch under cProfile."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
