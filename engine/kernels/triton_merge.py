"""`merge_to` on CUDA as one Triton kernel: two partials merged in one pass over memory.

The torch ops of `merge_to` are seven launches on CUDA (a subtraction, the sigmoid, its NaN
fix, logaddexp, two float32 copies of half-precision outputs, the lerp), and they move the
outputs through memory five times: for two bfloat16 partials of B = 1, H = 8, n = 131072,
D = 64 (a window and a stride, merged), 1.6 GB read and written, and 0.4 GB more to convert the
float32 result. Here each program reads a tile of rows of both partials in their own dtypes,
weighs them in float32 by their log-sum-exp and writes the result in the output's dtype: 0.4 GB
into bfloat16, one launch. The arithmetic is `merge_to`'s: the weight of b is
sigmoid(lse_b - lse_a), a function of the difference alone (exact at any magnitude), a NaN weight
(both -inf) is 0, and lse is logaddexp(lse_a, lse_b).
"""

from __future__ import annotations

import functools
import logging

import torch

from .device import TRITON_OPTIONS, launching_on, runs_on_triton, triton

if triton is not None:  # without Triton `merge_to` keeps its torch ops everywhere
    import triton.language as tl

logger = logging.getLogger(__name__)

# Widest feature dim a program's tile holds; wider partials keep the torch ops.
MAX_FEATURES = 1024
# Elements of one output tile: rows per program = this / the feature tile.
TILE_ELEMENTS = 4096


def feature_tile(n: int) -> int:
    """A tile width for n features: a power of two of at least 16 (tl.dot's least)."""
    return max(16, 1 << (n - 1).bit_length())


def merge_tiles(features: int) -> dict[str, int]:
    """The merge kernels' tile for partials of `features`: the feature tile, and rows up to
    TILE_ELEMENTS elements."""
    block_d = feature_tile(features)
    return {"BLOCK_R": max(1, TILE_ELEMENTS // block_d), "BLOCK_D": block_d}


def takes(out: torch.Tensor, lse: torch.Tensor, a: tuple[torch.Tensor, torch.Tensor],
          b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether the kernel merges these: where Triton runs (`runs_on_triton`), partials of out's
    shape and up to four dims (views with any strides, a stride-0 one too), float32 lse, some rows
    and features (at most MAX_FEATURES), and the kernel's variant for these dtypes and features
    matching the arithmetic here (`matches_contract`)."""
    (a_out, a_lse), (b_out, b_lse) = a, b
    return (runs_on_triton(out.device) and out.dim() <= 4 and 0 < out.shape[-1] <= MAX_FEATURES and out.numel() > 0
            and a_out.shape == b_out.shape == out.shape and a_lse.shape == b_lse.shape == lse.shape == out.shape[:-1]
            and a_lse.dtype == b_lse.dtype == lse.dtype == torch.float32
            and matches_contract(out.device, a_out.dtype, b_out.dtype, out.dtype, feature_tile(out.shape[-1])))


@functools.cache
def matches_contract(device: torch.device, a_dtype: torch.dtype, b_dtype: torch.dtype, out_dtype: torch.dtype,
                     features: int) -> bool:
    """Whether the kernel's variant for these dtypes and feature tile (`feature_tile`) compiles
    here and merges a tiny problem of that many features as float64 arithmetic does: rows where
    either partial or both saw no key (-inf, zero outputs), log-sum-exps of 2^26 (where a tie must
    weigh 1/2 each), a stride-0 partial. Probed once per variant and device, as fixed's kernel is,
    and so compiling the variant its calls use; a failure keeps the torch ops for those calls (said
    in the log) instead of failing requests or answering wrong."""
    g = torch.Generator().manual_seed(0)
    a_out, b_out = (torch.randn(1, 2, 6, features, generator=g) for _ in range(2))
    a_lse = torch.tensor([0.5, float("-inf"), 2.0**26, float("-inf"), -3.0, 7.0]).repeat(1, 2, 1)
    b_lse = torch.tensor([1.5, 0.25, 2.0**26, float("-inf"), float("-inf"), -40.0]).repeat(1, 2, 1)
    a_out[..., [1, 3], :] = 0.0  # as a partial's rows with no key are
    b_out[..., [3, 4], :] = 0.0
    a_out, b_out = a_out.to(a_dtype), b_out[:, :1].to(b_dtype).expand(-1, 2, -1, -1)
    top = torch.maximum(a_lse, b_lse).double()
    weights = [torch.exp(x.double() - top).nan_to_num(0.0) for x in (a_lse, b_lse)]
    total = weights[0] + weights[1]
    ref_out = (a_out.double() * weights[0][..., None] + b_out.double() * weights[1][..., None]) \
        / total.clamp_min(1e-300)[..., None]
    ref_lse = top + torch.log(total)
    out = torch.empty(a_out.shape, dtype=out_dtype, device=device)
    lse = torch.empty(a_lse.shape, device=device)
    try:
        triton_merge_to(out, lse, (a_out.to(device), a_lse.to(device)), (b_out.to(device), b_lse.to(device)))
    except Exception:  # noqa: BLE001 (any compile or launch error: the torch ops take over)
        logger.warning("the Triton merge failed to run for %s: its torch ops take these merges",
                       _variant_name(device, a_dtype, b_dtype, out_dtype, features), exc_info=True)
        return False
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    matches = (torch.allclose(out.cpu().double(), ref_out, atol=tol, rtol=tol)
               and torch.allclose(lse.cpu().double(), ref_lse, atol=1e-5, rtol=1e-6))
    if not matches:
        logger.warning("the Triton merge differs from float64 arithmetic for %s: its torch ops take these merges",
                       _variant_name(device, a_dtype, b_dtype, out_dtype, features))
    return matches


def _variant_name(device: torch.device, a_dtype: torch.dtype, b_dtype: torch.dtype, out_dtype: torch.dtype,
                  features: int) -> str:
    return f"{a_dtype} and {b_dtype} into {out_dtype} on {device}, a tile of {features} features"


def triton_merge_to(out: torch.Tensor, lse: torch.Tensor, a: tuple[torch.Tensor, torch.Tensor],
                    b: tuple[torch.Tensor, torch.Tensor]) -> None:
    """`merge_to` in one launch: out (any float dtype; a's output itself for an in-place fold)
    and lse float32 get the merge of partials a and b, all of out's shape (lse's without the
    features), up to four dims."""
    (a_out, a_lse), (b_out, b_lse) = a, b
    lead = 4 - out.dim()  # every tensor as [n0, n1, rows, features]
    o, ao, bo = (x[(None,) * lead] for x in (out, a_out, b_out))
    lo, al, bl = (x[(None,) * lead] for x in (lse, a_lse, b_lse))
    n0, n1, rows, d = o.shape
    tiles = merge_tiles(d)
    row_tiles = triton.cdiv(rows, tiles["BLOCK_R"])
    with launching_on(out.device):
        _merge_kernel[(n0 * n1 * row_tiles,)](
            o, lo, ao, al, bo, bl, n1, rows, row_tiles, d,
            *o.stride(), *lo.stride(), *ao.stride(), *al.stride(), *bo.stride(), *bl.stride(), **tiles,
            **TRITON_OPTIONS,
        )


def merge_splits(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The partials of a Triton launch whose keys were split between programs (fixed's decode
    steps), stacked on axis 0 of out [S, ..., D] and lse [S, ...], float32 in C order, merged by
    log-sum-exp in one launch: (out of `dtype`, lse float32) without that axis. A row with no key
    in any split gets zeros and -inf. (`merge_stacked`'s torch ops were six launches, its
    log-sum-exp several more, and the conversion to `dtype` another.)"""
    splits, d = out.shape[0], out.shape[-1]
    rows = lse[0].numel()
    merged = torch.empty(out.shape[1:], dtype=dtype, device=out.device)
    merged_lse = torch.empty(lse.shape[1:], dtype=torch.float32, device=out.device)
    tiles = merge_tiles(d)
    if rows and d:
        with launching_on(out.device):
            _merge_splits_kernel[(triton.cdiv(rows, tiles["BLOCK_R"]),)](out, lse, merged, merged_lse, splits, rows,
                                                                         d, **tiles, **TRITON_OPTIONS)
    return merged, merged_lse


if triton is not None:
    # The lengths and the log-sum-exps' strides and starts vary from call to call: not specialised
    # on (a new length compiles nothing). The head dim and the outputs' strides and starts are, as
    # in fixed's kernel: with a head dim that is a multiple of 16 they are multiples of 16 at every
    # length, and known so, a tile's rows load and store as 16-byte vectors. (Unknown, every
    # element was a 2-byte load of its own, and with each row's indices divided out per element an
    # H200 merged at 137 GB/s, 4-6x slower than the seven launches of `torch_merge_to`.)
    @triton.jit(do_not_specialize=["n1", "rows", "row_tiles", "sl0", "sl1", "sl2", "sal0", "sal1", "sal2",
                                   "sbl0", "sbl1", "sbl2"],
                do_not_specialize_on_alignment=["Lse", "ALse", "BLse"])
    def _merge_kernel(
        Out, Lse, A, ALse, B, BLse, n1, rows, row_tiles, d,
        so0, so1, so2, so3, sl0, sl1, sl2, sa0, sa1, sa2, sa3, sal0, sal1, sal2, sb0, sb1, sb2, sb3,
        sbl0, sbl1, sbl2,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        plane = pid // row_tiles  # one division a program: its [n0, n1] plane, then its tile of rows
        i0, i1 = (plane // n1).to(tl.int64), (plane % n1).to(tl.int64)  # offsets past 2^31 elements
        r = (pid % row_tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = r < rows
        la = tl.load(ALse + i0 * sal0 + i1 * sal1 + r * sal2, mask=row_ok, other=0.0)
        lb = tl.load(BLse + i0 * sbl0 + i1 * sbl1 + r * sbl2, mask=row_ok, other=0.0)
        f = tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (f < d)[None, :]
        a = tl.load(A + (i0 * sa0 + i1 * sa1 + r * sa2)[:, None] + f[None, :] * sa3, mask=ok, other=0.0)
        b = tl.load(B + (i0 * sb0 + i1 * sb1 + r * sb2)[:, None] + f[None, :] * sb3, mask=ok, other=0.0)
        # Every read before any write: a merge in place (out and lse a's own) would otherwise race,
        # as a row's lse is read by threads of one warp and written by another's (an H200 gave
        # fixed's in-place merges errors of 0.3).
        tl.debug_barrier()
        # One exp of a difference <= 0, taken where at most one side is -inf: no inf - inf, no overflow.
        none = (la == float("-inf")) & (lb == float("-inf"))
        la, lb = tl.where(none, 0.0, la), tl.where(none, 0.0, lb)
        b_smaller = la > lb
        hi = tl.where(b_smaller, la, lb)
        share = tl.exp(tl.where(b_smaller, lb, la) - hi)  # e^(lo - hi), in [0, 1]
        weight = tl.where(b_smaller, share, 1.0) / (1.0 + share)  # b's: sigmoid(lb - la)
        weight = tl.where(none | (weight != weight), 0.0, weight)  # NaN only from a NaN lse
        lse = tl.where(none, float("-inf"), hi + tl.log(1.0 + share))
        tl.store(Lse + i0 * sl0 + i1 * sl1 + r * sl2, lse, mask=row_ok)
        a = a.to(tl.float32)
        merged = a + weight[:, None] * (b.to(tl.float32) - a)
        tl.store(Out + (i0 * so0 + i1 * so1 + r * so2)[:, None] + f[None, :] * so3,
                 merged.to(Out.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["splits", "rows"])
    def _merge_splits_kernel(Out, Lse, Merged, MergedLse, splits, rows, d,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = r < rows
        f = tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (f < d)[None, :]
        top = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for split in range(splits):
            top = tl.maximum(top, tl.load(Lse + split * rows + r, mask=row_ok, other=float("-inf")))
        base = tl.where(top == float("-inf"), 0.0, top)  # a row with no key: every weight exp(-inf) = 0
        total = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for split in range(splits):
            weight = tl.exp(tl.load(Lse + split * rows + r, mask=row_ok, other=float("-inf")) - base)
            part = tl.load(Out + (split * rows + r)[:, None] * d + f[None, :], mask=ok, other=0.0)
            total += weight
            acc += weight[:, None] * part
        seen = total > 0.0
        tl.store(Merged + r[:, None] * d + f[None, :], (acc / tl.where(seen, total, 1.0)[:, None]).to(
            Merged.dtype.element_ty), mask=ok)
        tl.store(MergedLse + r, tl.where(seen, top + tl.log(tl.where(seen, total, 1.0)), float("-inf")), mask=row_ok)
