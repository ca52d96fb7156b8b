"""The engine's Triton kernels compiled for NVIDIA GPUs here, without one: the interpreter runs
their logic (tests/test_triton_fixed.py, tests/test_triton_merge.py), not their compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton_aot

from engine.kernels.device import triton

pytestmark = pytest.mark.skipif(triton is None, reason="Triton is not installed")

# Shared memory a block may use (dynamic, opted in): sm_86 and sm_89 (RTX 30 / 40, A10, L4) 99 KB,
# the least from sm_80 on (A100 163 KB); sm_90 (H100, H200) 227 KB. sm_86 stands for sm_80's code
# path (mma), sm_90 for Hopper's (wgmma).
SHARED_LIMIT = {86: 101376, 90: 232448}


def test_every_variant_compiles_for_sm86_and_sm90_within_their_shared_memory():
    """Triton compiles each tile size fixed's `kernel_variant` picks and the merges' dtypes and
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
    assert kernels.count("merge") == len(SHARED_LIMIT) * len(triton_aot.MERGE_VARIANTS)
    assert kernels.count("split merge") == len(SHARED_LIMIT) * len(triton_aot.SPLIT_MERGE_VARIANTS)
    for variant in compiled:
        assert variant["shared"] <= SHARED_LIMIT[variant["capability"]], variant
        assert variant["shared"] > 0 or variant["kernel"] != "fixed", variant  # the merges need none
