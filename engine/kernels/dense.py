"""Dense attention on the device's fused kernel, returning the log-sum-exp every merge needs.

`diagonal` generalises the causal mask: query row m attends keys 0..m + diagonal. The
contract's bottom-right causal alignment is `diagonal = Lk - Lq`; a strictly-lower mask is
`diagonal = -1`. Rows that attend no key come back as zeros with a log-sum-exp of -inf.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from . import span_kernel
from .device import kernel_device, values_on_host
from .merge import join_rows, merge_partials

NEG_INF = float("-inf")
# torch's CPU flash kernel computes a call's query rows 32 at a time below this many rows (64 at a
# time from here, 256 from 768), each over every key of the call: calls of fewer rows read their
# keys more often per row, and a call of at most CPU_QUERY_BLOCK_ROWS reads each key once.
CPU_SMALL_CALL_ROWS = 192
CPU_QUERY_BLOCK_ROWS = 32
# From this many query rows it computes them 256 at a time against key blocks of 512, and skips the
# blocks past a causal call's diagonal itself: a causal square of that many rows needs no chunks.
CPU_CAUSAL_SKIP_ROWS = 768
# The memory-efficient kernel reads a bias whose rows start a multiple of this many elements apart.
BIAS_ROW_ALIGNMENT = 16


def same_head_dim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Fused kernels want one head size: zero-pad the smaller (zeros change no dot product)."""
    d, dv = q.shape[-1], v.shape[-1]
    if d == dv:
        return q, k, v
    width = max(d, dv)
    return F.pad(q, (0, width - d)), F.pad(k, (0, width - d)), F.pad(v, (0, width - dv))


@functools.cache
def cpu_upcast_dtypes() -> frozenset[torch.dtype]:
    """Half precisions that torch's CPU attention kernels run slower than float32 on this CPU.

    Without AMX, on an AVX-512 machine, float16 took 1.6-3.8x and bfloat16 1.1-1.6x the float32
    time (strided(64) and (128), n = 4096 and 16384), while converting the inputs to float32 costs
    1-10% of a call (`python -m bench.kernels` reports the bfloat16 / float32 ratio). With AMX the
    native kernels are the fast ones."""
    amx_fp16 = getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)()
    amx_bf16 = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return frozenset(dtype for dtype, native in ((torch.float16, amx_fp16), (torch.bfloat16, amx_bf16)) if not native)


def cpu_native_half(dtype: torch.dtype) -> bool:
    """Whether `dtype` is a half precision that torch's CPU kernels run natively here (AMX), where
    matrix products cost little beside each call's fixed work: fewer, larger calls pay."""
    return dtype in (torch.float16, torch.bfloat16) and dtype not in cpu_upcast_dtypes()


def computed_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype torch's attention kernels compute x in here: float32 for a half precision that is
    slow on this CPU (`cpu_upcast_dtypes`), else x's own."""
    return torch.float32 if x.dtype in cpu_upcast_dtypes() and kernel_device(x.device) == "cpu" else x.dtype


def as_computed(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as torch's attention kernels here compute them: on a CPU where half precision
    is slow (`cpu_upcast_dtypes`), float32 copies of those in it (`_in_float32`), else the tensors
    themselves (float32 ones too: fixed's summary keys, shared by a stride-0 view)."""
    return tuple(_in_float32(x) if computed_dtype(x) != x.dtype else x for x in tensors)


def _in_float32(x: torch.Tensor) -> torch.Tensor:
    """A float32 copy of x in C order, where an axis of stride 0 (one key/value head repeated for
    several query heads) stays one: its rows are converted once, and `fused` reads that head once.
    C order: `float()` keeps a layout ordered by strides, which those of size-1 dims (any value, all
    "contiguous") can make absurd: a [1, 2, 1, 3] view of strides (1, 0, 1, 1) came out (1, 1, 1, 2),
    features 2 apart, which the CPU kernel reads wrong. A view whose rows lie apart is gathered in
    its own dtype first: converting straight from one took 1.7x as long (25 rows' stride classes of
    65536 bfloat16 keys, H = 8: 6.5 ms, 3.7 so); one whose rows are adjacent (heads apart: per_head's
    groups) converts straight, in 0.62-0.64 of the time (4 of 8 heads of 8192 bfloat16 rows, D = 64)."""
    repeated = [axis for axis, (size, stride) in enumerate(zip(x.shape[:-2], x.stride()[:-2]))
                if size > 1 and not stride]
    base = x
    for axis in repeated:
        base = base.narrow(axis, 0, 1)
    converted = (base if _rows_adjacent(base) else base.contiguous()).to(torch.float32,
                                                                         memory_format=torch.contiguous_format)
    return converted.expand(x.shape) if repeated else converted


def _rows_adjacent(x: torch.Tensor) -> bool:
    """Whether each row of x's last two axes starts where the one before it ends."""
    return x.dim() < 2 or x.shape[-2] <= 1 or x.stride(-2) == x.shape[-1] and x.stride(-1) == 1


def fused(q, k, v, *, scale: float, is_causal: bool, mask: torch.Tensor | None = None):
    """One fused call; (out, lse) with lse float32 [B, H, Lq]. `is_causal` only on square
    problems (there top-left and bottom-right alignment agree); `mask` is an additive
    [Lq, Lk] tensor of q's dtype shared by every batch item and head, or [1, H, Lq, Lk].
    It computes `as_computed`, on copies of just what it reads; what many calls share is
    converted once beforehand (a long run's q, k, v by its plan, the band's windowed keys, fixed's
    summary keys)."""
    assert not is_causal or q.shape[-2] == k.shape[-2], "is_causal is only used on square problems"
    dv = v.shape[-1]
    if q.numel() == 0 or k.shape[-2] == 0:  # torch's CPU kernel dies (SIGFPE) on no query or no key
        return empty_partial(q, dv)
    if k.shape[1] != q.shape[1] and is_causal and kernel_device(q.device) != "cpu":
        # Fused kernels but the CPU's take equal heads only: the causal square as a mask, so the heads fold
        is_causal, mask = False, causal_mask(q.shape[-2], q.dtype, q.device)
    if k.shape[1] > 1 and k.stride(1) == v.stride(1) == 0:  # one key/value head repeated: that head
        k, v = k[:, :1], v[:, :1]
    if k.shape[1] != q.shape[1] and not is_causal and (mask is None or mask.dim() == 2):
        return _query_heads_as_rows(q, k, v, scale=scale, mask=mask)
    q, k, v = same_head_dim(q, k, v)
    q, k, v = as_computed(q, k, v)
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    device = kernel_device(q.device)
    if device == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale
        )
    elif device == "cuda":
        out, lse = _fused_cuda(q, k, v, scale=scale, is_causal=is_causal, mask=mask)
    else:
        out, lse = math_attention(q, k, v, scale=scale, is_causal=is_causal, mask=mask)
    return without_padding(out, dv), lse.float()


def _query_heads_as_rows(q, k, v, *, scale: float, mask: torch.Tensor | None):
    """`fused` for fewer key/value heads than query heads, where every head's rows see the same keys
    (no causal diagonal, a mask shared by the heads): each key/value head's H / Hkv query heads as
    more rows of it, one call with equal heads. K and V are then read once per key/value head, not
    once per query head as torch's CPU kernel maps them (a decode row, H = 32 over 8, D = 128:
    Lk 4096 7.5 -> 3.4 ms, 16384 52 -> 13 ms), and CUDA's kernels, which take equal heads only, need
    no repeated copies of them."""
    b, h, lq, d = q.shape
    group = h // k.shape[1]
    if mask is not None and mask.shape[0] > 1:  # row i's mask for each head's row i
        mask = mask.repeat(group, 1)
    out, lse = fused(q.reshape(b, k.shape[1], group * lq, d), k, v, scale=scale, is_causal=False, mask=mask)
    return out.reshape(b, h, lq, out.shape[-1]), lse.reshape(b, h, lq)


def without_padding(out: torch.Tensor, dv: int) -> torch.Tensor:
    """`out` without the features past `dv` that `same_head_dim` or `padded_head_dims` added; out
    itself when there are none (a view is host time, which a decode step's call is mostly)."""
    return out if out.shape[-1] == dv else out[..., :dv]


# Masks of at most this many elements are kept for the next call of their shape (the last
# SMALL_MASKS_KEPT of each kind, `kept_when_small`): building one from its rule can cost more than
# a small call. union(sliding 16, fixed(16, 2)) on the masked kernel, H = 8, D = 64, n = 32 / 64 /
# 128: 314 / 505 / 1028 us a call building its mask, 133 / 272 / 561 us with it kept; the band's
# mask was 50 of a 210 us decode step (sliding_window(256), Lk 1024, H = 8).
SMALL_MASK_ELEMENTS = 1 << 16
SMALL_MASKS_KEPT = 256


def kept_when_small(elements: Callable[..., int]):
    """Decorator for a mask builder: its results are kept (an LRU of SMALL_MASKS_KEPT) for
    arguments whose mask has at most SMALL_MASK_ELEMENTS elements, as `elements(*args)` counts
    them, and built afresh otherwise. A kept mask is shared: callers never write to it."""
    def decorate(build):
        kept = functools.lru_cache(maxsize=SMALL_MASKS_KEPT)(build)

        @functools.wraps(build)
        def mask(*args):
            return (kept if elements(*args) <= SMALL_MASK_ELEMENTS else build)(*args)

        mask.kept = kept
        return mask
    return decorate


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fused kernels' form of a boolean `keep`: 0 where kept, -inf elsewhere; on CUDA in
    `bias_rows`, as the memory-efficient kernel reads a bias (built so once for a kept mask, not
    copied so at every call)."""
    if kernel_device(keep.device) == "cuda":
        mask = bias_rows(keep.shape, dtype, keep.device).zero_()
    else:
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return mask.masked_fill_(~keep, NEG_INF)


@kept_when_small(lambda rows, dtype, device: rows * rows)
def causal_mask(rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[rows, rows] additive mask: row r keeps keys 0 .. r (a causal square for a call that folds
    grouped query heads into rows, which `is_causal` cannot say)."""
    return additive_mask(torch.ones(rows, rows, dtype=torch.bool, device=device).tril(), dtype)


def bias_rows(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of `shape` whose rows start BIAS_ROW_ALIGNMENT elements apart, as the
    memory-efficient kernel reads a bias (SDPA's own preprocess_mask pads one so): a view of padded
    rows."""
    pitch = -(-shape[-1] // BIAS_ROW_ALIGNMENT) * BIAS_ROW_ALIGNMENT
    return torch.empty((*shape[:-1], pitch), dtype=dtype, device=device)[..., : shape[-1]]


def fused_masked(q, k, v, keep: torch.Tensor | None, *, scale: float):
    """One fused call where `keep`, a boolean [Lq, Lk] shared by every batch item and head (or one
    that broadcasts to [B, H, Lq, Lk]), says which keys each row attends (None: every key); rows
    that keep none come back as zeros with lse -inf (whatever the kernel makes of a row with no key)."""
    if keep is None:
        return fused(q, k, v, scale=scale, is_causal=False)
    return fused_under(q, k, v, additive_mask(keep, q.dtype), ~keep.any(-1), scale=scale)


def fused_under(q, k, v, mask: torch.Tensor | None, empty_rows: torch.Tensor | None, *, scale: float):
    """`fused_masked` with its mask built beforehand (one kept for the next call, `kept_when_small`):
    the additive `mask` and its rows that keep no key, `empty_rows`, which come back as zeros with
    lse -inf; both None: every key."""
    out, lse = fused(q, k, v, scale=scale, is_causal=False, mask=mask)
    if empty_rows is None:
        return out, lse
    if values_on_host(empty_rows.device) and not bool(empty_rows.any()):
        return out, lse
    return out.masked_fill(empty_rows[..., None], 0.0), lse.masked_fill(empty_rows, NEG_INF)


def flash_supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the CUDA flash kernel takes these inputs: half precision, head dims (the larger of
    q's and v's, both padded to it) at most 256, and a GPU of compute capability 8.0 or newer."""
    return (kernel_device(q.device) == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
            and max(q.shape[-1], v.shape[-1]) <= 256 and _flash_capable(q.device))


@functools.cache
def _flash_capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def pad_head_dim(x: torch.Tensor) -> torch.Tensor:
    """The CUDA kernels want head dims that are multiples of 8: zero columns change nothing."""
    extra = -x.shape[-1] % 8
    return F.pad(x, (0, extra)) if extra else x


def cuda_operand(x: torch.Tensor) -> torch.Tensor:
    """x as the CUDA kernels load it, in 16-byte units along every axis: the head dim padded to a
    multiple of 8 (`pad_head_dim`); the strides of size-1 axes, which torch lets be anything and
    the kernels still check, set to one unit (a view); a copy when another stride or the start is
    off the unit (a view of odd row pitch) or the features are not adjacent."""
    x = pad_head_dim(x)
    unit = 16 // x.element_size()
    strides = tuple(stride if size > 1 else unit for size, stride in zip(x.shape[:-1], x.stride()[:-1])) + (1,)
    if x.stride(-1) != 1 or x.storage_offset() % unit or any(stride % unit for stride in strides[:-1]):
        return x.clone(memory_format=torch.contiguous_format)
    return x if strides == x.stride() else x.as_strided(x.shape, strides)


def repeated_operand(x: torch.Tensor) -> torch.Tensor:
    """x, a view that repeats rows with stride 0 (one key/value head for several query heads,
    rows shared by every summary offset), as the kernels take it: the view itself on the CPU; a
    copy on CUDA, whose kernels such views are untried on."""
    return x if kernel_device(x.device) == "cpu" else x.contiguous()


def per_query_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """K or V [B, Hkv, L, D] with each key/value head repeated for its query heads (query head i
    reads key/value head i // (H / Hkv)): a copy, for the kernels or steps that take equal heads
    only (on CUDA; elementwise use of a few rows); x itself where the heads are already equal."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def padded_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v with one head dim, a multiple of 8, as the CUDA kernels want (zero columns change
    no score and add only zero output columns): padded once, before any kernel builds views that
    repeat rows (the band's overlapping windows, fixed's shared summary keys), which a pad per
    call would write out whole."""
    q, k, v = same_head_dim(q, k, v)
    return pad_head_dim(q), pad_head_dim(k), pad_head_dim(v)


def cuda_bias(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A 2-D additive mask as the memory-efficient kernel wants its bias (what SDPA's own
    preprocess_mask does): 4-D, broadcast over batch and heads by stride 0, rows aligned
    (BIAS_ROW_ALIGNMENT): a copy unless they are (`additive_mask` builds masks so on CUDA)."""
    if mask.stride(-1) != 1 or any(x % BIAS_ROW_ALIGNMENT for x in (mask.stride(-2), mask.storage_offset())):
        mask = bias_rows(mask.shape, mask.dtype, mask.device).copy_(mask)
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


# The fused CUDA kernels launch one grid with the batch and head axes on its y and z dimensions,
# each at most 65535 long (pytorch/pytorch#142228): the kernels here put query blocks, classes or
# tiles on those axes, so longer ones go in slices.
CUDA_GRID_LIMIT = 65535


def within_grid(call: Callable, q, k, v, mask: torch.Tensor | None, limit: int = CUDA_GRID_LIMIT):
    """call(q, k, v, mask) -> (out, lse) on slices of the batch and head axes at most `limit`
    long (a 4-D mask sliced alike where it is not broadcast), the results joined."""
    for dim in (0, 1):
        if q.shape[dim] > limit:
            pieces = []
            for at in range(0, q.shape[dim], limit):
                size = min(limit, q.shape[dim] - at)
                part = mask.narrow(dim, at, size) if mask is not None and mask.dim() == 4 and mask.shape[dim] > 1 \
                    else mask
                pieces.append(within_grid(call, *(x.narrow(dim, at, size) for x in (q, k, v)), part, limit))
            return torch.cat([out for out, _ in pieces], dim), torch.cat([lse for _, lse in pieces], dim)
    return call(q, k, v, mask)


def _fused_cuda(q, k, v, *, scale: float, is_causal: bool, mask: torch.Tensor | None):
    return within_grid(functools.partial(_fused_cuda_call, scale=scale, is_causal=is_causal), q, k, v, mask)


def sdpa_picks_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float) -> bool:
    """Whether torch's own SDPA would run these unmasked inputs on cuDNN's attention: its checks of
    GPU, shapes and layouts, its order of preference and the user's `torch.backends.cuda` switches
    decide, not ours (cuDNN's kernel, called directly, checks little). Where it would, the engine
    calls the same kernel for the log-sum-exp SDPA does not return."""
    return torch._fused_sdp_choice(q, k, v, None, 0.0, is_causal, scale=scale) == SDPBackend.CUDNN_ATTENTION.value


def _fused_cuda_call(q, k, v, mask: torch.Tensor | None, *, scale: float, is_causal: bool):
    d = q.shape[-1]
    q, k, v = cuda_operand(q), cuda_operand(k), cuda_operand(v)
    if mask is None and flash_supported(q, v) and sdpa_picks_cudnn(q, k, v, is_causal, scale):
        # Returns (output, logsumexp [B, H, Lq, 1], cum_seq_q, cum_seq_k, max_q, max_k, ...).
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, is_causal, False,
                                                                     scale=scale)[:2]
        lse = lse.reshape(q.shape[:-1])
    elif mask is None and flash_supported(q, v):
        # Returns (output, logsumexp [B, H, Lq], cum_seq_q, cum_seq_k, max_q, max_k, ...).
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[:2]
    else:
        # Returns (output, log_sumexp [B, H, Lq rounded up to 32], philox_seed, philox_offset).
        bias = None if mask is None else cuda_bias(mask.to(q.dtype), q, k)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, is_causal, scale=scale
        )[:2]
        lse = lse[..., : q.shape[-2]]
    return out[..., :d], lse


def math_attention(q, k, v, *, scale: float, is_causal: bool = False, mask: torch.Tensor | None = None):
    """Plain float32 attention with lse; for devices without a fused kernel."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.float()
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min)).nan_to_num(0.0)
    return torch.matmul(probs, v.float()).to(q.dtype), lse


def empty_partial(q: torch.Tensor, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial result of attending no key at all."""
    out = q.new_zeros(*q.shape[:-1], dv)
    return out, torch.full(q.shape[:-1], NEG_INF, dtype=torch.float32, device=q.device)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    diagonal: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention over [B, H, L, D] tensors (fewer key/value heads on the CPU, as the package says).

    `diagonal=None` attends every key; an int d lets row m attend keys 0..m + d. On the CPU's span
    kernel where it takes q, k and v (`_span_dense`), but half precision that torch's kernel runs
    natively (AMX; against the span kernel there: not measured), else in torch's fused calls.
    """
    lq, lk, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    if lq == 0 or lk == 0:
        return empty_partial(q, dv)
    if not cpu_native_half(q.dtype) and span_kernel.takes(q, k, v):
        return _span_dense(q, k, v, scale=scale, diagonal=diagonal)
    if diagonal is None or diagonal >= lk - 1:
        return fused(q, k, v, scale=scale, is_causal=False)
    if diagonal < 0:
        # Rows 0..-d-1 see nothing; the rest form a top-left causal problem on shifted keys.
        skip = min(lq, -diagonal)
        head = empty_partial(q[..., :skip, :], dv)
        if skip == lq:
            return head
        tail = dense_attention(q[..., skip:, :], k, v, scale=scale, diagonal=0)
        return join_rows([head, tail])
    # 0 <= d < lk - 1: keys [0, d) are seen by every row; the next ones form a causal triangle.
    rows = min(lq, lk - diagonal)
    parts = []
    tri_q = q[..., :rows, :]
    tri = fused(tri_q, k[..., diagonal : diagonal + rows, :], v[..., diagonal : diagonal + rows, :], scale=scale, is_causal=True)
    if diagonal > 0:
        prefix = fused(tri_q, k[..., :diagonal, :], v[..., :diagonal, :], scale=scale, is_causal=False)
        tri = merge_partials([prefix, tri], q.dtype)  # rounded once, as the output would be
    parts.append(tri)
    if rows < lq:  # rows whose diagonal runs past the last key see every key
        parts.append(fused(q[..., rows:, :], k, v, scale=scale, is_causal=False))
    return join_rows(parts)


# Query rows a thread takes at a time in `_span_dense`: threads share a call's work whatever its
# heads (one head of 4096 rows, float32: 11.7 ms against 21.5 in strips of a head's rows whole).
DENSE_STRIP_ROWS = 256
# Up to this many query rows `_span_dense` reads a key/value head's keys once for all its query
# heads (rows of it, in a copy of q). Folded / unfolded, float32 and bfloat16, H = 32 over 8 at
# D = 128 after 8192 keys and H = 8 over 2 after 16384: 4 rows 0.38-0.82, 16 rows 0.73-0.79, 64 rows
# 0.84-0.94, 256 rows 0.98-1.00; prefills at n = 1024 and 2048 1.01-1.05 (one row: a view, either way).
DENSE_FOLDED_ROWS = 64


def _span_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, diagonal: int | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`dense_attention` on the span kernel: every row's keys (those up to its diagonal) in one call,
    read in their own dtype (half precision unconverted), fewer key/value heads as they are, and
    for a short run of rows (DENSE_FOLDED_ROWS) a key/value head's query heads as rows of it, so
    that its keys are read once for them, where that leaves enough units of work
    (`span_kernel.folding_pays`). Against torch's fused calls (the engine's dense plan
    before, on an AMD EPYC; H = 8, D = 64 unless said): causal prefills 0.59-0.79 of the time in
    float32 (n = 1024 to 4096, D = 40 to 128, H = 8 over 2), 0.43-0.57 in bfloat16; without causality
    0.64-0.86 and 0.60-0.68; one row after 4096 or 16384 keys 0.41-0.45 in float32, 0.13-0.16 in
    bfloat16 (H = 32 over 8, D = 128: 0.58 and 0.32); 4 to 256 rows after them 0.33-0.81 and
    0.27-0.48."""
    b, h, lq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    group = h // hkv
    folded = 1 < group and lq <= DENSE_FOLDED_ROWS and span_kernel.folding_pays(hkv, lq, group, k.shape[-2])
    # Folded, rows [B, Hkv, Lq * H / Hkv]: row i of each of a key/value head's query heads in turn,
    # all at position i (rows_per_step H / Hkv).
    rows = swapped_axes(q, (b, hkv, group, lq, d), (b, hkv, lq * group, d)) if folded else q
    out = q.new_empty(*rows.shape[:-1], dv)
    lse = q.new_empty(rows.shape[:-1], dtype=torch.float32)
    if diagonal is None:  # every key
        last, shift = span_kernel.UNBOUNDED, 0
    else:  # row i anchored at i + d, seeing keys up to it (d >= 0); or at i, seeing keys up to i + d
        last, shift = (0, diagonal) if diagonal >= 0 else (diagonal, 0)
    per_position = group if folded else 1  # rows at each position
    span_kernel.span_attention(rows, k, v, out, lse, first=-span_kernel.UNBOUNDED, last=last,
                               row_shift=shift * per_position, rows_per_step=per_position, scale=scale,
                               strip_rows=DENSE_STRIP_ROWS)
    if not folded:
        return out, lse
    return (swapped_axes(out, (b, hkv, lq, group, dv), (b, h, lq, dv)),
            swapped_axes(lse, (b, hkv, lq, group), (b, h, lq)))


def swapped_axes(x: torch.Tensor, split: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """x viewed as `split`, its axes 2 and 3 swapped, viewed as `shape` (a key/value head's query
    heads folded into rows and back): a single view where either axis is 1 long (a decode row, or
    as many key/value heads as query heads), since a decode step's calls are mostly host time."""
    if split[2] == 1 or split[3] == 1:
        return x.reshape(shape)
    return x.reshape(split).transpose(2, 3).reshape(shape)
