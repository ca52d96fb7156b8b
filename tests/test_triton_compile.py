"""The engine's Triton kernels compiled for NVIDIA GPUs here, without one: the interpreter runs
their logic (tests/test_triton_fixed.py, tests/test_triton_merge.py), not their compile. And
which binaries a GPU would compile when: Triton keys each compile by its launch's arguments, so
the emulation records those keys (`triton_compiles`) by Triton's own rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton_aot
from cuda_emulation import cuda_kernels_on_cpu, triton_compiles

from engine import attention
from engine.kernels.device import TRITON_OPTIONS, triton
from engine.planner import warm_up_calls

pytestmark = pytest.mark.skipif(triton is None, reason="Triton is not installed")

# Shared memory a block may use (dynamic, opted in): sm_86 and sm_89 (RTX 30 / 40, A10, L4) 99 KB,
# the least from sm_80 on (A100 163 KB); sm_90 (H100, H200) 227 KB. sm_86 stands for sm_80's code
# path (mma), sm_90 for Hopper's (wgmma).
SHARED_LIMIT = {86: 101376, 90: 232448}


def test_every_variant_compiles_for_sm86_and_sm90_within_their_shared_memory():
    """Triton compiles each tile size fixed's and the band's `kernel_variant` pick and the merges' dtypes and
    feature tiles for Ampere and Hopper (its wheel carries ptxas, no GPU needed), and each must
    fit that GPU's shared memory (fixed in float32 at 64 x 64 tiles, 3 stages, D = 128 did not:
    176 KB; D = 256 at 32 x 32 tiles took 100 KB, over sm_86's 99)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = Path(__file__).parent / "triton_aot.py"
    done = subprocess.run([sys.executable, str(script), *map(str, SHARED_LIMIT)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = [json.loads(line) for line in done.stdout.splitlines()]
    kernels = [variant["kernel"] for variant in compiled]
    assert kernels.count("fixed") == len(SHARED_LIMIT) * len(triton_aot.VARIANTS)
    assert kernels.count("band") == len(SHARED_LIMIT) * len(triton_aot.BAND_VARIANTS)
    assert kernels.count("merge") == len(SHARED_LIMIT) * len(triton_aot.MERGE_VARIANTS)
    assert kernels.count("split merge") == len(SHARED_LIMIT) * len(triton_aot.SPLIT_MERGE_VARIANTS)
    for variant in compiled:
        assert variant["shared"] <= SHARED_LIMIT[variant["capability"]], variant
        assert variant["shared"] > 0 or "merge" in variant["kernel"], variant  # the merges need none


SW, ST, FX = ({"type": "sliding_window", "window": 128}, {"type": "strided", "stride": 128},
              {"type": "fixed", "block": 128, "summary": 8})
# The warm-up's kinds of union (at most one stride beside fixed), at other sizes.
LATER_PATTERNS = [FX, {"type": "union", "patterns": [SW, ST]}, {"type": "union", "patterns": [SW, FX]},
                  {"type": "union", "patterns": [ST, FX]}, {"type": "union", "patterns": [SW, ST, FX]}]
# (B, H, Hkv, Lq, Lk): a decode step, a chunk, prefills off every tile, fewer rows than a stride,
# grouped key/value heads, a batch.
LATER_SHAPES = [(1, 2, 2, 1, 4097), (1, 2, 2, 7, 3001), (1, 2, 2, 333, 777), (1, 2, 2, 130, 130),
                (1, 4, 2, 100, 2048), (2, 2, 2, 1, 1536)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_after_the_warm_up_a_new_length_compiles_nothing(dtype):
    """On CUDA the service warms the engine before it reports ready, so that no request waits for
    Triton to compile (about a second a binary). Triton compiles per class of every integer and
    pointer argument it specialises on (1, a multiple of 16, other): fixed's log-sum-exp strides
    (Lq, and 1 for a decode step) and a merge's views (where a row range starts) once varied with
    the lengths, and each probe compiled a variant its calls did not use. Every launch of later
    requests of the warm-up's dtypes and head dims must find its binary compiled."""
    with cuda_kernels_on_cpu():
        with triton_compiles() as warm:
            for q, pattern, causal in warm_up_calls(torch.device("cpu")):  # CUDA's list, here
                if q.dtype == dtype and q.shape[-1] == 64:
                    attention(q, q, q, pattern, causal=causal)
        expected = {"_fixed_kernel", "_merge_kernel", "_merge_splits_kernel"}
        assert {key[0] for key in warm} == expected | ({"_band_kernel"} if dtype != torch.float32 else set())
        # Each launch names its options (Triton's defaults change between versions).
        assert all(repr(option) in key[2] for key in warm for option in TRITON_OPTIONS.items())
        g = torch.Generator().manual_seed(0)
        for b, h, hkv, lq, lk in LATER_SHAPES:
            q = torch.randn(b, h, lq, 64, generator=g).to(dtype)
            k, v = (torch.randn(b, hkv, lk, 64, generator=g).to(dtype) for _ in range(2))
            for pattern in LATER_PATTERNS:
                for causal in (True, False):
                    with triton_compiles() as later:
                        attention(q, k, v, pattern, causal=causal)
                    assert later <= warm, (pattern, (b, h, hkv, lq, lk), causal, [key[0] for key in later - warm])
