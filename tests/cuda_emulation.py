"""CUDA's branches of the engine on CPU tensors, for machines without a GPU.

The engine asks `engine.kernels.device.kernel_device` which device's kernels and rules to use;
`cuda_kernels_on_cpu` answers 'cuda' for every tensor and puts float64 stand-ins for torch's
three CUDA attention ops as their CPU kernels (which they lack). The dispatcher binds each call
to the op's own schema. Each stand-in refuses what the real kernel refuses (a head dim not a
multiple of 8, flash outside half precision or past 256 features, a causal call that is not
square, misaligned strides or starts, a bias not shaped and aligned as the memory-efficient kernel
reads it, grid axes past 65535; and, stricter than flash itself, fewer key/value heads than query
heads, which the engine repeats on CUDA), and answers what the real op answers in its layout:
flash's and the memory-efficient kernel's outputs as transposed views, the memory-efficient
kernel's log-sum-exp padded to 32 rows with NaN there, NaN for a row that keeps no key (the real
kernels' answer there is unspecified; the engine must not read it). So the planner's CUDA plans
(the flash window, strided in one call, fixed's row ranges, padded head dims, copies of stride-0
views) run here against the float64 reference; `bench/gpu_check.py` runs the same checks on a real GPU.
"""

from __future__ import annotations

import collections
import functools
import importlib
import math
import sys
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode_stack

GRID_LIMIT = 65535  # the CUDA grid's y and z axes, where the kernels put batch and heads
FLASH_MAX_HEAD_DIM = 256
HALF = (torch.float16, torch.bfloat16)


def _alignment(x: torch.Tensor) -> int:
    """Elements per 128-bit access, the unit the CUDA kernels load rows in."""
    return 16 // x.element_size()


def _check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("query", q), ("key", k), ("value", v)):
        assert x.dim() == 4, f"{op}: {name} must be 4-D, got {list(x.shape)}"
        assert x.dtype == q.dtype, f"{op}: {name} is {x.dtype}, query {q.dtype}"
        assert x.stride(-1) == 1, f"{op}: {name}'s features must be adjacent, strides {x.stride()}"
        assert x.shape[-1] % 8 == 0, f"{op}: {name}'s head dim {x.shape[-1]} is not a multiple of 8"
        assert all(s % _alignment(x) == 0 for s in x.stride()[:-1]), f"{op}: {name} misaligned, strides {x.stride()}"
        assert x.data_ptr() % 16 == 0, f"{op}: {name} starts off a 16-byte boundary"
        assert x.shape[0] <= GRID_LIMIT and x.shape[1] <= GRID_LIMIT, f"{op}: {name} {list(x.shape)} past the grid"
    assert q.shape[-1] == k.shape[-1], f"{op}: query and key head dims differ"
    assert k.shape[:2] == v.shape[:2] == q.shape[:2] and k.shape[2] == v.shape[2], \
        f"{op}: batch or heads differ, or key and value lengths: {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"


def _attend(q, k, v, keep: torch.Tensor | None, bias: torch.Tensor | None, scale: float):
    """float64 attention over [B, H, L, D]: (out in q's dtype, lse float32), NaN in both for a row
    that keeps no key."""
    k, v = k.double(), v.double()
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k) * scale
    if bias is not None:
        scores = scores + bias.double()
    if keep is not None:
        scores = scores.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), v)  # relative to the row's max, as kernels do
    empty = torch.isinf(lse) & (lse < 0)
    return out.masked_fill(empty[..., None], math.nan).to(q.dtype), lse.masked_fill(empty, math.nan).float()


def _causal_square(op: str, q: torch.Tensor, k: torch.Tensor, is_causal: bool) -> torch.Tensor | None:
    if not is_causal:
        return None
    assert q.shape[-2] == k.shape[-2], f"{op}: is_causal on {q.shape[-2]} x {k.shape[-2]}: alignment differs by kernel"
    return torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()


def scaled_dot_product_flash_attention(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False,
                                       *, scale=None):
    op = "flash"
    _check_qkv(op, query, key, value)
    assert query.dtype in HALF, f"{op}: {query.dtype} (half precision only)"
    assert query.shape[-1] == value.shape[-1] <= FLASH_MAX_HEAD_DIM, f"{op}: head dims {query.shape[-1]}, {value.shape[-1]}"
    assert dropout_p == 0.0 and not return_debug_mask
    out, lse = _attend(query, key, value, _causal_square(op, query, key, is_causal), None, scale)
    out = out.transpose(1, 2).contiguous().transpose(1, 2)  # the kernel writes [B, L, H, D]
    b, h, lq, _ = query.shape
    empty = torch.empty(0)
    return out, lse, empty, empty, lq, key.shape[2], empty, empty, empty


def scaled_dot_product_cudnn_attention(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0,
                                       is_causal=False, return_debug_mask=False, *, scale=None):
    """cuDNN's attention where the engine calls it (only where torch's SDPA would pick it, which
    checks more): half precision, flash's layout checks; its log-sum-exp [B, H, Lq, 1]."""
    op = "cuDNN"
    _check_qkv(op, query, key, value)
    assert query.dtype in HALF, f"{op}: half precision only, got {query.dtype}"
    assert attn_bias is None and compute_log_sumexp and dropout_p == 0.0 and not return_debug_mask
    out, lse = _attend(query, key, value, _causal_square(op, query, key, is_causal), None, scale)
    out = out.transpose(1, 2).contiguous().transpose(1, 2)  # the kernel writes [B, L, H, D]
    empty = torch.empty(0)
    return out, lse.unsqueeze(-1), empty, empty, query.shape[2], key.shape[2], empty, empty, empty


def scaled_dot_product_efficient_attention(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0,
                                           is_causal=False, *, scale=None):
    op = "memory-efficient"
    _check_qkv(op, query, key, value)
    assert compute_log_sumexp and dropout_p == 0.0
    if attn_bias is not None:
        assert attn_bias.dtype == query.dtype, f"{op}: bias {attn_bias.dtype}, query {query.dtype}"
        expected = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        assert tuple(attn_bias.shape) == expected, f"{op}: bias {list(attn_bias.shape)}, want {list(expected)}"
        assert attn_bias.stride(-1) == 1 and all(s % _alignment(attn_bias) == 0 for s in attn_bias.stride()[:-1]), \
            f"{op}: bias misaligned, strides {attn_bias.stride()}"
    out, lse = _attend(query, key, value, _causal_square(op, query, key, is_causal), attn_bias, scale)
    out = out.transpose(1, 2).contiguous().transpose(1, 2)  # the kernel writes [B, L, H, D] (torch's meta kernel)
    rows = -(-query.shape[2] // 32) * 32
    padded = torch.full((*lse.shape[:2], rows), math.nan)
    padded[..., : lse.shape[2]] = lse
    return out, padded, torch.empty(0), torch.empty(0)


def flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                            return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                            seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None):
    """[B, L, H, D] in and out; query i (bottom-right aligned) sees keys i - left .. i + right."""
    op = "flash (local window)"
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    _check_qkv(op, q, k, v)
    assert query.dtype in HALF and cum_seq_q is None and cum_seq_k is None and seqused_k is None
    assert alibi_slopes is None and block_table is None and dropout_p == 0.0 and not return_debug_mask
    assert max_q == q.shape[2] and max_k == k.shape[2]
    lq, lk = q.shape[2], k.shape[2]
    i = torch.arange(lk - lq, lk)[:, None]
    j = torch.arange(lk)[None, :]
    left = math.inf if window_size_left is None or window_size_left < 0 else window_size_left
    right = 0 if is_causal else math.inf if window_size_right is None or window_size_right < 0 else window_size_right
    out, lse = _attend(q, k, v, (j >= i - left) & (j <= i + right), None, scale)
    empty = torch.empty(0)
    return out.transpose(1, 2), lse, empty, empty, empty


STAND_INS = {
    "_scaled_dot_product_flash_attention": scaled_dot_product_flash_attention,
    "_scaled_dot_product_efficient_attention": scaled_dot_product_efficient_attention,
    "_flash_attention_forward": flash_attention_forward,
    "_scaled_dot_product_cudnn_attention": scaled_dot_product_cudnn_attention,
}


def _device_caches():
    band = importlib.import_module("engine.kernels.band")
    triton_fixed = importlib.import_module("engine.kernels.triton_fixed")
    triton_merge = importlib.import_module("engine.kernels.triton_merge")
    triton_band = importlib.import_module("engine.kernels.triton_band")
    return (band.flash_window_supported, triton_band.matches_contract, triton_fixed.matches_contract,
            triton_merge.matches_contract)


@contextmanager
def kernel_device_answering(name: str) -> Iterator[pytest.MonkeyPatch]:
    """Within the block `kernel_device` answers `name` for every tensor, in each engine module that
    imported it; the per-device probes' caches are cleared before and after."""
    importlib.import_module("engine")
    caches = _device_caches()
    for cache in caches:
        cache.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for module in _engine_modules():
                if hasattr(module, "kernel_device"):
                    patch.setattr(module, "kernel_device", lambda device: name)
            yield patch
    finally:
        for cache in caches:
            cache.cache_clear()


def seeded_variants_failing(monkeypatch: pytest.MonkeyPatch, kernel_module) -> None:
    """Make the seeded variants of a Triton kernel module (triton_band, triton_fixed) fail their
    probe while the plain ones keep theirs: `matches_contract`'s last argument is `seeded`."""
    real = kernel_module.matches_contract

    def plain_only(*args):
        return not args[-1] and real(*args)

    plain_only.cache_clear = real.cache_clear  # `kernel_device_answering` clears the probes' caches
    monkeypatch.setattr(kernel_module, "matches_contract", plain_only)


def _engine_modules() -> list:
    return [m for name, m in sys.modules.items() if name == "engine" or name.startswith("engine.")]


@contextmanager
def cuda_kernels_on_cpu(cudnn: bool = False) -> Iterator[None]:
    """Within the block the engine takes CUDA's branches for CPU tensors, on the stand-ins; with
    `cudnn` as on a GPU where torch's SDPA picks cuDNN's attention for every unmasked half-precision
    call (an H100 or H200), else as where it picks flash."""
    with kernel_device_answering("cuda") as patch:
        patch.setattr(importlib.import_module("engine.kernels.dense"), "sdpa_picks_cudnn", lambda *args: cudnn)
        for module in _engine_modules():
            for name, kernel in _triton_kernels(module):
                patch.setattr(module, name, _OneLaunch(name, kernel))
        patch.setattr(importlib.import_module("engine.kernels.dense"), "_flash_capable", lambda device: True)
        library = torch.library.Library("aten", "IMPL")  # these ops have no CPU kernel of their own
        for name, stand_in in STAND_INS.items():
            library.impl(name, stand_in, "CPU")
        try:
            yield
        finally:
            library._destroy()


# Ops that make a CUDA host wait for the device: a tensor's value read into Python (`int(t)`,
# `bool(t)`, `t.item()`, `t.tolist()`), `nonzero`'s data-dependent size, `equal`.
HOST_SYNCS = frozenset({"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
                        "aten.equal.default", "aten.item.default"})


class OpCount(TorchDispatchMode):
    """Counts the aten ops a block dispatches, those that are not views (each a kernel launch on
    CUDA), and which of them read a value back to the host (`HOST_SYNCS`)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        self.views += func.is_view
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def launches(self) -> int:
        return self.total - self.views

    @property
    def syncs(self) -> dict[str, int]:
        return {op: n for op, n in self.ops.items() if op in HOST_SYNCS}


def _triton_kernels(module) -> list[tuple[str, object]]:
    """The module's Triton kernels, (name, kernel), by the engine's naming: `*_kernel` is launched
    (`kernel[grid](...)`), other jitted functions are called from kernels."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        return []
    return [(name, obj) for name, obj in vars(module).items()
            if isinstance(obj, KernelInterface) and name.endswith("_kernel")]


class _OneLaunch:
    """A Triton kernel counted as the one launch it is on a GPU by any OpCount around it (the
    interpreter's own copies of its arguments to and from the host are not counted), its compile
    key put in any `triton_compiles` set around it."""

    def __init__(self, name: str, kernel):
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for mode in _get_current_dispatch_mode_stack():
                if isinstance(mode, OpCount):
                    mode.ops[f"triton.{self.name}"] += 1
            if _COMPILE_SETS:
                key = compile_key(self.name, self.kernel, args, kwargs)
                for keys in _COMPILE_SETS:
                    keys.add(key)
            with _disable_current_modes():
                return self.kernel[grid](*args, **kwargs)
        return launch


_COMPILE_SETS: list[set[tuple]] = []


@contextmanager
def triton_compiles() -> Iterator[set[tuple]]:
    """The set, filled as the block runs, of the compile keys of its Triton launches (within
    `cuda_kernels_on_cpu`): one per binary a CUDA GPU would compile, so a launch whose key is
    already in it compiles nothing there."""
    keys: set[tuple] = set()
    _COMPILE_SETS.append(keys)
    try:
        yield keys
    finally:
        _COMPILE_SETS.remove(keys)


def compile_key(name: str, kernel, args: tuple, kwargs: dict) -> tuple:
    """(name, specialisation, options) of a launch as Triton keys its compiles on a CUDA GPU: by
    its own binder with the rules NVIDIA's backend keeps from the base one (an int of 1 becomes a
    constant, ints and data pointers divisible by 16 are marked so, unless the kernel says not to),
    the constexprs' values and the compile options."""
    _, specialization, options = _binder(kernel)(*args, **kwargs)
    return name, repr(specialization), repr(sorted(options.items()))


@functools.cache
def _binder(kernel):
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    compiled = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
    return create_function_from_signature(compiled.signature, compiled.params, BaseBackend)


def counted_call(q, k, v, pattern, *, causal: bool = True, cudnn: bool = False) -> tuple[torch.Tensor, OpCount]:
    """(output, its OpCount) of one engine call on CUDA's branches (`cuda_kernels_on_cpu`), after a
    first call that may probe the flash window once."""
    from engine import attention

    with cuda_kernels_on_cpu(cudnn):
        attention(q, k, v, pattern, causal=causal)
        with OpCount() as count:
            out = attention(q, k, v, pattern, causal=causal)
    return out, count
