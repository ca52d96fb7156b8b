"""The CUDA emulation itself (`cuda_emulation`): its stand-ins refuse what the CUDA kernels refuse,
leave nothing behind, and the engine's CUDA plans reach them. The engine's own checks on CUDA's
branches are the third pass of test_engine_reference.py and test_engine_properties.py."""

from __future__ import annotations

import math

import pytest
import torch

from cuda_emulation import OpCount, cuda_kernels_on_cpu
from engine import attention
from reference import reference_attention

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
])
def test_stand_ins_refuse_what_the_cuda_kernels_refuse(call, message):
    with cuda_kernels_on_cpu(), pytest.raises(AssertionError, match=message.replace("[", r"\[")):
        call()


def test_stand_ins_answer_in_the_kernels_layouts_and_leave_nothing_behind():
    q = torch.randn(1, 2, 5, 8)
    with cuda_kernels_on_cpu():
        _, lse, *_ = _efficient(q, q, q)
        out, *_ = _flash(*[q.bfloat16()] * 3)
    assert lse.shape == (1, 2, 32) and torch.isnan(lse[..., 5:]).all() and not torch.isnan(lse[..., :5]).any()
    assert not out.is_contiguous() and out.transpose(1, 2).is_contiguous()  # [B, L, H, D] memory
    with pytest.raises(NotImplementedError):
        _efficient(q, q, q)


SW, ST = {"type": "sliding_window", "window": 32}, {"type": "strided", "stride": 16}
FX = {"type": "fixed", "block": 16, "summary": 2}


@pytest.mark.parametrize("pattern, dtype, kernels", [
    (SW, torch.bfloat16, {FLASH_WINDOW: 1}),  # the band is the flash kernel's local window
    (SW, torch.float32, {EFFICIENT: 3}),  # float32: the first rows, the tiles, the last short tile
    (ST, torch.bfloat16, {FLASH: 1}),  # every class in one causal call
    (FX, torch.bfloat16, {FLASH: 1, EFFICIENT: 4}),  # own blocks; summary keys in 4 row ranges
    ({"type": "union", "patterns": [SW, ST]}, torch.bfloat16, {FLASH_WINDOW: 1, FLASH: 1}),  # stride: past the window
])
def test_cuda_plans_reach_the_cuda_kernels(pattern, dtype, kernels):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 320, 20, generator=g).to(dtype) for _ in range(3))
    with cuda_kernels_on_cpu():
        attention(q, k, v, pattern)  # the flash window's first use probes it once
        with OpCount() as count:
            out = attention(q, k, v, pattern)
    assert {op: n for op, n in count.ops.items() if op in (FLASH, EFFICIENT, FLASH_WINDOW)} == kernels
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, pattern)[0], atol=tol, rtol=tol)
    assert not math.isnan(out.float().sum())
