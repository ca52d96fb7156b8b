"""The CUDA emulation itself (`cuda_emulation`): its stand-ins refuse what the CUDA kernels refuse,
leave nothing behind, and the engine's CUDA plans reach them. The engine's own checks on CUDA's
branches are the third pass of test_engine_reference.py and test_engine_properties.py."""

from __future__ import annotations

import math

import pytest
import torch

from cuda_emulation import counted_call, cuda_kernels_on_cpu
from planner_support import structured_at_every_size
from engine import attention
from engine.kernels import triton_fixed
from reference import reference_attention

TRITON = triton_fixed.triton is not None
FLASH = "aten._scaled_dot_product_flash_attention.default"
EFFICIENT = "aten._scaled_dot_product_efficient_attention.default"
FLASH_WINDOW = "aten._flash_attention_forward.default"


def _flash(q, k, v, causal=False):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=0.5)


def _efficient(q, k, v, bias=None):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=0.5)


@pytest.mark.parametrize("call, message", [
    (lambda: _flash(*[torch.randn(1, 2, 5, 8)] * 3), "half precision only"),
    (lambda: _flash(*[torch.randn(1, 2, 5, 12, dtype=torch.bfloat16)] * 3), "not a multiple of 8"),
    (lambda: _flash(torch.randn(1, 2, 5, 8, dtype=torch.bfloat16), *[torch.randn(1, 2, 7, 8, dtype=torch.bfloat16)] * 2,
                    causal=True), "is_causal on 5 x 7"),
    (lambda: _flash(*[torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)[..., ::2]] * 3), "features must be adjacent"),
    (lambda: _efficient(*[torch.randn(1, 2, 5, 8)] * 3, bias=torch.zeros(5, 5).expand(1, 2, 5, 5)), "bias misaligned"),
    (lambda: _efficient(*[torch.randn(1, 2, 5, 8)] * 3, bias=torch.zeros(1, 1, 5, 16)[..., :5]), "want [1, 2, 5, 5]"),
    (lambda: _flash(torch.randn(1, 4, 5, 8, dtype=torch.bfloat16), *[torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)] * 2),
     "heads differ"),  # the engine repeats grouped key/value heads on CUDA
    (lambda: _efficient(torch.randn(1, 2, 5, 8), *[torch.randn(81)[1:].view(1, 2, 5, 8)] * 2), "starts off"),
])
def test_stand_ins_refuse_what_the_cuda_kernels_refuse(call, message):
    with cuda_kernels_on_cpu(), pytest.raises(AssertionError, match=message.replace("[", r"\[")):
        call()


def test_stand_ins_answer_in_the_kernels_layouts_and_leave_nothing_behind():
    q = torch.randn(1, 2, 5, 8)
    with cuda_kernels_on_cpu():
        efficient_out, lse, *_ = _efficient(q, q, q)
        out, *_ = _flash(*[q.bfloat16()] * 3)
    assert lse.shape == (1, 2, 32) and torch.isnan(lse[..., 5:]).all() and not torch.isnan(lse[..., :5]).any()
    for x in (out, efficient_out):
        assert not x.is_contiguous() and x.transpose(1, 2).is_contiguous()  # [B, L, H, D] memory
    with pytest.raises(NotImplementedError):
        _efficient(q, q, q)


SW, ST = {"type": "sliding_window", "window": 32}, {"type": "strided", "stride": 16}
FX = {"type": "fixed", "block": 16, "summary": 2}


@pytest.mark.parametrize("pattern, dtype, kernels", [
    # the band is one Triton launch (tests/test_triton_band.py); without Triton the flash kernel's
    # local window
    (SW, torch.bfloat16, {} if TRITON else {FLASH_WINDOW: 1}),
    (SW, torch.float32, {EFFICIENT: 3}),  # float32: the first rows, the tiles, the last short tile
    (ST, torch.bfloat16, {FLASH: 1}),  # every class in one causal call
    # one Triton launch, no SDPA call (tests/test_triton_fixed.py); without Triton its own blocks
    # and the summary keys in 4 row ranges
    (FX, torch.bfloat16, {} if TRITON else {FLASH: 1, EFFICIENT: 4}),
    # the stride past the window
    ({"type": "union", "patterns": [SW, ST]}, torch.bfloat16, {FLASH: 1} if TRITON else {FLASH_WINDOW: 1, FLASH: 1}),
])
def test_cuda_plans_reach_the_cuda_kernels(pattern, dtype, kernels):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 320, 20, generator=g).to(dtype) for _ in range(3))
    out, count = counted_call(q, k, v, pattern)
    assert {op: n for op, n in count.ops.items() if op in (FLASH, EFFICIENT, FLASH_WINDOW)} == kernels
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, pattern)[0], atol=tol, rtol=tol)
    assert not math.isnan(out.float().sum())


CUDNN = "aten._scaled_dot_product_cudnn_attention.default"


@pytest.mark.parametrize("pattern, causal, kernels", [
    (None, True, {CUDNN: 1}), (None, False, {CUDNN: 1}),
    (ST, True, {CUDNN: 1}), (ST, False, {CUDNN: 1}),  # every class in one call
    # the band on its Triton kernel (or flash's local window), the stride past it on cuDNN; without
    # causality the stride's keys past the window are a masked call
    ({"type": "union", "patterns": [SW, ST]}, True, {CUDNN: 1} if TRITON else {CUDNN: 1, FLASH_WINDOW: 1}),
    ({"type": "union", "patterns": [SW, ST]}, False, {EFFICIENT: 1} if TRITON else {EFFICIENT: 1, FLASH_WINDOW: 1}),
])
def test_where_sdpa_picks_cudnn_the_unmasked_calls_take_it(pattern, kernels, causal):
    """On a GPU where torch's SDPA runs unmasked half-precision calls on cuDNN's attention (an
    H200: 36 ms against flash's 55 for a causal 131072-token call, H = 8, D = 64), the engine's
    unmasked fused calls take it too, its log-sum-exp reshaped from [B, H, Lq, 1]; masked calls
    keep the memory-efficient kernel."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 320, 24, generator=g).to(torch.bfloat16) for _ in range(3))
    out, count = counted_call(q, k, v, pattern, causal=causal, cudnn=True)
    assert {op: n for op, n in count.ops.items() if op in (FLASH, EFFICIENT, FLASH_WINDOW, CUDNN)} == kernels
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, pattern, causal=causal)[0], atol=3e-2,
                               rtol=3e-2)


def test_the_cudnn_log_sum_exp_is_the_reference_s():
    """A union merges its members by log-sum-exp: cuDNN's, reshaped, must be the contract's."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 200, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    with cuda_kernels_on_cpu(cudnn=True):
        out, lse = attention(q, k, v, ST, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, ST)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref_out, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("layout", ["head_axis_of_one_at_stride_1", "rows_12_apart", "start_off_16_bytes"])
def test_cuda_kernels_get_aligned_operands_from_any_layout(layout):
    """The CUDA kernels load rows in 16-byte units and check every stride (a size-1 axis's too,
    which torch lets be anything) and the start: the engine restrides or copies what is off."""
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 1, 50, 8, generator=g, dtype=torch.bfloat16) for _ in range(2))
    if layout == "head_axis_of_one_at_stride_1":
        q = torch.randn(2, 1, 40, 8, generator=g, dtype=torch.bfloat16).as_strided((2, 1, 40, 8), (320, 1, 8, 1))
    elif layout == "rows_12_apart":
        q = torch.randn(2, 1, 40, 12, generator=g, dtype=torch.bfloat16)[..., :8]
    else:
        q = torch.randn(2 * 40 * 8 + 1, generator=g, dtype=torch.bfloat16)[1:].view(2, 1, 40, 8)
    for pattern in (None, SW, ST, FX):
        with cuda_kernels_on_cpu():
            out = attention(q, k, v, pattern)
        torch.testing.assert_close(out.double(), reference_attention(q, k, v, pattern)[0], atol=3e-2, rtol=3e-2)


UNIONS = {
    "window_stride": {"type": "union", "patterns": [SW, ST]},
    "window_fixed": {"type": "union", "patterns": [SW, FX]},
    "stride_fixed": {"type": "union", "patterns": [ST, FX]},
    "all_three": {"type": "union", "patterns": [SW, ST, FX]},
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("lq", [300, 40, 1], ids=["prefill", "chunk", "decode"])
@pytest.mark.parametrize("pattern", [SW, ST, FX, *UNIONS.values()], ids=["window", "stride", "fixed", *UNIONS])
def test_cuda_plans_never_wait_for_the_device(pattern, lq, causal, dtype):
    """No structured CUDA plan reads a device value back to the host (`int(t)`, `bool(t)`,
    `nonzero`): each such read waits for every kernel queued before it, so the host could not run
    ahead of the GPU launching the next ones. (The masked fallback, two fixed members, may.)"""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, lq, 16, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, 300, 16, generator=g).to(dtype) for _ in range(2))
    out, count = counted_call(q, k, v, pattern, causal=causal)
    assert count.syncs == {}
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, pattern, causal=causal)[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("pattern", [FX, *(UNIONS[name] for name in ("window_fixed", "stride_fixed", "all_three"))],
                         ids=["fixed", "window_fixed", "stride_fixed", "all_three"])
def test_cuda_launches_do_not_grow_with_the_blocks(pattern, causal):
    """On CUDA every op is a launch, whatever its size: fixed's summary keys go in a few row ranges
    however many blocks there are (a call per block made 2,694 ops for union(sliding 128,
    fixed(128, 8)) at n = 4096, 366 so), within MASK_BUDGET mask elements a call."""
    block = {"type": "fixed", "block": 32, "summary": 2}
    pattern = {**pattern, "patterns": [block if p is FX else p for p in pattern["patterns"]]} if "patterns" in pattern \
        else block
    ops = {}
    for n in (512, 2048):
        q, k, v = (torch.randn(1, 1, n, 16, dtype=torch.bfloat16) for _ in range(3))
        with structured_at_every_size():
            out, count = counted_call(q, k, v, pattern, causal=causal)
        ops[n] = count.total
        torch.testing.assert_close(out.double(), reference_attention(q, k, v, pattern, causal=causal)[0], atol=3e-2, rtol=3e-2)
    assert ops[2048] < 1.5 * ops[512], ops  # 64 query blocks against 16


@pytest.mark.parametrize("lq", [4096, 16, 1], ids=["prefill", "16 rows", "decode"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("strides", [[128], [128, 192]], ids=["one stride", "two strides"])
def test_cuda_strided_masks_are_built_once(strides, causal, lq):
    """A union's strided step keeps its small class-distance masks (`class_distance_mask`): a
    second call builds none (ten to sixteen launches a call on CUDA), here at Lk 4096 where the
    keys end in a partial class row of stride 192; a decode step of one stride builds none at all
    (it computed its unused key distances: three launches a step). One stride's masks leave no row
    empty, which the host knows: no pass zeroes such rows, and a single masked call's result is the
    output (no buffer filled first). A short run's mask is not padded again at each call."""
    pattern = {"type": "union", "patterns": [SW, *({"type": "strided", "stride": s} for s in strides)]}
    q = torch.randn(1, 1, lq, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, 4096, 64, dtype=torch.bfloat16) for _ in range(2))
    out, count = counted_call(q, k, v, pattern, causal=causal)
    assert not {"aten.arange.default", "aten.arange.start", "aten.any.dim"} & set(count.ops), count.ops
    if len(strides) == 1:
        assert not {"aten.masked_fill.Scalar", "aten.zeros.default", "aten.full.default"} & set(count.ops), count.ops
    if lq < 4096:  # a kept mask's rows are aligned as the memory-efficient kernel reads them: no pad a call
        assert "aten.constant_pad_nd.default" not in count.ops, count.ops
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, pattern, causal=causal)[0],
                               atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("pattern, lq", [
    (None, 1), (None, 16), (ST, 1), ({"type": "union", "patterns": [SW, ST]}, 1),
    ({"type": "union", "patterns": [SW, ST, {"type": "strided", "stride": 24}]}, 1),
    *((UNIONS[name], 1) for name in ("window_fixed", "all_three")),
], ids=["dense", "dense_chunk", "stride", "window_stride", "window_two_strides", "window_fixed", "all_three"])
def test_cuda_decode_rows_take_grouped_heads_in_one_run(pattern, lq):
    """A decode row (or a dense causal chunk) with fewer key/value heads than query heads runs as one
    call per kernel, as with equal heads: the query heads that share a key/value head as rows of it
    (dense attention, its causal square a mask; a stride's short run), the band's and fixed's
    kernels reading them themselves; not one run per key/value head over copies of it repeated
    (H = 32 over 8: 51 launches a dense decode row, 75 a 16-row chunk, 75 a window and a
    stride's decode row)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, lq, 64, generator=g).to(torch.bfloat16)
    launches = {}
    for hkv in (8, 4, 2, 1):
        k, v = (torch.randn(1, hkv, 1000, 64, generator=g).to(torch.bfloat16) for _ in range(2))
        out, count = counted_call(q, k, v, pattern)
        launches[hkv] = count.launches
        torch.testing.assert_close(out.double(), reference_attention(q, k, v, pattern)[0], atol=3e-2, rtol=3e-2)
    # As many for any key/value head count; a few more than equal heads (the folded rows' outputs
    # back to heads; a chunk's mask repeated for the heads)
    assert launches[4] == launches[2] >= launches[1] and launches[2] <= launches[8] + 5, launches


def test_cuda_calls_keep_their_masks_within_budget():
    from engine.kernels.fixed import CALL_ROWS, _blocks_per_call
    from engine.kernels.masked import MASK_BUDGET

    cpu = torch.device("cpu")
    with cuda_kernels_on_cpu():
        assert _blocks_per_call(128, 128, lambda g: 1016, cpu, CALL_ROWS) == 32  # 4 ranges of 32 blocks
        group = _blocks_per_call(128, 512, lambda g: 4088, cpu, CALL_ROWS)
        assert group * 128 * 4088 <= MASK_BUDGET < 2 * group * 128 * 4088
    assert _blocks_per_call(16, 512, lambda g: 4088, cpu, CALL_ROWS) == 4  # the CPU's: the rows asked for
